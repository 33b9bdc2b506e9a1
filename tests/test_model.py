"""model: DomainNorm's two normalisation sets, per-frame routing, folding, and old weight files."""
from __future__ import annotations

import copy

import numpy as np
import torch

from conftest import adapted_copy, two_domains
from mas3_edge import adapt
from mas3_edge.model import Deployed, DomainNorm, SegNet, fold_batchnorm


def _logits(net: SegNet, frames: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return net(net.normalize(torch.from_numpy(frames)))


def test_each_frame_gets_the_set_its_domain_is_closest_to(small_net):
    bright, dark = two_domains()
    adapt.reestimate_bn(small_net, bright)
    small_net.mark_source()  # a source model of the bright domain
    adapted = adapted_copy(small_net, dark)
    stem = lambda frames: adapted.encoder.layers[0][0](adapted.normalize(torch.from_numpy(frames)))
    assert adapted.route(stem(bright)).flatten().tolist() == [0, 0, 0]
    assert adapted.route(stem(dark)).flatten().tolist() == [1, 1, 1]
    mixed = np.concatenate([bright[:2], dark[:2]])
    one_set = copy.deepcopy(adapted)
    one_set.routing = False
    got = _logits(adapted, mixed)
    assert _rel(got[:2], _logits(small_net, mixed[:2])) < 1e-4  # bright: exactly the source model
    assert _rel(got[2:], _logits(one_set, mixed[2:])) < 1e-2  # dark: the adapted one (other rounding order)
    assert _rel(got[:2], _logits(one_set, mixed[:2])) > 0.1  # and the two sets really differ


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_folding_keeps_a_routed_model_routed(small_net):
    bright, dark = two_domains(1)
    adapt.reestimate_bn(small_net, bright)
    small_net.mark_source()
    adapted = adapted_copy(small_net, dark)
    frames = np.concatenate([bright[:1], dark[:1]])
    with torch.no_grad():
        ref = Deployed(adapted)(torch.from_numpy(frames))
        got = Deployed(fold_batchnorm(copy.deepcopy(adapted)))(torch.from_numpy(frames))
    assert torch.equal(ref[0], got[0]) and torch.allclose(ref[1], got[1], atol=1e-5)
    assert not any(isinstance(m, DomainNorm) for m in fold_batchnorm(copy.deepcopy(small_net)).modules())


def test_weights_written_before_domain_norm_load_with_one_set(small_net):
    old = {k: v for k, v in small_net.state_dict().items() if ".source_" not in k}
    net = SegNet(small_net.config)
    net.load_weights(old)
    norms = [m for m in net.modules() if isinstance(m, DomainNorm)]
    assert norms and not any(m.routed() for m in norms)
