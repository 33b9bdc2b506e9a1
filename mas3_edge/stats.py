"""Normalisation statistics, for MAS3 and the baselines alike: AdaBN's re-estimation on the target
frames, the mode of a round's gradient steps, and the statistics following weights that moved."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .model import SegModel
from .torchutil import to_device


def snapshot(net: SegModel) -> list[torch.Tensor]:
    """The network's buffers (statistics and sets), to go back to."""
    return [b.clone() for b in net.buffers()]


@torch.no_grad()
def restore(net: SegModel, saved: list[torch.Tensor]) -> None:
    for b, s in zip(net.buffers(), saved):
        b.copy_(s)


def _running(m: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm layer's running mean and variance (the networks' norms all track them)."""
    assert m.running_mean is not None and m.running_var is not None, f"{type(m).__name__} tracks no statistics"
    return m.running_mean, m.running_var


def batches(n: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) of batches of `size` over n frames, the last one never of a single frame: batch
    statistics of one frame are undefined after a global pool (1 value per channel)."""
    if n < 2:
        raise UserError(f"re-estimating the normalisation statistics needs at least 2 frames, got {n}")
    out = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    if len(out) > 1 and out[-1][1] - out[-1][0] == 1:
        out[-2:] = [(out[-2][0], n)]
    return out


@torch.no_grad()
def reestimate(net: SegModel, frames: np.ndarray, mix: float = 1.0, batch_size: int = 8) -> None:
    """AdaBN: batch-norm statistics := the moments of the mixture (1 - mix) · current + mix · `frames`."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training, _running(m)[0].clone(), _running(m)[1].clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    for lo, hi in batches(len(frames), batch_size):
        net.embed(net.normalize(to_device(frames[lo:hi], net)))
    for m, (momentum, training, mean, var) in zip(bns, saved):
        # moments of the mixture: the variance gains the spread between the two means
        run_mean, run_var = _running(m)
        gap = (run_mean - mean) ** 2
        run_mean.mul_(mix).add_(mean, alpha=1 - mix)
        run_var.mul_(mix).add_(var, alpha=1 - mix).add_(gap, alpha=mix * (1 - mix))
        m.momentum = momentum
        m.train(training)


def settle(net: SegModel, frames: np.ndarray, start: list[torch.Tensor], mix: float) -> None:
    """After gradient steps: re-estimate the statistics from the round's starting ones `start`
    (the weights moved, so the statistics follow them)."""
    restore(net, start)
    reestimate(net, frames, mix)


@contextmanager
def stepping(net: SegModel, batch_stats: bool):
    """The mode of a round's gradient steps: no per-frame routing (the steps adapt the working set);
    with `batch_stats`, each batch normalised with its own statistics (as Tent does), and the
    running statistics the steps drift put back afterwards."""
    saved = snapshot(net) if batch_stats else []
    net.routing = False
    for m in net.modules() if batch_stats else ():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    try:
        yield
    finally:
        net.routing = True
        restore(net, saved)
