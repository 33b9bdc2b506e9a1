"""Adaptation: Algorithm 1's pieces, the round on a bundle, and the no-label-read guarantee."""
import builtins
import contextlib
import copy
import json

import cv2
import numpy as np
import pytest
import torch

from mas3_edge import adapt, bundle, prototypes as P, rounds, stats, steps, bank
from mas3_edge.config import AdaptConfig
from mas3_edge.errors import UserError
from mas3_edge.model import DomainNorm

from conftest import domain


def _fit_proto(net, seed=0):
    """A GMM in the net's embedding space: one well-separated component per class."""
    g = torch.Generator().manual_seed(seed)
    k, d = net.config.num_classes, net.config.embed_dim
    chol = torch.eye(d).repeat(k, 1, 1) * 0.5
    return P.Prototypes(torch.full((k,), 1 / k), torch.randn(k, d, generator=g) * 3, chol, torch.full((k,), 100.0))


@pytest.fixture
def proto_bundle(tiny_bundle):
    v = bundle.load_version(tiny_bundle)
    P.save(_fit_proto(v.net), v.prototypes_path, v.meta["source_sha256"], "test")
    return tiny_bundle


def _frames_folder(root, n=10, size=(64, 128), with_labels=True):
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    if with_labels:
        (root / "labels").mkdir()
    for i in range(n):
        cv2.imwrite(str(root / "images" / f"{i:04d}.png"), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        if with_labels:
            cv2.imwrite(str(root / "labels" / f"{i:04d}.png"), np.zeros(size, np.uint8))
    return root


def test_gmm_sample_counts_follow_the_predicted_histogram(small_net):
    proto = _fit_proto(small_net)
    hist = torch.zeros(proto.k, dtype=torch.long)
    used = torch.nonzero(proto.alpha > 0).flatten()[:2]
    hist[used[0]], hist[used[1]] = 300, 100
    seen = {}
    real_sample = proto.sample
    proto.sample = lambda per_class, gen: (seen.setdefault("n", per_class), real_sample(per_class, gen))[1]
    adapt.pseudo_dataset(proto, small_net.head, hist, 400, 0.0, torch.Generator().manual_seed(0))
    assert seen["n"][used[0]] == 300 and seen["n"][used[1]] == 100 and seen["n"].sum() == 400


def test_pseudo_dataset_keeps_only_confident_samples(small_net):
    proto = _fit_proto(small_net)
    hist = torch.bincount(torch.nonzero(proto.alpha > 0).flatten(), minlength=proto.k) * 100
    z, y = adapt.pseudo_dataset(proto, small_net.head, hist, 2000, 0.3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        conf, pred = torch.softmax(small_net.head(z[:, :, None, None]).flatten(1), 1).max(1)
    assert (conf > 0.3).all() and torch.equal(pred, y)


@pytest.mark.parametrize("method", ["mas3", "mas3-paper"])
def test_steps_reduce_the_adaptation_loss(small_net, method):
    proto = _fit_proto(small_net)
    frames = np.random.default_rng(3).integers(0, 255, (6, 64, 128, 3), dtype=np.uint8)
    cfg = AdaptConfig(method=method, steps=30, lr=1e-3, tau=0.0, swd_pixels=512, gmm_samples=1024, bn_mix=1.0)
    log = adapt.adapt(small_net, proto, frames, cfg)["steps"]
    first, last = np.mean([s["swd"] for s in log[:5]]), np.mean([s["swd"] for s in log[-5:]])
    assert last < first and all(np.isfinite(s["loss"]) for s in log)


@pytest.mark.parametrize("batch_stats", [True, False])
def test_batch_statistics_in_the_steps_leave_frozen_statistics_alone(small_net, batch_stats, monkeypatch):
    monkeypatch.setattr(steps, "RECOMPUTE_PIXELS", 0)  # these small frames recompute too
    proto = _fit_proto(small_net)
    frames = np.random.default_rng(5).integers(0, 255, (4, 64, 128, 3), dtype=np.uint8)
    modes, before = [], _bn_means(small_net).clone()
    bn = next(m for m in small_net.modules() if isinstance(m, DomainNorm))
    bn.register_forward_pre_hook(lambda m, x: modes.append(m.training))
    cfg = AdaptConfig(method="mas3", bn="frozen", batch_stats=batch_stats, steps=3, tau=0.0, swd_pixels=256,
                      gmm_samples=512)
    adapt.adapt(small_net, proto, frames, cfg)
    # each step normalised with its batch's statistics, or the running ones, also where the backward
    # runs a block's forward again (steps.recomputing): 3 steps, twice each
    assert modes == [batch_stats] * 6
    assert torch.equal(_bn_means(small_net), before)  # and bn="frozen" keeps them as they were


def test_recomputing_the_encoder_in_the_backward_changes_no_weight(small_net, monkeypatch):
    proto = _fit_proto(small_net)
    frames = np.random.default_rng(7).integers(0, 255, (4, 64, 128, 3), dtype=np.uint8)
    cfg = AdaptConfig(method="mas3", steps=2, tau=0.0, swd_pixels=256, gmm_samples=512)
    recomputed, kept = copy.deepcopy(small_net), copy.deepcopy(small_net)
    monkeypatch.setattr(steps, "RECOMPUTE_PIXELS", 0)
    adapt.adapt(recomputed, proto, frames, cfg)
    monkeypatch.setattr(steps, "recomputing", lambda net, pixels: contextlib.nullcontext())
    adapt.adapt(kept, proto, frames, cfg)
    a, b = recomputed.state_dict(), kept.state_dict()
    assert any(not torch.equal(a[k], small_net.state_dict()[k]) for k in a)  # the steps did move the weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_small_step_batches_keep_their_activations(small_net):
    modes = []
    next(m for m in small_net.modules() if isinstance(m, DomainNorm)).register_forward_pre_hook(
        lambda m, x: modes.append(m.training))
    frames = np.random.default_rng(8).integers(0, 255, (4, 64, 128, 3), dtype=np.uint8)
    adapt.adapt(small_net, _fit_proto(small_net), frames, AdaptConfig(method="mas3", bn="frozen", steps=2, tau=0.0,
                                                                      swd_pixels=256, gmm_samples=512))
    assert len(modes) == 2  # one forward a step: 2 x 64 x 128 pixels are below steps.RECOMPUTE_PIXELS


def test_only_confident_target_pixels_enter_the_swd(small_net, monkeypatch):
    proto = _fit_proto(small_net)
    frames = np.random.default_rng(6).integers(0, 255, (2, 64, 128, 3), dtype=np.uint8)
    with torch.no_grad():
        conf = torch.softmax(small_net.head(small_net.embed(small_net.normalize(torch.from_numpy(frames)))), 1)
    conf = conf.amax(1)  # on the embedding grid, where the SWD is taken
    threshold = float(conf.median())  # about half the pixels pass
    seen = []
    real = adapt.swd_loss
    monkeypatch.setattr(adapt, "swd_loss", lambda zt, *a: (seen.append(zt.detach()), real(zt, *a))[1])
    cfg = AdaptConfig(method="mas3", bn="frozen", batch_stats=False, target_conf=threshold, steps=1, batch_size=2,
                      tau=0.0, swd_pixels=1 << 20, gmm_samples=512)
    monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.tensor([0, 1]))  # the step sees both frames
    adapt.adapt(small_net, proto, frames, cfg)
    with torch.no_grad():
        kept = torch.softmax(small_net.head(seen[0][:, :, None, None]).flatten(1), 1).amax(1)
    assert (kept >= threshold - 1e-6).all() and 0 < len(kept) < conf.numel()


def test_round_writes_an_unserved_child_version_with_a_report(proto_bundle, tmp_path):
    frames = _frames_folder(tmp_path / "frames", with_labels=False)
    cfg = AdaptConfig(steps=3, tau=0.0, swd_pixels=256, gmm_samples=512)
    res = rounds.run_round(proto_bundle, frames, cfg, rcfg=rounds.UNGUARDED)
    assert res.accepted and res.version_dir.name == "v0002"
    assert bundle.serving_id(proto_bundle) == "v0001"
    report = json.loads((res.version_dir / "report.json").read_text())
    assert report["parent"] == "v0001" and len(report["steps"]) == 3
    assert set(report["health_before"]) == {"swd", "swd_class", "entropy", "prior_kl"}
    assert list(res.report["parts"]) == ["load", "adapt", "judge", "write"]  # each part's time and peak RSS
    assert all(p["seconds"] > 0 and p["peak_rss_mb"] > 0 for p in res.report["parts"].values())
    child = bundle.load_version(proto_bundle, "v0002")
    P.load(child.prototypes_path, child.meta)  # the GMM travels with the lineage and still validates


def _bn_means(net):
    return torch.cat([m.running_mean for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])


def _first_bn(net):
    return next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _norms(net):
    return [m for m in net.modules() if isinstance(m, DomainNorm)]


def test_bn_mix_gives_the_moments_of_the_mixture(small_net):
    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 128, 3), dtype=np.uint8)
    target = copy.deepcopy(small_net)
    stats.reestimate(target, frames)  # the frames' own statistics
    mt, vt = _first_bn(target).running_mean, _first_bn(target).running_var
    bn = _first_bn(small_net)
    with torch.no_grad():
        bn.running_mean.fill_(5.0), bn.running_var.fill_(2.0)
    stats.reestimate(small_net, frames, mix=0.25)
    assert torch.allclose(bn.running_mean, 0.75 * 5.0 + 0.25 * mt, atol=1e-4)
    assert torch.allclose(bn.running_var, 0.75 * 2.0 + 0.25 * vt + 0.25 * 0.75 * (mt - 5.0) ** 2, rtol=1e-4)


def test_statistics_are_never_taken_on_a_batch_of_one_frame(small_net):
    """After a global pool a single frame gives one value per channel: the last batch takes it in."""
    assert stats.batches(17, 8) == [(0, 8), (8, 17)] and stats.batches(16, 8) == [(0, 8), (8, 16)]
    assert stats.batches(2, 8) == [(0, 2)]
    stats.reestimate(small_net, domain(0, 256, n=9))  # 8 + 1 frames: the pooled branch must not fail
    with pytest.raises(UserError, match="at least 2 frames"):
        stats.reestimate(small_net, domain(0, 256, n=1))


def test_a_mixed_round_mixes_with_the_source_statistics_not_the_parents(proto_bundle, tmp_path):
    source = bundle.load_version(proto_bundle)
    drifted = copy.deepcopy(source.net)
    with torch.no_grad():
        for m in drifted.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(3.0)
    child = bundle.save_version(proto_bundle, drifted, parent=source)
    frames = np.random.default_rng(2).integers(0, 255, (6, 64, 128, 3), dtype=np.uint8)
    res = rounds.run_round(proto_bundle, frames, AdaptConfig(steps=0, bn_mix=0.0), child.name, rcfg=rounds.UNGUARDED)
    assert torch.allclose(_bn_means(bundle.load_version(res.version_dir).net), _bn_means(source.net))


@pytest.mark.parametrize("method, two_sets", [("mas3", True), ("bn", False)])
def test_only_mas3_rounds_keep_the_source_normalisation_beside_the_adapted(proto_bundle, method, two_sets):
    frames = np.random.default_rng(4).integers(0, 255, (6, 64, 128, 3), dtype=np.uint8)
    cfg = AdaptConfig(method=method, steps=1, tau=0.0, swd_pixels=256, gmm_samples=512)
    res = rounds.run_round(proto_bundle, frames, cfg, rcfg=rounds.UNGUARDED)
    child, source = _norms(bundle.load_version(res.version_dir).net), _norms(bundle.load_version(proto_bundle).net)
    assert any(m.routed() for m in child) == two_sets
    if two_sets:  # the source set is the parent's, byte for byte
        assert all(torch.equal(c.bank[0], s.working()) for c, s in zip(child, source))


def test_each_domain_keeps_its_own_set_and_a_returning_domain_finds_it(small_net):

    bright, dark, grey = domain(120, 256), domain(0, 100), domain(100, 140)
    stats.reestimate(small_net, bright)
    bank.mark_source(small_net)

    def stem(f):
        return small_net.stem(torch.from_numpy(f))

    assert bank.select(small_net, dark, keep=8) == "new"
    stats.reestimate(small_net, dark)
    with torch.no_grad():
        dark_logits = small_net(small_net.normalize(torch.from_numpy(dark)))
    assert bank.select(small_net, domain(0, 100, seed=1), keep=8) == "working"  # another chunk, same domain
    assert bank.select(small_net, grey, keep=8) == "new"
    stats.reestimate(small_net, grey)
    assert [bank.route(small_net, stem(f)).unique().tolist() for f in (bright, dark, grey)] == [[0], [1], [2]]
    with torch.no_grad():  # adapting to grey left dark's set as it was
        assert torch.equal(small_net(small_net.normalize(torch.from_numpy(dark))), dark_logits)
    assert bank.select(small_net, domain(0, 100, seed=2), keep=8) == "banked 1"
    assert [bank.route(small_net, stem(f)).unique().tolist() for f in (bright, dark, grey)] == [[0], [2], [1]]
    assert bank.select(small_net, bright, keep=1) == "new"  # one adapted set kept, the new one
    assert [len(m.bank) for m in small_net.modules() if isinstance(m, DomainNorm)][0] == 1


def test_adaptation_never_reads_a_label(proto_bundle, tmp_path, monkeypatch):
    frames = _frames_folder(tmp_path / "frames", with_labels=True)
    opened = []
    real_open, real_imread = builtins.open, cv2.imread
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    monkeypatch.setattr(cv2, "imread", lambda f, *a, **k: (opened.append(str(f)), real_imread(f, *a, **k))[1])
    rounds.run_round(proto_bundle, frames, AdaptConfig(steps=2, tau=0.0, swd_pixels=256, gmm_samples=512), rcfg=rounds.UNGUARDED)
    assert any("/images/" in p for p in opened)
    assert not [p for p in opened if "/labels/" in p]


def test_an_empty_buffer_is_a_clear_error(proto_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        rounds.run_round(proto_bundle, tmp_path / "empty", AdaptConfig(steps=1))


@pytest.mark.parametrize("choose", [True, False])
def test_a_round_that_cannot_sample_the_gmm_keeps_the_statistics_alone_and_says_so(proto_bundle, tmp_path, choose):
    """A classifier rarely sure of the GMM samples (imported, briefly trained) still adapts its statistics."""
    frames = _frames_folder(tmp_path / "frames", n=8, with_labels=False)
    res = rounds.run_round(proto_bundle, frames, AdaptConfig(steps=1, tau=0.999999, choose=choose), rcfg=rounds.UNGUARDED)
    rep = res.report
    assert res.version_dir is not None and rep["steps"] == [] and "choice" not in rep
    assert any("GMM samples pass tau" in w and "statistics alone" in w for w in rep["warnings"])
    with pytest.raises(adapt.TooFewSamples, match="lower --tau"):  # the steps alone still say why
        adapt.adapt(bundle.load_version(proto_bundle).net, _fit_proto(bundle.load_version(proto_bundle).net),
                    np.zeros((2, 64, 128, 3), np.uint8), AdaptConfig(steps=1, tau=0.999999))


def test_nan_weights_are_rejected_and_nothing_is_written(proto_bundle, tmp_path, monkeypatch):
    frames = _frames_folder(tmp_path / "frames", n=5, with_labels=False)

    def poison(net, proto, frames, cfg, progress=None):
        with torch.no_grad():
            next(net.parameters()).fill_(float("nan"))
        return {"steps": []}
    monkeypatch.setitem(rounds.STEPS, "mas3", poison)
    res = rounds.run_round(proto_bundle, frames, AdaptConfig(steps=1, tau=0.0, choose=False))
    assert not res.accepted and "not finite" in res.reason and res.version_dir is None
    assert bundle.version_ids(proto_bundle) == ["v0001"]


def test_the_choice_and_the_judgement_read_two_blocks_of_the_newest_frames():
    frames = np.arange(20)[:, None]  # frame i was taken at time i
    train, chooser, held, what = rounds.split_holdout(frames)
    assert held.flatten().tolist() == [16, 17, 18, 19] and chooser.flatten().tolist() == [14, 15]
    assert train.flatten().tolist() == list(range(14)) and "last 4 of 20" in what and "2 before them" in what


def test_the_choice_never_sees_the_judged_frames(proto_bundle, monkeypatch):
    frames = domain(0, 256, n=20)
    seen = {}
    real_choose, real_judge = rounds.choose, rounds.judge_round
    monkeypatch.setattr(rounds, "choose", lambda c, block, *a: (seen.setdefault("choose", block), real_choose(c, block, *a))[1])
    monkeypatch.setattr(rounds, "judge_round", lambda s, n, src, p, block, *a, **k: (
        seen.setdefault("judge", block), real_judge(s, n, src, p, block, *a, **k))[1])
    rounds.run_round(proto_bundle, frames, AdaptConfig(steps=1, tau=0.0, swd_pixels=256, gmm_samples=512),
                     rcfg=rounds.UNGUARDED)
    assert np.array_equal(seen["judge"], frames[16:]) and np.array_equal(seen["choose"], frames[14:16])


def test_steps_short_of_confident_target_pixels_are_counted_and_warned(small_net, caplog):
    proto = _fit_proto(small_net)
    frames = np.random.default_rng(7).integers(0, 255, (4, 64, 128, 3), dtype=np.uint8)
    cfg = AdaptConfig(method="mas3", target_conf=0.999999, steps=2, tau=0.0, swd_pixels=256, gmm_samples=512)
    with caplog.at_level("WARNING"):
        out = adapt.adapt(small_net, proto, frames, cfg)  # an untrained net is never that sure of a pixel
    assert out["all_pixel_steps"] == 2 and "matched all pixels" in caplog.text


def test_a_round_on_too_few_frames_says_that_nothing_was_held_out(proto_bundle, caplog):
    frames = np.random.default_rng(8).integers(0, 255, (3, 64, 128, 3), dtype=np.uint8)
    cfg = AdaptConfig(steps=1, tau=0.0, swd_pixels=256, gmm_samples=512, target_conf=0.999999)
    with caplog.at_level("WARNING"):
        res = rounds.run_round(proto_bundle, frames, cfg, rcfg=rounds.UNGUARDED)
    assert res.report["holdout"] == "none" and res.report["frames"] == {"adapt": 3, "choice": 3, "holdout": 3}
    assert "none held out" in caplog.text
    warnings = " ".join(res.report["warnings"])
    assert "taken on the adaptation frames" in warnings and "matched all pixels instead" in warnings
    assert json.loads((res.version_dir / "report.json").read_text())["holdout"] == "none"


def test_every_method_fills_every_setting_it_leaves_open():
    from dataclasses import fields
    from mas3_edge.config import METHOD_DEFAULTS, METHOD_FIELDS
    left_open = {f.name for f in fields(AdaptConfig) if f.default is None}
    assert left_open == set(METHOD_FIELDS)
    for method, row in METHOD_DEFAULTS.items():
        cfg = AdaptConfig(method=method)
        assert {k: getattr(cfg, k) for k in left_open} == row
    assert AdaptConfig(method="tent", lr=5e-4, batch_stats=False).lr == 5e-4  # an explicit value wins


def test_a_fitted_gate_rule_joins_the_checks_before_the_sentinel(proto_bundle, tmp_path):
    rule = tmp_path / "rule.json"  # P(harm) rises as the candidate agrees less with the serving model
    rule.write_text(json.dumps({"inputs": ["agreement_serving"], "mean": [1.0], "std": [0.1], "weights": [-5.0],
                                "bias": 0.0, "threshold": 0.99, "note": "test"}))
    frames = domain(0, 256, n=10)
    res = rounds.run_round(proto_bundle, frames, AdaptConfig(steps=1, tau=0.0, swd_pixels=256, gmm_samples=512),
                           rcfg=rounds.RoundConfig(gate_rule=str(rule), guard=False))
    fitted = [c for c in res.report["checks"] if c["signal"] == "fitted_gate"]
    assert len(fitted) == 1 and fitted[0]["limit"] == 0.99 and 0 <= fitted[0]["value"] <= 1
    assert res.report["checks"][-1]["signal"] == "fitted_gate"  # after the health and gate checks
    with pytest.raises(UserError, match="gate rule must be"):
        rounds.RoundConfig(gate_rule=str(tmp_path / "nope.json"))
