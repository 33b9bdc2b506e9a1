"""What a user would pick instead of MAS3, run through the same round interface and step budget.

- none: source-only.
- bn: AdaBN, re-estimate batch-norm statistics on the target frames.
- tent: Tent (Wang et al. 2021), entropy minimisation of the batch-norm affine parameters, batch
  statistics during the steps; the deployed model then takes statistics re-estimated on the
  frames, since the exported graph runs on single frames.
- pseudo: self-training on the model's own confident predictions (confidence > 0.9).
- cotta: CoTTA (Wang et al. 2022), mean teacher with augmentation-averaged pseudo-labels and
  stochastic restore (cotta.py), all weights, at its published settings for segmentation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .adapt import configure, finish, reestimate_bn, stepping
from .config import AdaptConfig
from .cotta import cotta_steps
from .labels import IGNORE
from .model import SegModel
from .torchutil import to_device

PSEUDO_THRESHOLD = 0.9


def _tent_loss(net: SegModel, images: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(net(net.normalize(images)), 1)
    return -(p * p.clamp(min=1e-12).log()).sum(1).mean()


def _pseudo_loss(net: SegModel, images: torch.Tensor) -> torch.Tensor:
    logits = net(net.normalize(images))
    with torch.no_grad():
        conf, target = torch.softmax(logits, 1).max(1)
        target[conf < PSEUDO_THRESHOLD] = IGNORE
    if (target == IGNORE).all():
        return logits.sum() * 0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def run_baseline(net: SegModel, frames: np.ndarray, cfg: AdaptConfig) -> dict:
    """Adapt `net` in place with cfg.method in (none, bn, tent, pseudo, cotta)."""
    if cfg.method == "none":
        return {"steps": []}
    source_stats = [b.clone() for b in net.buffers()]
    if cfg.method in ("bn", "tent", "cotta"):
        reestimate_bn(net, frames, cfg.bn_mix)
    if cfg.method == "bn":
        finish(net, frames, None, cfg.bn_mix, cfg.keep_source)
        return {"steps": []}
    if cfg.method == "cotta":
        log = cotta_steps(net, frames, configure(net, cfg), cfg)
        finish(net, frames, source_stats, cfg.bn_mix, cfg.keep_source)
        return {"steps": log}
    opt = torch.optim.Adam(configure(net, cfg), lr=cfg.lr)  # tent: the norms' affine; pseudo: all weights
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = _tent_loss if cfg.method == "tent" else _pseudo_loss
    log = []
    with stepping(net, cfg.batch_stats):  # Tent normalises each batch with its own statistics
        for step in range(cfg.steps):
            idx = torch.randint(0, len(frames), (cfg.batch_size,), generator=gen)
            loss = loss_fn(net, to_device(frames[idx.numpy()], net))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.append({"step": step, "loss": loss.item()})
    # the weights moved: re-estimate the adapted statistics from the round's starting ones
    finish(net, frames, source_stats if cfg.bn == "adapt" else None, cfg.bn_mix, cfg.keep_source)
    return {"steps": log}
