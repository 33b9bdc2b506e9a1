"""The step objectives of the baselines a user would pick instead of MAS3; the round (rounds.py)
runs them with the same statistics, sets and step budget as MAS3's.

- none: source-only. bn: AdaBN, statistics re-estimated on the target frames, no steps.
- tent: Tent (Wang et al. 2021), entropy minimisation of the batch-norm affine parameters with
  batch statistics during the steps; the deployed model then takes statistics re-estimated on the
  frames, since the exported graph runs on single frames.
- pseudo: self-training on the model's own confident predictions.
- cotta: CoTTA (Wang et al. 2022): cotta.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .labels import IGNORE
from .model import SegModel
from .steps import Loss


def entropy(net: SegModel, images: torch.Tensor, _gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Tent's objective: the mean per-pixel entropy of the prediction."""
    p = torch.softmax(net(net.normalize(images)), 1)
    return -(p * p.clamp(min=1e-12).log()).sum(1).mean(), {}


def self_training(threshold: float) -> Loss:
    """Cross-entropy towards the model's own predictions where it is more than `threshold` sure."""
    def loss(net: SegModel, images: torch.Tensor, _gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        logits = net(net.normalize(images))
        with torch.no_grad():
            conf, target = torch.softmax(logits, 1).max(1)
            target[conf < threshold] = IGNORE
        if (target == IGNORE).all():
            return logits.sum() * 0, {}
        return F.cross_entropy(logits, target, ignore_index=IGNORE), {}
    return loss
