"""The gradient-step loop every stepping method shares (MAS3, Tent, self-training): which
parameters a round updates, and Adam on random batches of the round's frames."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from . import stats
from .config import AdaptConfig
from .model import Encoder, SegModel
from .torchutil import to_device

# loss(net, images uint8 (B, H, W, 3), generator) -> (loss, what to log of the step)
Loss = Callable[[SegModel, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict]]


def configure(net: SegModel, params: str) -> list[nn.Parameter]:
    """Eval mode (gradient steps do not update the statistics); `params` ("norm": the normalisation
    layers' affine parameters, "all": every weight) become the trained ones."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if params == "norm":
        chosen = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    else:
        chosen = list(net.parameters())
    for p in chosen:
        p.requires_grad_(True)
    return chosen


def freeze(net: SegModel) -> None:
    """The end of a round's steps: eval mode, nothing trainable."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)


RECOMPUTE_PIXELS = 2 * 256 * 256  # a step batch at least this large recomputes (2 frames of 256x256)


@contextmanager
def recomputing(net: SegModel, batch_pixels: int) -> Iterator[None]:
    """Recompute the encoder's activations block by block in the backward pass instead of keeping
    them: the edge model keeps 616 MB for one batch of two 256x512 frames, most of a round's peak
    memory on a small device (tools/bench_round.py), for one more forward of the encoder per step. The
    gradients are the same: a block's forward runs again on the same input, and the running
    statistics it moves twice in batch-stats mode are put back after the steps (stats.stepping).
    Networks without such an encoder keep all their activations, and so do small batches (below
    RECOMPUTE_PIXELS), whose activations are a few tens of MB: the extra forward would buy nothing."""
    encoder = getattr(net, "encoder", None)
    if not isinstance(encoder, Encoder) or batch_pixels < RECOMPUTE_PIXELS:
        yield
        return
    encoder.recompute = len(encoder.layers)  # one block a segment: the least kept at once
    try:
        yield
    finally:
        encoder.recompute = 0


def gradient_steps(net: SegModel, frames: np.ndarray, cfg: AdaptConfig, loss: Loss, progress=None) -> dict:
    """cfg.steps Adam steps in place on batches of cfg.batch_size frames drawn with cfg.seed."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    opt = torch.optim.Adam(configure(net, cfg.params), lr=cfg.lr)
    log = []
    with stats.stepping(net, cfg.batch_stats), recomputing(net, cfg.batch_size * frames.shape[1] * frames.shape[2]):
        for step in range(cfg.steps):
            idx = torch.randint(0, len(frames), (cfg.batch_size,), generator=gen)
            value, parts = loss(net, to_device(frames[idx.numpy()], net), gen)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            log.append({"step": step, "loss": value.item(), **parts})
            if progress:
                progress(1)
    freeze(net)
    return {"steps": log, "seconds": time.perf_counter() - t0}
