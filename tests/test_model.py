"""model: DomainNorm's bank of normalisation sets, per-frame routing, folding, and old weight files."""
from __future__ import annotations

import copy

import numpy as np
import torch

from conftest import adapted_copy, domain, two_domains
from mas3_edge import adapt
from mas3_edge.model import Deployed, DomainNorm, SegNet, _one_set, fold_batchnorm


def _logits(net: SegNet, frames: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return net(net.normalize(torch.from_numpy(frames)))


def test_each_frame_gets_the_set_its_domain_is_closest_to(small_net):
    bright, dark = two_domains()
    adapt.reestimate_bn(small_net, bright)
    small_net.mark_source()  # a source model of the bright domain
    adapted = adapted_copy(small_net, dark)
    stem = lambda frames: adapted.stem(torch.from_numpy(frames))
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
    old = {k: v for k, v in small_net.state_dict().items() if not k.endswith(".bank")}
    net = SegNet(small_net.config)
    net.load_weights(old)
    norms = [m for m in net.modules() if isinstance(m, DomainNorm)]
    assert norms and not any(m.routed() for m in norms)


def test_weights_written_with_a_source_set_load_it_as_the_first_row(small_net):
    bright, dark = two_domains()
    adapt.reestimate_bn(small_net, bright)
    small_net.mark_source()
    adapted = adapted_copy(small_net, dark)
    old = {k: v for k, v in adapted.state_dict().items() if not k.endswith(".bank")}
    for name, m in small_net.named_modules():  # the two-set format: source_* beside the working set
        if isinstance(m, DomainNorm):
            old.update({f"{name}.source_{k}": v for k, v in zip(("mean", "var", "weight", "bias"), m.working())})
    net = SegNet(small_net.config)
    net.load_weights(old)
    assert torch.equal(_logits(net.eval(), dark), _logits(adapted, dark))
    assert torch.equal(_logits(net, bright), _logits(adapted, bright))


def test_banks_of_different_sizes_save_and_load(small_net, tmp_path):
    bright, dark = two_domains()
    adapt.reestimate_bn(small_net, bright)
    small_net.mark_source()
    net = adapted_copy(small_net, dark)
    net.activate_set(None, keep=8)  # dark's set banked, a fresh one from the source's to work on
    adapt.reestimate_bn(net, domain(100, 140))
    assert {len(m.bank) for m in net.modules() if isinstance(m, DomainNorm)} == {2}
    loaded = SegNet(net.config)
    loaded.load_weights(net.state_dict())
    assert torch.equal(_logits(loaded.eval(), dark), _logits(net, dark))


def test_a_layer_called_on_its_own_uses_the_working_set_not_an_earlier_batchs_route(small_net):
    bright, dark = two_domains()
    adapt.reestimate_bn(small_net, bright)
    small_net.mark_source()
    net = adapted_copy(small_net, dark)  # two sets: embed routes each frame
    working = _one_set(net, -1).decoder  # the decoder with the working set and nothing else
    c = net.encoder.out_channels
    with torch.no_grad():
        net.embed(net.normalize(torch.from_numpy(bright[:2])))  # a batch of 2, routed to the source set
        for batch in (3, 2):  # another batch size, and the same one: neither sees that route
            x = torch.randn(batch, c, 8, 16)
            assert torch.allclose(net.decoder(x), working(x), atol=1e-5)
    assert all(m.state.route is None and not m.state.active for m in net.modules() if isinstance(m, DomainNorm))
