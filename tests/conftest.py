"""Shared fixtures: small bundles built in a temporary folder (no training, no network)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mas3_edge import bundle
from mas3_edge.config import ModelConfig
from mas3_edge.model import SegNet

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
