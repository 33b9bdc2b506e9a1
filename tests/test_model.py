"""model: DomainNorm's bank of normalisation sets, per-frame routing, folding."""
from __future__ import annotations

import copy

import numpy as np
import torch

from conftest import adapted_copy, domain, two_domains
from mas3_edge import stats, bank
from mas3_edge.model import Deployed, DomainNorm, SegNet, fold_batchnorm


def _logits(net: SegNet, frames: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return net(net.normalize(torch.from_numpy(frames)))


def test_each_frame_gets_the_set_its_domain_is_closest_to(small_net):
    bright, dark = two_domains()
    stats.reestimate(small_net, bright)
    bank.mark_source(small_net)  # a source model of the bright domain
    adapted = adapted_copy(small_net, dark)

    def stem(frames):
        return adapted.stem(torch.from_numpy(frames))

    assert bank.route(adapted, stem(bright)).flatten().tolist() == [0, 0, 0]
    assert bank.route(adapted, stem(dark)).flatten().tolist() == [1, 1, 1]
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
    stats.reestimate(small_net, bright)
    bank.mark_source(small_net)
    adapted = adapted_copy(small_net, dark)
    frames = np.concatenate([bright[:1], dark[:1]])
    with torch.no_grad():
        ref = Deployed(adapted)(torch.from_numpy(frames))
        got = Deployed(fold_batchnorm(copy.deepcopy(adapted)))(torch.from_numpy(frames))
    assert torch.equal(ref[0], got[0]) and torch.allclose(ref[1], got[1], atol=1e-5)
    assert not any(isinstance(m, DomainNorm) for m in fold_batchnorm(copy.deepcopy(small_net)).modules())


def test_weights_of_plain_batch_norms_load_as_one_set(small_net):
    plain = {k: v for k, v in small_net.state_dict().items() if not k.endswith(".bank")}
    net = SegNet(small_net.config)
    net.load_weights(plain)
    norms = bank.norms(net)
    assert norms and not bank.routed(net) and all(len(m.bank) == 1 for m in norms)


def test_banks_of_different_sizes_save_and_load(small_net, tmp_path):
    bright, dark = two_domains()
    stats.reestimate(small_net, bright)
    bank.mark_source(small_net)
    net = adapted_copy(small_net, dark)
    bank.add_set(net, keep=8)  # dark's set banked, a fresh one from the source's to work on
    stats.reestimate(net, domain(100, 140))
    assert {len(m.bank) for m in net.modules() if isinstance(m, DomainNorm)} == {2}
    loaded = SegNet(net.config)
    loaded.load_weights(net.state_dict())
    assert torch.equal(_logits(loaded.eval(), dark), _logits(net, dark))


def test_a_layer_called_on_its_own_uses_the_working_set_not_an_earlier_batchs_route(small_net):
    bright, dark = two_domains()
    stats.reestimate(small_net, bright)
    bank.mark_source(small_net)
    net = adapted_copy(small_net, dark)  # two sets: embed routes each frame
    working = bank.one_set(net, -1).decoder  # the decoder with the working set and nothing else
    c = net.encoder.out_channels
    with torch.no_grad():
        net.embed(net.normalize(torch.from_numpy(bright[:2])))  # a batch of 2, routed to the source set
        for batch in (3, 2):  # another batch size, and the same one: neither sees that route
            x = torch.randn(batch, c, 8, 16)
            assert torch.allclose(net.decoder(x), working(x), atol=1e-5)
    assert all(m.state.route is None and not m.state.active for m in net.modules() if isinstance(m, DomainNorm))
