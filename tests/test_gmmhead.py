"""The prototypes' GMM as a second classifier fused with the network (gmmhead.py): its posterior
in every covariance structure, the fusion, the per-set class means and their EMA, the round."""
from __future__ import annotations

import pytest
import torch

from conftest import domain
from mas3_edge import bank, bundle, gmmhead, prototypes as P, rounds
from mas3_edge.config import AdaptConfig


def _proto(k: int, d: int, kind: str, seed: int = 0) -> P.Prototypes:
    """A GMM with random, correlated covariances in `kind`'s structure; class 2 absent (α = 0)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) / d + 0.2 * torch.eye(d, dtype=torch.float64)
    parts = P.structure(cov, kind, 3 if kind == "lowrank" else 0)
    alpha = torch.rand(k, generator=g) + 0.1
    alpha[2] = 0
    return P.Prototypes(alpha / alpha.sum(), torch.randn(k, d, generator=g) * 2, parts.get("chol"),
                        torch.ones(k), {}, parts.get("factor"), parts.get("diag"))


@pytest.mark.parametrize("kind", ["full", "lowrank", "diag"])
def test_posterior_matches_the_direct_computation(kind):
    proto = _proto(6, 10, kind)
    head = gmmhead.GmmHead.from_prototypes(proto, 0.2)
    z = torch.randn(2, 10, 3, 5, generator=torch.Generator().manual_seed(1)) * 3  # (B, D, h, w)
    got = head.log_posterior(z, None).permute(0, 2, 3, 1).reshape(-1, 6).double()
    want = torch.log_softmax(gmmhead.log_density(proto, z.permute(0, 2, 3, 1).reshape(-1, 10)).double(), 1)
    present = proto.alpha > 0
    assert torch.allclose(got[:, present], want[:, present], atol=2e-4)
    assert (got[:, ~present] < -1e20).all()  # an absent component never takes a pixel
    assert torch.allclose(got.exp().sum(1), torch.ones(len(got), dtype=torch.float64), atol=1e-5)


def test_the_fused_scores_are_the_mixture_of_the_two_classifiers(small_net):
    k, d = small_net.config.num_classes, small_net.config.embed_dim
    gmmhead.install(small_net, _proto(k, d, "full"), 0.3)
    z = small_net.embed(small_net.normalize(torch.from_numpy(domain(50, 200, n=2))))
    fused = torch.softmax(small_net.scores(z), 1)
    want = 0.7 * torch.softmax(small_net.head(z), 1) + 0.3 * small_net.gmm.log_posterior(z, None).exp()
    assert torch.allclose(fused, want, atol=1e-5)
    assert not torch.allclose(fused, torch.softmax(small_net.head(z), 1), atol=1e-3)  # the GMM does change it


def _two_set_net(net):
    """`net` with a source set and an adapted working set (dark frames' statistics), and the head."""
    from conftest import adapted_copy
    net = adapted_copy(net, domain(0, 90))
    gmmhead.install(net, _proto(net.config.num_classes, net.config.embed_dim, "full"), 0.2)
    return net


def test_the_ema_moves_only_the_working_sets_means_and_only_with_confident_pixels(small_net):
    net = _two_set_net(small_net)
    frames = domain(0, 90, n=4)
    source = net.gmm.bank.clone()
    unsure = AdaptConfig(gmm_conf=0.999999, gmm_momentum=1.0)
    before = net.gmm.mean.clone()
    gmmhead.adapt_means(net, frames, unsure)  # an untrained net is never that sure: nothing moves
    assert torch.equal(net.gmm.mean, before)
    gmmhead.adapt_means(net, frames, AdaptConfig(gmm_conf=0.0, gmm_momentum=1.0), batch_size=len(frames))
    with torch.no_grad():
        net.routing = False
        z = net.embed(net.normalize(torch.from_numpy(frames)))
        net.routing = True
    pred = net.head(z).argmax(1).flatten()
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    for c in range(net.config.num_classes):  # momentum 1, one batch: each predicted class's mean exactly
        want = zf[pred == c].mean(0) if (pred == c).any() else before[c]
        assert torch.allclose(net.gmm.mean[c], want, atol=1e-5)
    assert torch.equal(net.gmm.bank, source)  # the source set's means stay the source's


def test_the_means_follow_the_sets_and_travel_in_the_weights(small_net, tmp_path):
    net = _two_set_net(small_net)
    with torch.no_grad():
        net.gmm.mean.add_(1.0)
    assert net.gmm.sets().shape[0] == bank.count(net) == 2
    one = bank.one_set(net, 0)  # a set's copy keeps that set's means alone
    assert torch.equal(one.gmm.mean, net.gmm.bank[0]) and one.gmm.bank.shape[0] == 1
    bank.add_set(net, keep=8)  # the adapted set banked, a new one from the source's means
    assert torch.equal(net.gmm.mean, net.gmm.bank[0]) and net.gmm.bank.shape[0] == 2
    loaded = bundle.load_version(bundle.save_version(tmp_path / "b", net)).net
    assert loaded.gmm is not None and torch.equal(loaded.gmm.sets(), net.gmm.sets())
    assert torch.equal(loaded.gmm.weight, net.gmm.weight)
    plain = bundle.load_version(bundle.save_version(tmp_path / "p", small_net)).net
    assert plain.gmm is None


def test_evaluation_scores_the_fused_classifier_and_training_the_network_alone(small_net):
    x = small_net.normalize(torch.from_numpy(domain(50, 200, n=2)))
    plain = small_net(x)
    gmmhead.install(small_net, _proto(small_net.config.num_classes, small_net.config.embed_dim, "diag"), 0.5)
    fused = small_net(x)
    assert fused.shape == plain.shape and not torch.allclose(fused, plain)
    small_net.train()  # gradient steps see h(z) (batch statistics either way)
    assert torch.allclose(small_net(x), small_net.upsample(small_net.head(small_net.embed(x)), x.shape[-2:]))


def test_a_round_with_the_setting_serves_the_head_with_its_set_moved(tiny_bundle):
    v = bundle.load_version(tiny_bundle)
    proto = _proto(v.net.config.num_classes, v.net.config.embed_dim, "full")
    P.save(proto, v.prototypes_path, v.meta["source_sha256"], "test")
    cfg = AdaptConfig(steps=0, gmm_weight=0.2, gmm_conf=0.0)
    on = rounds.run_round(tiny_bundle, domain(0, 90, n=10), cfg, rcfg=rounds.UNGUARDED)
    net = bundle.load_version(on.version_dir).net
    assert net.gmm is not None and float(net.gmm.weight) == pytest.approx(0.2)
    assert torch.equal(net.gmm.bank[0], proto.mean)  # the source set keeps the source means
    assert not torch.equal(net.gmm.mean, proto.mean)  # the round's set moved its own
    assert sum(on.report["gmm_mean_updates"]) > 0
    # from a plain model, the gate's source signal compares the source path's weights, which the round left
    assert on.report["gate_after"]["source"] == 1.0
    gmmhead.install(net, proto, 0.0)  # a round without the setting serves the network alone
    assert net.gmm is None and "gmm.scale" not in net.state_dict()

