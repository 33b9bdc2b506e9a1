"""Gate signals that no adaptation method optimises, so a round cannot pass by gaming them.

The health signals (health.py: SWD to the prototypes, entropy, class-prior KL) are what MAS3 and
Tent minimise: a round that drifts a whole class into another can improve every one of them. The
signals here are checked beside them, all "higher is better", all in [0, 1]:

- consistency: how often the prediction of a held-out frame survives a flip, a rescale and a
  colour change (augmentation agreement). Adaptation never sees these augmentations. Reported,
  and used to choose between a round's candidates, but not a gate (see gate_accept).
- retained: agreement of the new model with the model it replaces on the pixels that model was
  most sure of. A round may fix uncertain pixels; relabelling the confident ones wholesale (the
  grass of a plaza turning into building) is drift, not adaptation.
- source: agreement of the new model's source path (its source normalisation set, or its only
  set) with the lineage's source model, on the same frames. Computable on the device with no
  source data; 1.0 when the round left the source path alone (the bank), lower when a round's
  weight changes reach the source domain too (all-weight self-training, one-set baselines).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .bank import source_path
from .config import RoundConfig
from .model import SegModel
from .torchutil import to_device

GATE = ("consistency", "retained", "source")


def _logits(net: SegModel, images: torch.Tensor) -> torch.Tensor:
    return net(net.normalize(images))  # (B, K, H, W)


def _jitter(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and gamma on uint8 frames (B, H, W, 3), one draw per frame."""
    x = images.float() / 255
    b, c, g = (torch.empty(len(x), 1, 1, 1).uniform_(lo, hi, generator=gen).to(x.device)
               for lo, hi in ((0.8, 1.2), (0.8, 1.2), (0.8, 1.25)))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean) * b
    return (x.clamp(0, 1) ** g * 255).round().to(torch.uint8)


def _views(net: SegModel, x: torch.Tensor, images: torch.Tensor, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The logits (B, K, H, W) under flip, 0.75x scale and jitter, one at a time: each is 80 MB for
    8 frames at 256x512 and 19 classes, and a small device's round has no room for three."""
    h, w = x.shape[2:]
    k = net.config.multiple  # the network takes multiples of k
    yield net(x.flip(3)).flip(3)
    small = F.interpolate(x, size=(max(k, round(h * 0.75 / k) * k), max(k, round(w * 0.75 / k) * k)),
                          mode="bilinear", align_corners=False)
    yield F.interpolate(net(small), size=(h, w), mode="bilinear", align_corners=False)
    yield _logits(net, _jitter(images, gen))


@torch.no_grad()
def consistency(net: SegModel, frames: np.ndarray, max_frames: int = RoundConfig.consistency_frames,
                batch_size: int = 8, seed: int = 0) -> float:
    """Mean pixel agreement of the plain prediction with those under flip, 0.75x scale and jitter,
    on at most `max_frames` of `frames`, evenly spaced (four passes per frame)."""
    frames = frames[np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).astype(int)]
    gen, agree, n = torch.Generator().manual_seed(seed), 0.0, 0
    for i in range(0, len(frames), batch_size):
        images = to_device(frames[i:i + batch_size], net)
        x = net.normalize(images)
        pred = net(x).argmax(1)  # (B, H, W)
        views = _views(net, x, images, gen)
        agree += sum(float((v.argmax(1) == pred).float().mean()) for v in views) / 3 * len(images)
        n += len(images)
    return agree / max(n, 1)


@torch.no_grad()
def agreement(reference: SegModel, net: SegModel, frames: np.ndarray, top: float = 1.0, batch_size: int = 8) -> float:
    """Pixel agreement of `net` with `reference`, on the `top` fraction of pixels `reference` is
    most confident about (1.0: all pixels)."""
    agree, n = 0.0, 0
    for i in range(0, len(frames), batch_size):
        images = to_device(frames[i:i + batch_size], net)
        conf, ref = torch.softmax(_logits(reference, images), 1).max(1)
        same = (_logits(net, images).argmax(1) == ref).flatten()
        keep = conf.flatten() >= torch.quantile(conf.flatten().float()[:1_000_000], 1 - top) if top < 1 else None
        same = same if keep is None else same[keep]
        agree, n = agree + float(same.float().sum()), n + same.numel()
    return agree / max(n, 1)


def gate_signals(serving: SegModel, new: SegModel, source: SegModel, frames: np.ndarray,
                 rcfg: RoundConfig = RoundConfig()) -> dict:
    """The three gate signals of `new` (its consistency alone; the others against `serving` and
    the lineage's `source`), on held-out frames."""
    new_source = source_path(new)
    if source.gmm is None:  # a round never moves the fused classifier's source means (the prototypes):
        new_source.gmm = None  # the question is whether it moved the source path's weights
    return {"consistency": consistency(new, frames, rcfg.consistency_frames),
            "retained": agreement(serving, new, frames, top=0.5),
            "source": agreement(source_path(source), new_source, frames)}


def gate_accept(after: dict, rcfg: RoundConfig = RoundConfig()) -> tuple[bool, str]:
    """Reject a round that relabelled most of the serving model's confident pixels (wholesale
    drift) or moved the source path. Consistency is reported, not gated: on the tuning targets
    every good round of the shipped method lowered it as often as not (the source model is
    consistently wrong under a strong shift), and self-training's collapse raised it."""
    from .decide import gate_checks
    failed = next((c for c in gate_checks(after, rcfg) if not c.passed), None)
    return (True, "gate signals held") if failed is None else (False, failed.message)
