"""Unsupervised health signals: how far a model's view of unlabeled frames is from the prototypes.

Used to accept or reject an adaptation round (no labels on the device) and as the drift trigger.
All are "lower is better": SWD of embeddings to GMM samples (pooled and per predicted class),
mean normalised prediction entropy, and the KL divergence of the predicted class prior from α.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import RoundConfig
from .model import SegModel
from .prototypes import Prototypes
from .swd import random_directions, sliced_wasserstein
from .torchutil import to_device

SIGNALS = ("swd", "swd_class", "entropy", "prior_kl")


@torch.no_grad()
def embed_frames(net: SegModel, frames: np.ndarray, batch_size: int = 2):
    """-> embeddings (N*h*w, D), predicted class (N*h*w,), probabilities (N*h*w, K)."""
    zs, ps = [], []
    for i in range(0, len(frames), batch_size):
        z = net.embed(net.normalize(to_device(frames[i:i + batch_size], net)))
        zs.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        ps.append(torch.softmax(net.head(z), 1).permute(0, 2, 3, 1).reshape(-1, net.config.num_classes))
    z, p = torch.cat(zs), torch.cat(ps)
    return z, p.argmax(1), p


@torch.no_grad()
def signals(net: SegModel, proto: Prototypes, frames: np.ndarray, max_pixels: int = 32768, seed: int = 0) -> dict:
    """Health of `net` on `frames`; fixed seeds so that two models are compared on equal terms."""
    gen = torch.Generator().manual_seed(seed)
    z, pred, p = (t.cpu() for t in embed_frames(net, frames))
    entropy = float((-(p * p.clamp(min=1e-12).log()).sum(1)).mean() / math.log(p.shape[1]))
    hist = torch.bincount(pred, minlength=proto.k).float()
    prior = hist / hist.sum()
    alpha = proto.alpha.clamp(min=1e-6)
    prior_kl = float((prior * (prior.clamp(min=1e-12) / alpha).log()).sum())
    idx = torch.randperm(z.shape[0], generator=gen)[:max_pixels]
    z, pred = z[idx], pred[idx]
    zp, yp = proto.sample(torch.floor(proto.alpha * max_pixels + 0.5), gen)
    theta = random_directions(proto.d, 128, gen)
    swd = float(sliced_wasserstein(z, zp, projections=theta))
    per_class = [(float(sliced_wasserstein(z[pred == j], zp[yp == j], projections=theta)), int((pred == j).sum()))
                 for j in range(proto.k) if (pred == j).sum() >= 16 and (yp == j).sum() >= 16]
    swd_class = sum(s * n for s, n in per_class) / max(1, sum(n for _, n in per_class))
    return {"swd": swd, "swd_class": swd_class, "entropy": entropy, "prior_kl": prior_kl}


def drift_score(net: SegModel, proto: Prototypes, frames: list[np.ndarray] | np.ndarray) -> float:
    """The drift trigger: pooled SWD between the live embeddings and the GMM."""
    return signals(net, proto, np.stack(list(frames)))["swd"]


def accept(before: dict, after: dict, tolerance: float = RoundConfig.health_tolerance) -> tuple[bool, str]:
    """A round is accepted unless a signal got worse by more than `tolerance` (relative) or is NaN."""
    from .decide import health_checks
    failed = next((c for c in health_checks(before, after, tolerance) if not c.passed), None)
    return (True, "all health signals held or improved") if failed is None else (False, failed.message)
