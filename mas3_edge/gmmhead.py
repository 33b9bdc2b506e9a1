"""The GMM of class prototypes as a second classifier, fused with the network's softmax.

p_gmm(c | z) ∝ α_c · N(z; μ_c, Σ_c) over the shipped prototypes, and the served prediction is

    p = (1 − w) · p_net + w · p_gmm            (DIGA fuses a prototype classifier 0.2 / 0.8)

taken at the embedding's resolution; its log is the score the network upsamples in place of its
logits, so with w = 0 the served classes and confidences are exactly the plain network's (softmax
removes the per-pixel constant that the log-softmax subtracts).

Σ_c keeps the structure the prototype file stores, and its inverse is factored once, when the
head is built (never per frame): the squared Mahalanobis distance is

    m_c(z) = Σ_d s_cd (z_d − μ_cd)² + ‖F_c (z − μ_c)‖² − ‖G_c (z − μ_c)‖²
      full     s = 0,   F = L⁻¹ (Σ = L Lᵀ)
      lowrank  s = 1/d, G = C⁻¹ Uᵀ D⁻¹ with C Cᵀ = I + Uᵀ D⁻¹ U (Woodbury, Σ = U Uᵀ + D)
      diag     s = 1/d

so a frame costs a few 1×1 projections of z, whatever D. Only the means move on the target: each
normalisation set keeps its own (T3A / DIGA: an EMA of the confidently pseudo-labelled target
embeddings of each class, `adapt_means`), banked beside the set's statistics (bank.py); Σ_c and
α_c stay the source's.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .bank import BankedRows
from .torchutil import to_device

if TYPE_CHECKING:
    from .config import AdaptConfig
    from .model import SegModel
    from .prototypes import Prototypes

FLOOR = -60.0  # lowest fused log-probability served (GmmHead.fuse)
ABSENT = -1e30  # log-weight of a component with α = 0 (finite, so the log-sum-exp never sees inf - inf)


class GmmHead(BankedRows, nn.Module):
    """z (B, D, h, w) and each frame's set (B,) -> log p_gmm(c | z) (B, K, h, w), and the fusion.

    Buffers (saved with the weights): `weight` () the fusion weight w, `log_norm` (K,) log α_c −
    ½ log det Σ_c, `scale` (K, D), `plus` (K, R, D) and `minus` (K, R', D) (module doc), the working
    set's means `mean` (K, D) and the banked sets' `bank` (S, K, D), rows as the norms' sets."""

    weight: torch.Tensor
    log_norm: torch.Tensor
    scale: torch.Tensor
    plus: torch.Tensor
    minus: torch.Tensor
    mean: torch.Tensor
    bank: torch.Tensor

    def __init__(self, k: int, d: int, plus_rank: int = 0, minus_rank: int = 0, sets: int = 1):
        super().__init__()
        for name, shape in (("weight", ()), ("log_norm", (k,)), ("scale", (k, d)), ("plus", (k, plus_rank, d)),
                            ("minus", (k, minus_rank, d)), ("mean", (k, d)), ("bank", (sets, k, d))):
            self.register_buffer(name, torch.zeros(shape))

    @classmethod
    def from_prototypes(cls, proto: Prototypes, weight: float, sets: int = 1) -> GmmHead:
        """The head of `proto` with fusion weight `weight`, every one of `sets` sets at the source means."""
        f = factors(proto)
        head = cls(proto.k, proto.d, f["plus"].shape[1], f["minus"].shape[1], sets)
        with torch.no_grad():
            for name, value in f.items():
                getattr(head, name).copy_(value)
            head.weight.fill_(weight)
            head.mean.copy_(proto.mean)
            head.bank.copy_(proto.mean.expand(sets, -1, -1))
        return head.to(proto.mean.device)

    @classmethod
    def sized_as(cls, state: dict[str, torch.Tensor], prefix: str = "gmm.") -> GmmHead:
        """An empty head shaped like the one saved under `prefix` in a weights file."""
        (k, d), plus, minus = state[prefix + "scale"].shape, state[prefix + "plus"], state[prefix + "minus"]
        return cls(k, d, plus.shape[1], minus.shape[1], state[prefix + "bank"].shape[0])

    def log_posterior(self, z: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        """log p_gmm(c | z): z (B, D, h, w), route (B,) index into sets() or None (the working set)."""
        b, _, h, w = z.shape
        return self._log_posterior(z, route).transpose(1, 2).reshape(b, -1, h, w)

    def _log_posterior(self, z: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        """log p_gmm(c | z) as (B, N, K), classes last: ONNX Runtime's CPU reductions and softmax
        run several times faster over the last axis."""
        b, d = z.shape[:2]
        x = z.flatten(2).transpose(1, 2)  # (B, N, D)
        ones = torch.ones_like(x[:, :, :1])
        mu = self.sets()[route] if route is not None else self.mean.expand(b, -1, -1)  # (B, K, D)
        k = mu.shape[1]
        maha = torch.zeros_like(x[:, :, :1])
        if not self.plus.shape[1]:  # Σ s ⊙ (z − μ)², as one product with each frame's means folded in
            sm = self.scale * mu
            wd = torch.cat([self.scale.expand(b, -1, -1), -2 * sm, (sm * mu).sum(-1, keepdim=True)], -1)
            maha = torch.cat([x * x, x, ones], -1) @ wd.transpose(1, 2)  # (B, N, 2D + 1) @ (B, 2D + 1, K)
        for mat, sign in ((self.plus, 1.0), (self.minus, -1.0)):
            if mat.shape[1]:  # ‖F_c (z − μ_c)‖²: one product of (z, 1) with (F_c, −F_c μ_c) per frame
                r = mat.shape[1]
                shift = -(mat @ mu.unsqueeze(-1))  # (B, K, r, 1)
                wm = torch.cat([mat.expand(b, -1, -1, -1), shift], -1).reshape(b, k * r, d + 1)
                proj = (torch.cat([x, ones], -1) @ wm.transpose(1, 2)).reshape(b, -1, k, r)  # (B, N, K, r)
                maha = maha + sign * (proj * proj).sum(-1)
        return torch.log_softmax(self.log_norm - 0.5 * maha, -1)  # (B, N, K)

    def fuse(self, logits: torch.Tensor, z: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        """log((1 − w) softmax(logits) + w p_gmm) (B, K, h, w), by log-sum-exp (no exp of a large
        number), floored at FLOOR: the served model's softmax then never meets a denormal number
        (slow arithmetic on most CPUs), and p moves by < K · e^FLOOR."""
        b, k, h, w = logits.shape
        wt = self.weight.clamp(1e-12, 1 - 1e-12)
        a = torch.log_softmax(logits.flatten(2).transpose(1, 2), -1) + torch.log1p(-wt)  # (B, N, K)
        g = self._log_posterior(z, route) + torch.log(wt)
        top = torch.maximum(a, g)
        fused = (top + torch.log(torch.exp(a - top) + torch.exp(g - top))).clamp(min=FLOOR)
        return fused.transpose(1, 2).reshape(b, k, h, w)

    # --- the rows bank.py moves with every banked layer's (BankedRows): the class means, (K, D) a set

    def working(self) -> torch.Tensor:
        return self.mean

    @torch.no_grad()
    def set_working(self, row: torch.Tensor) -> None:
        self.mean.copy_(row)


def factors(proto: Prototypes) -> dict[str, torch.Tensor]:
    """log_norm, scale, plus, minus (module doc) from the stored structure, factored in float64."""
    k, d = proto.k, proto.d
    empty = torch.zeros(k, 0, d, dtype=torch.float64)
    if proto.chol is not None:
        chol = proto.chol.double().cpu()
        plus = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=torch.float64).expand(k, d, d), upper=False)
        logdet = 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)
        scale, minus = torch.zeros(k, d, dtype=torch.float64), empty
    else:
        assert proto.diag is not None, "the lowrank and diag structures keep the diagonal"
        dvar = proto.diag.double().cpu()
        scale, plus, logdet, minus = 1 / dvar, empty, dvar.log().sum(1), empty
        if proto.factor is not None:
            u = proto.factor.double().cpu()  # (K, D, r)
            ut_dinv = u.transpose(1, 2) / dvar[:, None]  # Uᵀ D⁻¹ (K, r, D)
            cap = torch.linalg.cholesky(torch.eye(u.shape[2], dtype=torch.float64) + ut_dinv @ u)
            minus = torch.linalg.solve_triangular(cap, ut_dinv, upper=False)  # C⁻¹ Uᵀ D⁻¹
            logdet = logdet + 2 * cap.diagonal(dim1=1, dim2=2).log().sum(1)
    alpha = proto.alpha.double().cpu()
    log_norm = torch.where(alpha > 0, alpha.clamp(min=1e-300).log() - 0.5 * logdet, torch.full_like(alpha, ABSENT))
    keep = (alpha > 0).double()  # an absent component's factors are zeroed: its score is ABSENT alone
    out = {"log_norm": log_norm, "scale": scale * keep[:, None], "plus": plus * keep[:, None, None],
           "minus": minus * keep[:, None, None]}
    return {name: t.float().to(proto.mean.device) for name, t in out.items()}


def log_density(proto: Prototypes, z: torch.Tensor) -> torch.Tensor:
    """log α_c + log N(z; μ_c, Σ_c) for every class: z (N, D) -> (N, K), the direct computation
    (torch.distributions in the stored structure) the head must agree with; −inf where α_c = 0."""
    cols = [proto.log_prob(z, torch.full((len(z),), j)) + math.log(a) if a > 0
            else torch.full((len(z),), -math.inf) for j, a in enumerate(proto.alpha.tolist())]
    return torch.stack(cols, 1)


def install(net: SegModel, proto: Prototypes, weight: float) -> None:
    """Give `net` the fused classifier with weight `weight` (0: remove it). A head already there
    keeps its sets' means and takes the new weight; a new one starts every set at the source means."""
    from . import bank
    if weight <= 0:
        net.gmm = None
    elif net.gmm is None:
        net.gmm = GmmHead.from_prototypes(proto.to(net.head.weight.device), weight, bank.count(net) - 1)
    else:
        net.gmm.weight.fill_(weight)


@torch.no_grad()
def adapt_means(net: SegModel, frames: np.ndarray, cfg: AdaptConfig, batch_size: int = 4) -> dict:
    """Move the working set's class means toward the target: per batch of frames, in time order,
    μ_c ← (1 − m) μ_c + m · mean of the embeddings the network labels c with softmax confidence ≥
    cfg.gmm_conf (pseudo-labels: never labels). Other sets' means, the source's included, stay."""
    head = net.gmm
    assert head is not None, "install the head first"
    was_training, routing = net.training, net.routing
    net.eval()
    net.routing = False  # the working set's statistics: the set this round adapts
    moved = torch.zeros(head.mean.shape[0], dtype=torch.long)
    try:
        for i in range(0, len(frames), batch_size):
            z = net.embed(net.normalize(to_device(frames[i:i + batch_size], net)))  # (B, D, h, w)
            conf, pred = torch.softmax(net.head(z), 1).max(1)
            zf, pred = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), pred.flatten()
            keep = conf.flatten() >= cfg.gmm_conf
            for c in pred[keep].unique().tolist():
                batch_mean = zf[keep & (pred == c)].mean(0)
                head.mean[c].lerp_(batch_mean.to(head.mean), cfg.gmm_momentum)
                moved[c] += 1
    finally:
        net.train(was_training)
        net.routing = routing
    return {"gmm_mean_updates": moved.tolist()}
