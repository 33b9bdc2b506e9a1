"""Shared fixtures: small bundles built in a temporary folder (no training, no network)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mas3_edge import bank, bundle, stats
from mas3_edge.config import ModelConfig
from mas3_edge.model import DomainNorm, SegNet

SMALL = ModelConfig(preset="tiny", width_mult=0.25, aspp_channels=16, input_size=(64, 128))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests share two cores with whatever else runs: one torch thread is as fast on these tiny
    inputs and avoids OpenMP workers spinning against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_net() -> SegNet:
    torch.manual_seed(0)
    return SegNet(SMALL).eval()


@pytest.fixture
def tiny_bundle(tmp_path: Path, small_net: SegNet) -> Path:
    """A bundle root with one served version of an untrained small network."""
    root = tmp_path / "bundle"
    bundle.save_version(root, small_net, info={"note": "untrained test model"})
    return root


def two_domains(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright frames and dark ones: far apart in the stem's channel statistics."""
    rng = np.random.default_rng(seed)
    bright = rng.integers(120, 256, (3, 64, 128, 3), dtype=np.uint8)
    dark = rng.integers(0, 100, (3, 64, 128, 3), dtype=np.uint8)
    return bright, dark


def domain(lo: int, hi: int, n: int = 12, seed: int = 0) -> np.ndarray:
    """n frames of pixel values about [lo, hi), the range moved by up to 10 per frame: a domain
    whose frames vary a little, so a chunk has a spread to be compared with."""
    rng = np.random.default_rng(seed)
    edges = [(max(lo + rng.integers(-10, 10), 0), min(hi + rng.integers(-10, 10), 256)) for _ in range(n)]
    return np.stack([rng.integers(a, b, (64, 128, 3), dtype=np.uint8) for a, b in edges])


def adapted_copy(net: SegNet, frames: np.ndarray) -> SegNet:
    """A copy whose adapted set follows `frames` (statistics and affine); the source set stays."""
    out = copy.deepcopy(net)
    stats.reestimate(out, frames)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, DomainNorm):
                m.weight.mul_(1.1), m.bias.add_(0.05)
    return out.eval()


def three_set_model(net: SegNet) -> tuple[SegNet, np.ndarray]:
    """`net` made a source model of bright frames, then adapted to dark (banked) and to grey (the
    working set): three sets. With three frames of each domain, in that order."""
    bright, dark = two_domains(2)
    grey = domain(100, 140, n=3)
    stats.reestimate(net, bright)
    bank.mark_source(net)
    net = adapted_copy(net, dark)
    bank.add_set(net, keep=8)
    return adapted_copy(net, grey), np.concatenate([bright, dark, grey])
