"""CoTTA (Wang et al., CVPR 2022): continual test-time adaptation, the published anchor for
continual segmentation (Cityscapes -> ACDC), as one round of the runtime.

Per step, on a batch of target frames:
  1. the teacher (an EMA of the student) predicts; where its confidence is below `ap`, the
     pseudo-label is its prediction averaged over augmentations (scales x flips), else its plain one;
  2. the student takes a cross-entropy step towards the pseudo-labels (all weights, Adam);
  3. the teacher moves towards the student: t <- mt * t + (1 - mt) * s;
  4. stochastic restore: each weight goes back to the source model's value with probability `rst`.
The round's result is the teacher. Published settings for segmentation (ACDC, Segformer): Adam
lr 6e-5 / 8, mt 0.999, rst 0.01, ap 0.69, scales 0.5-2.0 with flips. Batch-norm statistics: as
for Tent, re-estimated on the frames first; the student normalises each batch with its own.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import AdaptConfig
from .model import SegModel
from .stats import stepping
from .steps import configure, freeze
from .torchutil import to_device

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # the published augmentation scales, each with a flip


@torch.no_grad()
def teacher_labels(teacher: SegModel, images: torch.Tensor, ap: float,
                   scales: tuple[float, ...] = SCALES) -> torch.Tensor:
    """(B, H, W) pseudo-labels: the teacher's argmax, or its augmentation average where unsure."""
    x = teacher.normalize(images)  # (B, 3, H, W)
    probs = torch.softmax(teacher(x), 1)  # (B, K, H, W)
    conf, label = probs.max(1)
    unsure = conf < ap
    if unsure.any():
        avg = torch.zeros_like(probs)
        for scale in scales:
            for flip in (False, True):
                k = teacher.config.multiple  # the net needs multiples of k
                size = [max(k, round(n * scale / k) * k) for n in x.shape[2:]]
                xa = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if scale != 1 else x
                xa = xa.flip(3) if flip else xa
                pa = torch.softmax(teacher(xa), 1)
                pa = pa.flip(3) if flip else pa
                avg += F.interpolate(pa, size=probs.shape[2:], mode="bilinear", align_corners=False)
        label = torch.where(unsure, avg.argmax(1), label)
    return label


@torch.no_grad()
def ema_(teacher: SegModel, student: SegModel, mt: float) -> None:
    for t, p in zip(teacher.parameters(), student.parameters()):
        t.mul_(mt).add_(p, alpha=1 - mt)


@torch.no_grad()
def restore_(student: SegModel, source: list[torch.Tensor], rst: float, gen: torch.Generator) -> None:
    for p, p0 in zip(student.parameters(), source):
        if p.requires_grad:
            mask = torch.rand(p.shape, generator=gen) < rst
            p.copy_(torch.where(mask.to(p.device), p0, p))


def cotta_steps(net: SegModel, frames: np.ndarray, cfg: AdaptConfig, progress=None) -> dict:
    """Run CoTTA on `net` in place (cfg.params updated); at the end the net holds the teacher's
    weights. The stochastic restore returns weights to the round's starting ones (in the runtime,
    the served model; in the benchmarks' first round, the source model)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    opt = torch.optim.Adam(configure(net, cfg.params), lr=cfg.lr)
    source = [p.detach().clone() for p in net.parameters()]
    teacher = copy.deepcopy(net).eval()
    teacher.routing = False  # the teacher, like the student, uses the set this round adapts
    log = []
    with stepping(net, batch_stats=True):
        for step in range(cfg.steps):
            idx = torch.randint(0, len(frames), (cfg.batch_size,), generator=gen)
            images = to_device(frames[idx.numpy()], net)
            target = teacher_labels(teacher, images, cfg.cotta_confidence)
            loss = F.cross_entropy(net(net.normalize(images)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_(teacher, net, cfg.cotta_momentum)
            restore_(net, source, cfg.cotta_restore, gen)
            log.append({"step": step, "loss": loss.item()})
            if progress:
                progress(1)
    with torch.no_grad():
        for p, t in zip(net.parameters(), teacher.parameters()):
            p.copy_(t)
    freeze(net)
    return {"steps": log, "seconds": time.perf_counter() - t0}
