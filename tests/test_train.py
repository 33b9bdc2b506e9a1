"""Source training: a resumed run continues exactly where the interrupted one stopped."""
import numpy as np
import pytest
import torch

from mas3_edge import bundle, train
from mas3_edge.errors import UserError
from mas3_edge.synth import render
from mas3_edge.config import ModelConfig

SMALL = ModelConfig(width_mult=0.25, aspp_channels=16, depth=(1, 1, 1, 1, 1), expansion=2, input_size=(64, 128))


def _data(n=4):
    return [render("synthetic", i, SMALL.input_size) for i in range(n)]


class Interrupted(Exception):
    pass


class DiesAfter(list):
    """A dataset whose reads fail after `n` items: a training run killed mid-way."""

    def __init__(self, items, n):
        super().__init__(items)
        self.left = n

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            raise Interrupted
        return super().__getitem__(i)


def test_resume_continues_exactly(tmp_path):
    data = _data()
    cfg = train.TrainConfig(steps=4, batch_size=2, ckpt_every=2)
    straight = train.train(data, SMALL, cfg, tmp_path / "a", tmp_path / "ca")
    with pytest.raises(Interrupted):  # killed during step 3, after the step-2 checkpoint
        train.train(DiesAfter(data, 5), SMALL, cfg, tmp_path / "b", tmp_path / "cb")
    counted = DiesAfter(data, 100)
    resumed = train.train(counted, SMALL, cfg, tmp_path / "b", tmp_path / "cb", resume=True)
    assert 100 - counted.left == 4  # only steps 3 and 4 ran again
    a, b = bundle.load_version(straight).net.state_dict(), bundle.load_version(resumed).net.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_augment_keeps_labels_aligned_and_pads_nothing():
    img, lbl = render("synthetic", 3, SMALL.input_size)
    a_img, a_lbl = train.augment(img, lbl, SMALL.input_size, np.random.default_rng(0), (1.0, 1.0))
    assert a_img.shape[:2] == a_lbl.shape == SMALL.input_size


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="empty"):
        train.train([], SMALL, train.TrainConfig(steps=1), tmp_path / "b", tmp_path / "c")
