"""MAS3 adaptation (paper Algorithm 1, Eq. 4): source-free, label-free.

Each step: predict the target batch, draw a pseudo-dataset from the prototype GMM with as many
samples per class as the model PREDICTS on the batch (never target labels), keep the samples
h labels with confidence > τ, and minimise CE(h(z_p), y_p) + λ·SWD(ψ(φ(x_t)), z_p).

`pooled` (the paper) matches all target pixels to all samples; class-conditional matching (the
default's) matches the confidently predicted pixels of each class to that class's component, so the
SWD cannot fall by swapping classes.

What the default really optimises: with only the normalisation layers updated, the classifier h
is frozen and the GMM samples carry no gradient, so Eq. 4's CE term cannot change any weight; it
is computed only when h is trained (`--params all`). The default minimises λ·SWD alone, and since
Adam divides each update by the gradient's own scale, λ changes nothing there: the learning rate
alone sets the strength of the alignment.

This file is the steps alone. The statistics (stats.py), the normalisation set a round adapts
(bank.py) and the choice between the steps and the statistics alone are the round's (rounds.py).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import AdaptConfig
from .errors import UserError
from .model import SegModel
from .prototypes import Prototypes
from .steps import gradient_steps
from .swd import sliced_wasserstein

log = logging.getLogger(__name__)


class TooFewSamples(UserError):
    """Too few GMM samples pass τ: the classifier is rarely that sure (an imported or briefly trained model)."""


def pseudo_dataset(proto: Prototypes, head: nn.Conv2d, hist: torch.Tensor, n: int, tau: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, lines 9–11: z_p ~ GMM with per-class counts ∝ predicted histogram, keep h-conf > τ."""
    weights = hist.float() * (proto.alpha > 0)
    per_class = torch.floor(weights / weights.sum().clamp(min=1) * n + 0.5)
    z, _ = proto.sample(per_class.cpu(), generator)  # sampled on the CPU: one generator, any device
    z = z.to(head.weight.device)
    with torch.no_grad():
        conf, y = torch.softmax(head(z[:, :, None, None]).flatten(1), 1).max(1)  # h is a 1×1 conv
    keep = conf > tau
    return z[keep], y[keep]


def swd_loss(zt: torch.Tensor, pred: torch.Tensor, zp: torch.Tensor, yp: torch.Tensor, cfg: AdaptConfig,
             generator: torch.Generator) -> torch.Tensor:
    """Pooled SWD (paper), or the mean of per-class SWDs when class_conditional (pixels ∝ weight)."""
    if not cfg.class_conditional:
        return sliced_wasserstein(zt, zp, cfg.n_projections, generator=generator)
    terms, weights = [], []
    for j in torch.unique(pred).tolist():
        tj, pj = zt[pred == j], zp[yp == j]
        if tj.shape[0] >= cfg.min_class_pixels and pj.shape[0] >= cfg.min_class_pixels:
            terms.append(sliced_wasserstein(tj, pj, cfg.n_projections, generator=generator))
            weights.append(tj.shape[0])
    if not terms:
        return zt.sum() * 0
    w = torch.tensor(weights, dtype=zt.dtype, device=zt.device)
    return (torch.stack(terms) * w).sum() / w.sum()


def mas3_step(net: SegModel, proto: Prototypes, images: torch.Tensor, cfg: AdaptConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """One term of Eq. 4 on a batch of uint8 frames: (the loss, its parts)."""
    z = net.embed(net.normalize(images))  # (B, D, h, w)
    zt = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
    with torch.no_grad():
        conf, pred = (t.flatten() for t in torch.softmax(net.head(z), 1).max(1))
    all_pixels = False
    if cfg.target_conf > 0:  # only confident pixels are matched to their class's component
        keep = conf >= cfg.target_conf
        all_pixels = bool(keep.sum() < cfg.min_class_pixels)  # too few: match all of them (counted, warned)
        if not all_pixels:
            zt, pred = zt[keep], pred[keep]
    if zt.shape[0] > cfg.swd_pixels:
        idx = torch.randperm(zt.shape[0], generator=generator)[: cfg.swd_pixels].to(zt.device)
        zt, pred = zt[idx], pred[idx]
    hist = torch.bincount(pred, minlength=proto.k).cpu()
    zp, yp = pseudo_dataset(proto, net.head, hist, cfg.gmm_samples, cfg.tau, generator)
    if zp.shape[0] < cfg.min_class_pixels:
        raise TooFewSamples(f"fewer than {cfg.min_class_pixels} GMM samples pass tau={cfg.tau}; lower --tau")
    swd = swd_loss(zt, pred, zp, yp, cfg, generator)
    loss = cfg.lam * swd
    ce = None
    if net.head.weight.requires_grad:  # the CE term reaches h alone (the samples carry no gradient)
        ce = F.cross_entropy(net.head(zp[:, :, None, None]).flatten(1), yp)
        loss = loss + ce
    if not torch.isfinite(loss):
        raise UserError(f"the adaptation loss became {loss.item()}; lower --lr")
    return loss, {"ce": None if ce is None else ce.item(), "swd": swd.item(), "gmm_kept": int(zp.shape[0]),
                  "all_pixels": all_pixels}


def adapt(net: SegModel, proto: Prototypes, frames: np.ndarray, cfg: AdaptConfig, progress=None) -> dict:
    """cfg.steps steps of Eq. 4 in place on uint8 frames (N, H, W, 3), on the net's device."""
    if len(frames) == 0:
        raise UserError("no frames to adapt on")
    out = gradient_steps(net, frames, cfg, lambda n, images, gen: mas3_step(n, proto, images, cfg, gen), progress)
    out["all_pixel_steps"] = sum(s["all_pixels"] for s in out["steps"])
    if out["all_pixel_steps"]:  # the class-conditional match then pairs unconfident pixels with components
        log.warning("%d of %d steps had fewer than %d target pixels predicted with confidence >= %s: their SWD "
                    "matched all pixels", out["all_pixel_steps"], cfg.steps, cfg.min_class_pixels, cfg.target_conf)
    return out
