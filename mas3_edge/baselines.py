"""What a user would pick instead of MAS3, run through the same round interface and step budget.

- none: source-only.
- bn: AdaBN, re-estimate batch-norm statistics on the target frames.
- tent: Tent (Wang et al. 2021), entropy minimisation of the batch-norm affine parameters, batch
  statistics during the steps; the deployed model then takes statistics re-estimated on the
  frames, since the exported graph runs on single frames.
- pseudo: self-training on the model's own confident predictions (confidence > 0.9).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapt import finish, reestimate_bn, to_device
from .config import AdaptConfig
from .labels import IGNORE
from .model import SegNet

PSEUDO_THRESHOLD = 0.9


def _tent_loss(net: SegNet, images: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(net(net.normalize(images)), 1)
    return -(p * p.clamp(min=1e-12).log()).sum(1).mean()


def _pseudo_loss(net: SegNet, images: torch.Tensor) -> torch.Tensor:
    logits = net(net.normalize(images))
    with torch.no_grad():
        conf, target = torch.softmax(logits, 1).max(1)
        target[conf < PSEUDO_THRESHOLD] = IGNORE
    if (target == IGNORE).all():
        return logits.sum() * 0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def run_baseline(net: SegNet, frames: np.ndarray, cfg: AdaptConfig) -> dict:
    """Adapt `net` in place with cfg.method in (none, bn, tent, pseudo)."""
    if cfg.method == "none":
        return {"steps": []}
    source_stats = [b.clone() for b in net.buffers()]
    if cfg.method in ("bn", "tent"):
        reestimate_bn(net, frames, cfg.bn_mix)
    if cfg.method == "bn":
        finish(net, frames, None, cfg.bn_mix, cfg.keep_source)
        return {"steps": []}
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for p in net.parameters():
        p.requires_grad_(cfg.method == "pseudo")
    params = [p for m in bns for p in (m.weight, m.bias)] if cfg.method == "tent" else list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    net.eval()
    for m in bns if cfg.method == "tent" else []:
        m.train()  # Tent normalises with the batch's own statistics
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = _tent_loss if cfg.method == "tent" else _pseudo_loss
    log, net.routing = [], False  # the steps see the statistics being adapted, not a per-frame choice
    for step in range(cfg.steps):
        idx = torch.randint(0, len(frames), (cfg.batch_size,), generator=gen)
        loss = loss_fn(net, to_device(frames[idx.numpy()], net))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"step": step, "loss": loss.item()})
    net.routing = True
    # Tent's steps overwrite the running statistics with batch ones: re-estimate them
    finish(net, frames, source_stats if cfg.method == "tent" else None, cfg.bn_mix, cfg.keep_source)
    return {"steps": log}
