"""Issue 15's parts: gate signals no method optimises, CoTTA, the per-round steps-or-statistics
choice, refining a set across rounds, Eq. 4's CE term, and the camera-change shift."""
import copy

import numpy as np
import pytest
import torch
from conftest import adapted_copy, domain, two_domains
from test_adapt import _fit_proto, proto_bundle  # noqa: F401 (a fixture)

from mas3_edge import adapt, bundle, cotta, gate, rounds, shifts, synth, stats, bank
from mas3_edge.steps import configure
from mas3_edge.config import AdaptConfig
from mas3_edge.model import DomainNorm


def _scenes(n: int = 3) -> np.ndarray:
    return np.stack([synth.render("realistic", i, (64, 128))[0] for i in range(n)])


def _sensitive(net, frames):
    """An untrained net predicts one class everywhere; this head amplifies each pixel's deviation
    from the mean embedding, so predictions vary across the frame as a trained net's do."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        z_mean = net.embed(net.normalize(torch.from_numpy(frames))).mean((0, 2, 3))
        w = torch.randn(net.head.weight.shape, generator=torch.Generator().manual_seed(0)) * 50
        net.head.weight.copy_(w), net.head.bias.copy_(-w[:, :, 0, 0] @ z_mean)
    return net


def test_a_constant_prediction_is_perfectly_consistent_and_a_noisy_one_is_not(small_net):
    frames = _scenes()
    noisy = _sensitive(small_net, frames)
    assert 0 <= gate.consistency(noisy, frames) < 1  # its prediction changes under a flip, a rescale, jitter
    const = copy.deepcopy(small_net)
    with torch.no_grad():
        const.head.weight.zero_(), const.head.bias.zero_(), const.head.bias[3].fill_(5.0)
    assert gate.consistency(const, frames) == 1.0


def test_agreement_with_itself_is_one_and_with_another_head_less(small_net):
    frames = np.stack([synth.render("realistic", i, (64, 128))[0] for i in range(3)])
    assert gate.agreement(small_net, small_net, frames) == 1.0
    other = copy.deepcopy(small_net)
    with torch.no_grad():
        other.head.bias.copy_(torch.arange(19.0))  # predicts the last class everywhere
    assert gate.agreement(small_net, other, frames) < 0.9
    assert gate.agreement(small_net, other, frames, top=0.2) < 1.0


def test_the_source_path_is_untouched_by_a_bank_and_moved_by_one_set(small_net):
    bright, dark = two_domains()
    stats.reestimate(small_net, bright)
    bank.mark_source(small_net)
    banked = adapted_copy(small_net, dark)  # the source set stays beside the adapted one
    one_set = adapted_copy(small_net, dark)
    bank.mark_source(one_set)  # a baseline as published: the adapted set is the only one
    frames = np.concatenate([bright, dark])
    assert gate.agreement(bank.source_path(small_net), bank.source_path(banked), frames) == 1.0
    assert gate.agreement(bank.source_path(small_net), bank.source_path(one_set), frames) < 0.97


def test_gate_accept_names_what_failed():
    good = {"consistency": 0.2, "retained": 0.5, "source": 1.0}  # consistency is reported, not gated
    assert gate.gate_accept(good) == (True, "gate signals held")
    assert "kept their label" in gate.gate_accept({**good, "retained": 0.2})[1]
    assert "source path changed" in gate.gate_accept({**good, "source": 0.9})[1]


def test_cotta_pseudo_labels_average_augmentations_only_where_the_teacher_is_unsure(small_net):
    frames = _scenes(2)
    net, images = _sensitive(small_net, frames), torch.from_numpy(frames)
    plain = torch.softmax(net(net.normalize(images)), 1).max(1)[1]
    sure = cotta.teacher_labels(net, images, ap=0.0)
    assert torch.equal(sure, plain)
    unsure = cotta.teacher_labels(net, images, ap=1.01)
    assert not torch.equal(unsure, plain)  # the augmentation average differs somewhere


def test_cotta_round_moves_all_weights_and_keeps_one_set(small_net):
    before = copy.deepcopy(small_net)
    (cand,) = rounds.candidates(small_net, None, domain(0, 256, n=4), AdaptConfig(method="cotta", steps=2, lr=1e-3))
    assert len(cand.log["steps"]) == 2 and cand.net is small_net
    moved = [n for (n, p), q in zip(small_net.named_parameters(), before.parameters()) if not torch.equal(p, q)]
    assert "encoder.layers.0.0.weight" in moved and "head.weight" in moved  # conv weights too, not only the norms
    assert all(len(m.bank) == 1 for m in small_net.modules() if isinstance(m, DomainNorm))


def test_ce_term_only_where_it_can_change_a_weight(small_net):
    proto = _fit_proto(small_net)
    images = torch.from_numpy(domain(0, 256, n=2))
    gen = torch.Generator().manual_seed(0)
    for params, has_ce in (("norm", False), ("all", True)):
        net = copy.deepcopy(small_net)
        configure(net, params)
        _, parts = adapt.mas3_step(net, proto, images, AdaptConfig(params=params, tau=0.0, gmm_samples=512), gen)
        assert (parts["ce"] is not None) == has_ce


def test_a_round_keeps_the_steps_only_when_they_are_as_consistent(proto_bundle):  # noqa: F811
    frames = domain(0, 256, n=10)
    cfg = AdaptConfig(steps=2, tau=0.0, swd_pixels=256, gmm_samples=512)
    rep = rounds.run_round(proto_bundle, frames, cfg, rcfg=rounds.UNGUARDED).report
    c = rep["choice"]
    kept = "steps" if c["consistency_steps"] >= c["consistency_statistics"] + cfg.choice_margin else "statistics only"
    assert c["kept"] == kept and set(rep["gate_after"]) == set(gate.GATE)
    off = rounds.run_round(proto_bundle, frames, AdaptConfig(**{**cfg.to_dict(), "choose": False}), rcfg=rounds.UNGUARDED)
    assert "choice" not in off.report
    strict = rounds.run_round(proto_bundle, frames, AdaptConfig(**{**cfg.to_dict(), "choice_margin": 0.99}), rcfg=rounds.UNGUARDED)
    assert strict.report["choice"]["kept"] == "statistics only"  # no consistency is 0.99 above another


def test_refining_a_set_pools_its_statistics_with_the_past(proto_bundle):  # noqa: F811
    first, second = domain(0, 90, n=10, seed=1), domain(10, 100, n=10, seed=2)
    stem_mean = lambda vdir: [m for m in bundle.load_version(vdir).net.modules()  # noqa: E731
                              if isinstance(m, DomainNorm)][0].running_mean.clone()
    results = {}
    for mix in (1.0, 0.5):
        cfg = AdaptConfig(steps=0, refine_mix=mix)
        r1 = rounds.run_round(proto_bundle, first, cfg, rcfg=rounds.UNGUARDED)
        r2 = rounds.run_round(proto_bundle, second, cfg, version=r1.version_dir.name, rcfg=rounds.UNGUARDED)
        assert (r1.report["set"], r2.report["set"]) == ("new", "working")
        results[mix] = (stem_mean(r1.version_dir), stem_mean(r2.version_dir))
    prev, alone = results[1.0]
    assert torch.allclose(results[0.5][1], (prev + alone) / 2, atol=1e-4)


def test_a_refining_round_does_not_compound_the_steps(proto_bundle):  # noqa: F811
    # a second round on the same chunk, its statistics not pooled, gives the same set as the
    # first: its steps start again from the source's affine parameters instead of adding to them
    frames = domain(0, 256, n=10)
    cfg = AdaptConfig(steps=3, tau=0.0, swd_pixels=256, gmm_samples=512, refine_mix=1.0, choose=False)
    r1 = rounds.run_round(proto_bundle, frames, cfg, rcfg=rounds.UNGUARDED)
    r2 = rounds.run_round(proto_bundle, frames, cfg, version=r1.version_dir.name, rcfg=rounds.UNGUARDED)
    assert (r1.report["set"], r2.report["set"]) == ("new", "working")
    first, second = (bundle.load_version(r.version_dir).net.state_dict() for r in (r1, r2))
    source = bundle.load_version(proto_bundle, r1.report["parent"]).net.state_dict()
    moved = [k for k in first if k.endswith(".weight") and not torch.equal(first[k], source[k])]
    assert moved and all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_camera_change_keeps_label_ids_and_moves_the_scene():
    img, lbl = synth.render("realistic", 5, (64, 128))
    out, out_lbl = shifts.camera_change(img, lbl)
    assert out.shape == img.shape and out_lbl.shape == lbl.shape and out.dtype == np.uint8
    assert set(np.unique(out_lbl)) <= set(np.unique(lbl)) | {255}
    assert (out_lbl != lbl).mean() > 0.1 and np.abs(out.astype(int) - img).mean() > 5
    again, _ = shifts.camera_change(img, lbl)
    assert np.array_equal(out, again)


def test_cotta_settings_are_the_published_ones():
    s = AdaptConfig(method="cotta")
    assert (s.cotta_momentum, s.cotta_restore, s.cotta_confidence) == (0.999, 0.01, 0.69)
    assert cotta.SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    assert AdaptConfig(method="cotta").lr == pytest.approx(6e-5 / 8) and AdaptConfig(method="cotta").params == "all"
