"""mas3-st: self-training inside the bank on the statistics-only model's denoised pseudo-labels; and
the statistics' source prior (bn_mix) of a new set."""
import copy

import numpy as np
import pytest
import torch

from mas3_edge import bank, bundle, prototypes as P, rounds, selftrain, stats
from mas3_edge.config import AdaptConfig
from mas3_edge.errors import UserError
from mas3_edge.model import DomainNorm

from conftest import adapted_copy, domain
from test_cli_usage import mas3


def _proto(net) -> P.Prototypes:
    g = torch.Generator().manual_seed(0)
    k, d = net.config.num_classes, net.config.embed_dim
    return P.Prototypes(torch.full((k,), 1 / k), torch.randn(k, d, generator=g) * 3, torch.eye(d).repeat(k, 1, 1),
                        torch.full((k,), 100.0))


def test_prototype_weights_are_in_0_1_and_favour_pixels_near_their_class_prototype():
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [3.9, 0.0]])  # from class 0's mean to 1's
    w = selftrain.proda_weights(z, torch.zeros(5, dtype=torch.long), means, temperature=1.0)
    assert torch.all(w[1:] < w[:-1]) and w[0] > 0.9 and w[-1] < 0.1
    rand = selftrain.proda_weights(torch.randn(500, 2) * 5, torch.randint(0, 3, (500,)), means, 0.5)
    assert rand.min() >= 0 and rand.max() <= 1
    assert torch.allclose(selftrain.proda_weights(z, torch.ones(5, dtype=torch.long), means, 1.0)[2], w[2])  # midway


def test_class_balanced_thresholds_keep_the_same_fraction_of_every_class():
    gen = torch.Generator().manual_seed(0)
    sizes = {0: 2000, 3: 300, 5: 40}  # a frequent, a rarer and a rare class, each at its own confidence
    label = torch.cat([torch.full((n,), c) for c, n in sizes.items()])
    conf = torch.cat([torch.rand(n, generator=gen) * 0.1 + 0.2 * i for i, n in enumerate(sizes.values())])
    thr = selftrain.class_thresholds(conf, label, k=6, keep=0.3)
    keep = selftrain.kept(conf, label, thr)
    for c, n in sizes.items():
        assert abs(keep[label == c].float().mean().item() - 0.3) <= 1 / n + 1e-6
    assert torch.isinf(thr[[1, 2, 4]]).all()  # no pixel: nothing to keep
    assert selftrain.kept(conf, label, selftrain.class_thresholds(conf, label, 6, 1.0)).all()


def test_target_prototypes_are_the_kept_pixels_means_or_the_shipped_ones(small_net):
    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 128, 3), dtype=np.uint8)
    proto = _proto(small_net)
    cfg = AdaptConfig(method="mas3-st", st_keep=0.5)
    d = selftrain.Denoiser.fit(small_net, proto, frames, cfg)
    z, conf, label = selftrain.teach(small_net, torch.from_numpy(frames))
    keep = selftrain.kept(conf, label, d.thresholds).flatten()
    zk, yk = selftrain.flat(z)[keep], label.flatten()[keep]
    counts = torch.bincount(yk, minlength=proto.k)
    assert 0 < d.adapted == int((counts >= cfg.min_class_pixels).sum())
    for c in range(proto.k):
        want = zk[yk == c].mean(0) if counts[c] >= cfg.min_class_pixels else proto.mean[c]
        assert torch.allclose(d.means[c], want, atol=1e-4)


@pytest.fixture
def st_bundle(tiny_bundle):
    v = bundle.load_version(tiny_bundle)
    P.save(_proto(v.net), v.prototypes_path, v.meta["source_sha256"], "test")
    return tiny_bundle


def test_a_round_trains_only_the_new_set_and_leaves_the_source_set_bit_identical(st_bundle):
    """Steps 1 and 2 of a round, what it writes when the steps win (the judgement is tested elsewhere)."""
    frames = np.random.default_rng(3).integers(0, 255, (6, 64, 128, 3), dtype=np.uint8)
    v = bundle.load_version(st_bundle)
    parent, child = v.net, bundle.load_version(st_bundle).net
    chosen, cfg = rounds.pick_set(child, frames, AdaptConfig(method="mas3-st", steps=2, choose=False))
    (stepped,) = rounds.candidates(child, P.load(v.prototypes_path, v.meta), frames, cfg)
    assert chosen == "new" and len(stepped.log["steps"]) == 2 and stepped.log["target_prototypes"] > 0
    before, after = dict(parent.named_parameters()), dict(child.named_parameters())
    norm = {f"{n}.{p}" for n, m in child.named_modules() if isinstance(m, DomainNorm) for p in ("weight", "bias")}
    assert all(torch.equal(after[k], before[k]) for k in before if k not in norm)  # convs and h untouched
    assert any(not torch.equal(after[k], before[k]) for k in norm)  # the new set's affine parameters moved
    pairs = [(c, s) for c, s in zip(child.modules(), parent.modules()) if isinstance(c, DomainNorm)]
    assert all(len(c.bank) == 1 and torch.equal(c.bank[0], s.working()) for c, s in pairs)  # set 0, bit for bit


@pytest.mark.parametrize("setting, message", [({"st_keep": 0.0}, "st keep must be in (0, 1]"),
                                              ({"st_keep": 1.5}, "st keep must be in (0, 1]"),
                                              ({"st_temperature": 0.0}, "st temperature must be > 0")])
def test_invalid_settings_are_refused(setting, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
        AdaptConfig(method="mas3-st", **setting)


def test_an_invalid_setting_is_one_error_line_from_the_command(tmp_path):
    res = mas3("adapt", "--method", "mas3-st", "--st-keep", "1.5", cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "st keep must be in (0, 1], got 1.5" in res.stderr


def test_a_new_sets_statistics_mix_the_targets_with_the_source_set_not_the_serving_one(st_bundle):
    v = bundle.load_version(st_bundle)
    serving = adapted_copy(v.net, domain(0, 100, n=4))  # serves an adapted set, the source's banked beside it
    frames = domain(150, 256, n=6)
    chosen, cfg = rounds.pick_set(serving, frames, AdaptConfig(steps=0, bn_mix=0.5))
    (plain,) = rounds.candidates(serving, P.load(v.prototypes_path, v.meta), frames, cfg)
    want = copy.deepcopy(v.net)
    stats.reestimate(want, frames, mix=0.5)  # (1 - 0.5) * source + 0.5 * target
    assert chosen == "new" and bank.count(plain.net) == 3
    for got, ref in zip(bank.norms(plain.net), bank.norms(want)):
        assert torch.allclose(got.running_mean, ref.running_mean, atol=1e-5)
        assert torch.allclose(got.running_var, ref.running_var, rtol=1e-4, atol=1e-6)
