"""MAS3 adaptation (paper Algorithm 1, Eq. 4): source-free, label-free.

Each step: predict the target batch, draw a pseudo-dataset from the prototype GMM with as many
samples per class as the model PREDICTS on the batch (never target labels), keep the samples
h labels with confidence > τ, and minimise CE(h(z_p), y_p) + λ·SWD(ψ(φ(x_t)), z_p).

`mas3-paper` is Algorithm 1 as written (pooled SWD, frozen batch-norm statistics). `mas3`, the
default, adds what the measurements in the README call for: batch-norm statistics re-estimated on
the target frames and each step's batch normalised with its own (`batch_stats`, as Tent does),
class-conditional matching of the confidently predicted target pixels (`target_conf`: each class
against its own component, so the SWD cannot fall by swapping classes), only the normalisation
layers updated, and a bank of normalisation sets (model.DomainNorm): the source model's, kept
unchanged, and one per domain adapted to. Each frame is normalised with the set its stem
statistics are closest to, and a round adapts the set of its chunk's domain or starts a new one
(`select_set`), so adapting to one domain costs neither the source nor the domains before it.

What the default really optimises: with only the normalisation layers updated, the classifier h
is frozen and the GMM samples carry no gradient, so Eq. 4's CE term cannot change any weight; it
is computed only when h is trained (`--params all`). The default minimises λ·SWD alone, and since
Adam divides each update by the gradient's own scale, λ changes nothing there: the learning rate
alone sets the strength of the alignment. A round (rounds.py) also keeps the steps only when they
beat re-estimated statistics alone on a signal neither optimised (`choose`).

Algorithm 1 is the first half of this file (pseudo_dataset, swd_loss, mas3_step, adapt); the
normalisation statistics follow. A round on a bundle (held-out frames, health check, a new
version) is `rounds.run_round`.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import AdaptConfig
from .errors import UserError
from .model import DomainNorm, SegModel, gaussian_kl
from .prototypes import Prototypes
from .swd import sliced_wasserstein
from .torchutil import to_device

log = logging.getLogger(__name__)

MIN_CLASS_PIXELS = 16  # a predicted class needs this many target pixels to get its own SWD term
SAME_DOMAIN = 4.0  # a chunk within this many times its own spread of an adapted set is of its domain


def configure(net: SegModel, cfg: AdaptConfig) -> list[nn.Parameter]:
    """Train mode off (BN statistics are not updated by gradient steps); choose the updated params."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if cfg.params == "norm":
        params = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    elif cfg.params == "encdec":
        params = list(net.encoder.parameters()) + list(net.decoder.parameters())
    else:
        params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


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
        if tj.shape[0] >= MIN_CLASS_PIXELS and pj.shape[0] >= MIN_CLASS_PIXELS:
            terms.append(sliced_wasserstein(tj, pj, cfg.n_projections, generator=generator))
            weights.append(tj.shape[0])
    if not terms:
        return zt.sum() * 0
    w = torch.tensor(weights, dtype=zt.dtype, device=zt.device)
    return (torch.stack(terms) * w).sum() / w.sum()


def mas3_step(net: SegModel, proto: Prototypes, images: torch.Tensor, cfg: AdaptConfig,
              generator: torch.Generator, anchor: list[torch.Tensor] | None = None) -> dict:
    """One term of Eq. 4 on a batch of uint8 frames; returns the loss and its parts."""
    z = net.embed(net.normalize(images))  # (B, D, h, w)
    zt = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
    with torch.no_grad():
        conf, pred = (t.flatten() for t in torch.softmax(net.head(z), 1).max(1))
    all_pixels = False
    if cfg.target_conf > 0:  # only confident pixels are matched to their class's component
        keep = conf >= cfg.target_conf
        all_pixels = bool(keep.sum() < MIN_CLASS_PIXELS)  # too few: match all of them (counted, warned)
        if not all_pixels:
            zt, pred = zt[keep], pred[keep]
    if zt.shape[0] > cfg.swd_pixels:
        idx = torch.randperm(zt.shape[0], generator=generator)[: cfg.swd_pixels].to(zt.device)
        zt, pred = zt[idx], pred[idx]
    hist = torch.bincount(pred, minlength=proto.k).cpu()
    zp, yp = pseudo_dataset(proto, net.head, hist, cfg.gmm_samples, cfg.tau, generator)
    if zp.shape[0] < MIN_CLASS_PIXELS:
        raise UserError(f"fewer than {MIN_CLASS_PIXELS} GMM samples pass tau={cfg.tau}; lower --tau")
    swd = swd_loss(zt, pred, zp, yp, cfg, generator)
    loss = cfg.lam * swd
    ce = None
    if net.head.weight.requires_grad:  # the CE term reaches h alone (the samples carry no gradient)
        ce = F.cross_entropy(net.head(zp[:, :, None, None]).flatten(1), yp)
        loss = loss + ce
    if anchor is not None and cfg.anchor > 0:
        loss = loss + cfg.anchor * sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), anchor))
    return {"loss": loss, "ce": None if ce is None else ce.item(), "swd": swd.item(), "gmm_kept": int(zp.shape[0]),
            "all_pixels": all_pixels}


def adapt(net: SegModel, proto: Prototypes, frames: np.ndarray, cfg: AdaptConfig, progress=None) -> dict:
    """Run one adaptation round in place on uint8 frames (N, H, W, 3), on the net's device."""
    if len(frames) == 0:
        raise UserError("no frames to adapt on")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    source_stats = [b.clone() for b in net.buffers()]
    if cfg.bn == "adapt":
        reestimate_bn(net, frames, cfg.bn_mix)
    params = configure(net, cfg)
    anchor = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps, all_pixels = [], 0
    with stepping(net, cfg.batch_stats):
        for step in range(cfg.steps):
            idx = torch.randint(0, len(frames), (cfg.batch_size,), generator=gen)
            parts = mas3_step(net, proto, to_device(frames[idx.numpy()], net), cfg, gen, anchor)
            if not torch.isfinite(parts["loss"]):
                raise UserError(f"adaptation loss became {parts['loss'].item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            all_pixels += parts["all_pixels"]
            steps.append({"step": step, "loss": parts["loss"].item(),
                          **{k: parts[k] for k in ("ce", "swd", "gmm_kept")}})
            if progress:
                progress(1)
    finish(net, frames, source_stats if cfg.bn == "adapt" else None, cfg.bn_mix, cfg.keep_source)
    if all_pixels:  # the class-conditional match then pairs unconfident pixels with components
        log.warning("%d of %d steps had fewer than %d target pixels predicted with confidence >= %s: "
                    "their SWD matched all pixels", all_pixels, cfg.steps, MIN_CLASS_PIXELS, cfg.target_conf)
    return {"steps": steps, "seconds": time.perf_counter() - t0, "all_pixel_steps": all_pixels}


def finish(net: SegModel, frames: np.ndarray, source_stats: list[torch.Tensor] | None, mix: float,
           keep_source: bool = True) -> None:
    """End a round: with `source_stats`, re-estimate BN statistics from the round's starting ones
    (the weights moved, so the statistics follow them); without `keep_source` the adapted set also
    becomes the source set (one set, no per-frame routing: the baselines as published); eval mode."""
    if source_stats is not None:
        with torch.no_grad():
            for b, s in zip(net.buffers(), source_stats):
                b.copy_(s)
        reestimate_bn(net, frames, mix)
    if not keep_source:
        net.mark_source()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)


# --- normalisation statistics: re-estimated on the target, batch statistics in the steps, the bank of sets

@torch.no_grad()
def reestimate_bn(net: SegModel, frames: np.ndarray, mix: float = 1.0, batch_size: int = 8) -> None:
    """AdaBN: batch-norm statistics := the moments of the mixture (1 - mix) · current + mix · `frames`."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training, m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    for i in range(0, len(frames), batch_size):
        net.embed(net.normalize(to_device(frames[i:i + batch_size], net)))
    for m, (momentum, training, mean, var) in zip(bns, saved):
        # moments of the mixture: the variance gains the spread between the two means
        gap = (m.running_mean - mean) ** 2
        m.running_mean.mul_(mix).add_(mean, alpha=1 - mix)
        m.running_var.mul_(mix).add_(var, alpha=1 - mix).add_(gap, alpha=mix * (1 - mix))
        m.momentum = momentum
        m.train(training)


@contextmanager
def stepping(net: SegModel, batch_stats: bool):
    """The mode of a round's gradient steps (mas3 and the baselines): no per-frame routing (the
    steps adapt the target's set); with `batch_stats`, each batch normalised with its own
    statistics, and the running statistics the steps drift put back afterwards."""
    saved = [b.clone() for b in net.buffers()] if batch_stats else []
    net.routing = False
    for m in net.modules() if batch_stats else ():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    try:
        yield
    finally:
        net.routing = True
        with torch.no_grad():
            for b, s in zip(net.buffers(), saved):
                b.copy_(s)


@torch.no_grad()
def source_stats_to_running(net: SegModel) -> None:
    """Start from the source model's statistics (kept in every DomainNorm along the lineage)."""
    for m in net.modules():
        if isinstance(m, DomainNorm):
            m.running_mean.copy_(m.bank[0, 0]), m.running_var.copy_(m.bank[0, 1])


@torch.no_grad()
def source_affine_to_working(net: SegModel) -> None:
    """Start the working set's steps from the source model's affine parameters, keeping its
    statistics: a refining round's steps then replace the last round's, not add to them."""
    for m in net.modules():
        if isinstance(m, DomainNorm):
            m.weight.copy_(m.bank[0, 2]), m.bias.copy_(m.bank[0, 3])


@torch.no_grad()
def select_set(net: SegModel, frames: np.ndarray, keep: int, batch_size: int = 8) -> str:
    """Before a round that keeps the source set: make the set of this chunk's domain the working
    set, or start a new one from the source's. The chunk's pooled stem statistics are compared
    (Gaussian KL) with every set's: it is of the nearest adapted set's domain unless the source set
    is nearer still, or that set is farther than SAME_DOMAIN times the spread of the chunk's own
    frames around their pool. (A spread of 1x split one looping camera across three sets: a
    video's chunks differ by more than the frames within one chunk do.) Returns which it chose
    ("working", "banked N" or "new")."""
    net.eval()
    stats = [net.stem_stats(net.stem(to_device(frames[i:i + batch_size], net)))
             for i in range(0, len(frames), batch_size)]
    m, v = (torch.cat(t) for t in zip(*stats))  # (N, C) each
    mu = m.mean(0, keepdim=True)
    var = (v + m ** 2).mean(0, keepdim=True) - mu ** 2  # the chunk pooled: (1, C)
    spread = gaussian_kl(m, v, mu, var).median()
    dist = net.set_distances(mu, var)[0]  # (S + 1,): source, banked adapted sets, the working set
    row = int(dist[1:].argmin()) + 1
    log.info("set distances %s, spread %.4f", [round(float(d), 4) for d in dist], float(spread))
    if dist[row] >= dist[0] or dist[row] > SAME_DOMAIN * spread:
        row = None
    net.activate_set(row, keep)
    return "new" if row is None else "working" if row == len(dist) - 1 else f"banked {row}"
