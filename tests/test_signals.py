"""Label-free round signals (mas3_edge/signals.py): each asserts a property the signal must have."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from conftest import adapted_copy, domain
from mas3_edge import gate, signals as S, prototypes as P
from mas3_edge.config import ModelConfig
from mas3_edge.errors import UserError
from mas3_edge.model import SegModel


class Tracking(SegModel):
    """z at full resolution from each pixel's brightness: class 0 where it is bright, 1 where dark,
    more confident the further from grey. Its labels move with the content, pixel for pixel."""

    def __init__(self):
        super().__init__(ModelConfig(input_size=(64, 128)))
        self.norm = nn.BatchNorm2d(3)  # identity statistics; the bank needs a norm layer to route on
        self.embed_conv = nn.Conv2d(3, 19, 1)
        self.head = nn.Conv2d(19, 19, 1)
        with torch.no_grad():
            self.embed_conv.weight.zero_(), self.embed_conv.bias.zero_()
            self.embed_conv.weight[0, :, 0, 0], self.embed_conv.weight[1, :, 0, 0] = 1.0, -1.0
            self.embed_conv.bias[2:] = -5.0
            self.head.weight.copy_(torch.eye(19)[:, :, None, None]), self.head.bias.zero_()
        self.finish()
        self.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_conv(self.norm(x))


def _texture(h: int = 64, w: int = 200, seed: int = 0) -> np.ndarray:
    """Smooth random blobs (H, W, 3): flow finds them and the tracking model labels them."""
    import cv2
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8), dtype=np.uint8)
    gray = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _panned(n: int = 6, step: int = 2) -> np.ndarray:
    """A camera panning over the texture by `step` pixels a frame: (n, 64, 128, 3)."""
    big = _texture()
    return np.stack([big[:, t * step:t * step + 128] for t in range(n)])


def _constant(net: SegModel, cls: int = 3) -> SegModel:
    net = copy.deepcopy(net)
    with torch.no_grad():
        net.head.weight.zero_(), net.head.bias.zero_()
        net.head.bias[cls] = 4.0
    return net.eval()


def _conf_pred(net: SegModel, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        conf, pred = torch.softmax(net(net.normalize(torch.from_numpy(frames))), 1).max(1)
    return conf.numpy(), pred.numpy()


def _proto(k: int = 19, d: int = 19, seed: int = 0) -> P.Prototypes:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, d, generator=g) * 0.3
    chol = torch.linalg.cholesky(a @ a.transpose(1, 2) + torch.eye(d))
    return P.Prototypes(torch.full((k,), 1 / k), torch.randn(k, d, generator=g), chol, torch.full((k,), 100.0),
                        {"tau": 0.97})


# ATC


def test_atc_threshold_puts_the_known_accuracy_above_it_and_skips_ignored_pixels():
    net, frames = Tracking(), _panned(4)
    conf, pred = _conf_pred(net, frames)
    rng = np.random.default_rng(0)
    labels = pred.astype(np.uint8)
    wrong = rng.random(labels.shape) < 0.25  # accuracy 0.75 on the labelled pixels
    labels[wrong] = 5
    ignored = conf > np.quantile(conf, 0.8)  # the most confident fifth is unlabelled: counted, it would move t
    labels[ignored] = 255
    t = S.fit_atc(net, list(zip(frames, labels)), batch_size=3)
    valid = ~ignored
    accuracy = (labels[valid] == pred[valid]).mean()
    step = 1 / S.ATC_BINS  # the histogram's resolution: uint8 frames tie many confidences, so no t is exact
    assert (conf[valid] > t + step).mean() <= accuracy <= (conf[valid] > t - step).mean()
    assert (conf[valid] > t).mean() == pytest.approx(accuracy, abs=5e-3)
    assert (conf > t).mean() > accuracy + 0.03  # over all pixels (ignored ones too) the share differs
    assert S.atc(net, frames, t) == pytest.approx((conf > t).mean(), abs=1e-6)


def test_a_model_that_is_always_right_gets_a_threshold_below_every_confidence(small_net):
    frames = domain(60, 200, n=3)
    conf, pred = _conf_pred(small_net, frames)
    t = S.fit_atc(small_net, list(zip(frames, pred.astype(np.uint8))), max_images=2)  # frames 0 and 2
    assert 1 / 19 - 1e-3 < t <= conf[[0, 2]].min()
    assert S.atc(small_net, frames[[0, 2]], t) == 1.0


def test_prototypes_file_round_trips_the_atc_threshold_and_old_files_load_without_it(tmp_path):
    proto = _proto()
    P.save(proto, tmp_path / "old.safetensors", "abc", "s")
    assert P.load(tmp_path / "old.safetensors").atc_threshold is None
    proto.meta["atc_threshold"] = 0.8731234567
    P.save(proto, tmp_path / "new.safetensors", "abc", "s")
    assert P.load(tmp_path / "new.safetensors").atc_threshold == 0.8731234567
    t = {"alpha": proto.alpha, "mean": proto.mean, "counts": proto.counts, "chol": proto.chol.contiguous()}
    for bad in ("1.5", "nan", "high"):
        safetensors.torch.save_file(t, str(tmp_path / "bad.safetensors"), {"atc_threshold": bad})
        with pytest.raises(UserError, match="ATC threshold"):
            P.load(tmp_path / "bad.safetensors")


def test_prototypes_command_stores_and_prints_the_atc_threshold(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from mas3_edge import bundle, synth
    from mas3_edge.cli import app
    synth.write_folder(tmp_path / "src", "synthetic", 2, seed=1)
    res = CliRunner().invoke(app, ["prototypes", "--data", str(tmp_path / "src"), "--bundle", str(tiny_bundle),
                                   "--tau", "0", "--min-count", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ver = bundle.load_version(tiny_bundle)
    stored = P.load(ver.prototypes_path, ver.meta).atc_threshold
    assert stored is not None and 0 < stored < 1 and f"ATC threshold {stored:.4f}" in res.output


# self-disagreement and temporal stability


def test_a_constant_model_never_disagrees_with_itself_and_is_stable_on_a_static_video(small_net):
    still = np.repeat(domain(60, 200, n=1), 5, axis=0)
    const = _constant(small_net)
    assert S.self_disagreement(const, still, p=0.5) == 0.0
    assert S.temporal_stability(const, still) == 1.0
    assert S.temporal_stability(small_net, still) == 1.0  # any model, when nothing moves


def test_self_disagreement_is_zero_without_dropout_and_repeatable(small_net):
    frames = domain(60, 200, n=3)
    assert S.self_disagreement(small_net, frames, p=0.0) == 0.0
    a, b = S.self_disagreement(small_net, frames, p=0.3), S.self_disagreement(small_net, frames, p=0.3)
    assert 0 < a == b < 1


def test_flow_finds_the_pan_and_a_model_that_tracks_content_is_stable():
    video = _panned(6, step=2)
    flow = S.flows(video)
    assert len(flow) == 5 and flow[0].shape == (64, 128, 2)
    assert np.median(flow[2][..., 0]) == pytest.approx(2.0, abs=0.25)  # frame t's x is frame t-1's x + 2
    assert abs(np.median(flow[2][..., 1])) < 0.25
    assert S.temporal_stability(Tracking(), video, flow) > 0.95
    # labels painted at fixed image positions do not follow the pan: far less stable under the same flow
    fixed = torch.from_numpy(np.tile(((np.arange(128) // 2) % 2).astype(np.uint8), (6, 64, 1)))
    assert S._stability(fixed, flow) < 0.3


def test_temporal_stability_refuses_a_flow_of_other_frames(small_net):
    video = _panned(4)
    with pytest.raises(ValueError, match="3 flows for 2 frames"):
        S.temporal_stability(small_net, video[:2], S.flows(video))


# GMM likelihood


@pytest.mark.parametrize("covariance", ["full", "lowrank", "diag"])
def test_log_prob_matches_multivariate_normal_of_the_stored_covariance(covariance):
    stats = P.SufficientStats(3, 70, (0.0,))
    g = torch.Generator().manual_seed(0)
    for j in range(3):
        z = torch.randn(300, 70, generator=g, dtype=torch.float64) @ torch.randn(70, 70, generator=g, dtype=torch.float64)
        stats.update(z / 8 + j, torch.full((300,), j), torch.full((300,), j), torch.ones(300))
    proto = P.finalize(stats, min_count=10, covariance=covariance)
    z, classes = torch.randn(50, 70, generator=g) + 1, torch.randint(0, 3, (50,), generator=g)
    expect = torch.stack([torch.distributions.MultivariateNormal(
        proto.mean[c].double(), covariance_matrix=proto.covariance[c].double()).log_prob(z[i].double())
        for i, c in enumerate(classes.tolist())])
    assert torch.allclose(proto.log_prob(z, classes).double(), expect, rtol=1e-4, atol=1e-3)


def test_gmm_loglik_is_higher_near_the_components_and_undefined_without_a_fitted_class(small_net):
    frames = domain(60, 200, n=3)
    out = S.outputs(small_net, frames)
    proto = _proto()
    for j in range(19):  # each component centred on the embeddings predicted as its class
        if (out.zpred == j).any():
            proto.mean[j] = out.z[out.zpred == j].mean(0)
    near = S.gmm_loglik(small_net, proto, frames)
    far = copy.deepcopy(proto)
    far.mean += 3.0
    assert np.isfinite(near) and S.gmm_loglik(small_net, far, frames) < near - 10
    none = copy.deepcopy(proto)
    none.alpha[out.zpred.unique()] = 0
    assert np.isnan(S.gmm_loglik(small_net, none, frames))


# the round's entry point


def test_round_signals_keys_and_figures(small_net):
    frames = domain(30, 120, n=10, seed=3)
    proto = _proto()
    new = adapted_copy(small_net, frames)
    same = S.round_signals(small_net, copy.deepcopy(small_net), frames, proto)
    assert tuple(same) == S.KEYS and same["atc_new"] is None and same["agreement_plain"] is None
    assert all(same[k] == 0 for k in S.KEYS if k.endswith("_delta") and same[k] is not None)
    assert same["agreement_serving"] == 1.0 and same["agreement_source"] == 1.0

    proto.meta["atc_threshold"] = "0.2"  # as a loaded file holds it
    flow = S.flows(frames)
    sig = S.round_signals(small_net, new, frames, proto, plain=small_net, flow=flow)
    assert all(isinstance(sig[k], float) for k in S.KEYS)
    assert sig["agreement_serving"] == pytest.approx(gate.agreement(small_net, new, S.newest(frames)), abs=1e-9)
    assert sig["agreement_plain"] == sig["agreement_serving"]  # plain is the serving model here
    assert sig["atc_new"] == pytest.approx(S.atc(new, frames, 0.2))
    assert sig["atc_delta"] == pytest.approx(S.atc(new, frames, 0.2) - S.atc(small_net, frames, 0.2))
    assert sig["temporal_stability_new"] == pytest.approx(S.temporal_stability(new, frames, flow))
    assert sig["self_disagreement_new"] == pytest.approx(S.self_disagreement(new, frames))
    assert sig["gmm_loglik_delta"] == pytest.approx(S.gmm_loglik(new, proto, frames)
                                                    - S.gmm_loglik(small_net, proto, frames), rel=1e-5)
    assert sig["agreement_source"] == pytest.approx(S.source_agreement(new, frames), abs=1e-9)
    assert sig["agreement_source"] < 1.0  # the adapted set routes these frames, not the source's
    assert S.round_signals(small_net, new, frames, proto, atc_threshold=0.99)["atc_new"] < sig["atc_new"]


def test_round_signals_read_only_the_newest_block(small_net):
    frames = domain(30, 120, n=20, seed=4)
    proto = _proto()
    a = S.round_signals(small_net, small_net, frames, proto)
    one = S.round_signals(small_net, small_net, frames[-1:], proto)
    assert a == S.round_signals(small_net, small_net, frames[-S.MAX_FRAMES:], proto)
    assert one["temporal_stability_new"] is None and one["temporal_stability_delta"] is None
