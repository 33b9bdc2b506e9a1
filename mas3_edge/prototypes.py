"""The prototypical distribution (paper Eq. 2–3): a K-component GMM in the embedding space.

Fitted in ONE streaming pass of float64 sufficient statistics (count, Σz, Σzzᵀ) per class, kept
at several confidence thresholds at once so that a class with too few confident pixels falls back
to a lower τ without a second pass over the source data. This file is all that the device keeps
of the source domain.

The covariance is stored in one of three structures, chosen by the embedding width D so that the
file stays small for imported models (D = 256 … 2048) while sampling stays exact for what is kept:
  full     chol [K, D, D]            lower Cholesky factor of Σ_j (D ≤ 64)
  lowrank  factor [K, D, r], diag [K, D]   Σ_j ≈ U Uᵀ + diag(d): the top-r eigenvectors of Σ_j,
                                     d the remaining variance, so the marginal variances are exact
  diag     diag [K, D]               the variances alone (D > 1024)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from . import dist
from .bundle import atomic_write, version_labels
from .errors import UserError
from .labels import CITYSCAPES, IGNORE, LABEL_SET_ID, LabelSet

FALLBACK_TAUS = (0.9, 0.7, 0.5, 0.0)  # tried in order for a class short of confident pixels
COVARIANCES = ("auto", "full", "lowrank", "diag")
FULL_MAX_D, LOWRANK_MAX_D, LOWRANK_RANK = 64, 1024, 32  # auto: full ≤ 64 < lowrank ≤ 1024 < diag


def choose_covariance(d: int, covariance: str = "auto") -> tuple[str, int]:
    """(structure, rank) for width d; `covariance` forces one of full / lowrank / diag."""
    if covariance not in COVARIANCES:
        raise UserError(f"unknown covariance structure {covariance!r}; use one of {', '.join(COVARIANCES)}")
    if covariance == "auto":
        covariance = "full" if d <= FULL_MAX_D else "lowrank" if d <= LOWRANK_MAX_D else "diag"
    rank = min(LOWRANK_RANK, d - 1) if covariance == "lowrank" else 0
    return ("diag", 0) if covariance == "lowrank" and rank < 1 else (covariance, rank)


class SufficientStats:
    """Per-class count, Σz and Σzzᵀ in float64, at each threshold in `taus` (one pass)."""

    def __init__(self, k: int, d: int, taus: tuple[float, ...], device: torch.device | str = "cpu"):
        self.taus = taus
        self.count = torch.zeros(len(taus), k, dtype=torch.float64, device=device)
        self.sum = torch.zeros(len(taus), k, d, dtype=torch.float64, device=device)
        self.outer = torch.zeros(len(taus), k, d, d, dtype=torch.float64, device=device)

    def update(self, z: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, conf: torch.Tensor) -> None:
        """z (N, D); label, pred, conf (N,). A pixel is in S_j if label == pred == j and conf > τ."""
        correct = (label == pred) & (label != IGNORE)
        z64, label = z.double(), label.long()
        for t, tau in enumerate(self.taus):
            keep = correct & (conf > tau)
            for j in torch.unique(label[keep]).tolist():
                zj = z64[keep & (label == j)]
                self.count[t, j] += zj.shape[0]
                self.sum[t, j] += zj.sum(0)
                self.outer[t, j] += zj.T @ zj

    def all_reduce_(self) -> None:
        """Sum the statistics over torchrun's ranks (nothing in one process): every field is a sum
        over pixels, so the ranks' partial statistics add up to those of one pass over all the data."""
        dist.all_reduce_([self.count, self.sum, self.outer])


@dataclass
class Prototypes:
    """GMM parameters: alpha (K,), mean (K, D), counts (K,) and Σ_j in one structure (module doc):
    chol (K, D, D) lower Cholesky factors, or factor (K, D, r) plus diag (K, D), or diag (K, D)."""

    alpha: torch.Tensor
    mean: torch.Tensor
    chol: torch.Tensor | None
    counts: torch.Tensor
    meta: dict = field(default_factory=dict)
    factor: torch.Tensor | None = None
    diag: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.mean.shape[0]

    @property
    def d(self) -> int:
        return self.mean.shape[1]

    @property
    def structure(self) -> str:
        return "full" if self.chol is not None else "lowrank" if self.factor is not None else "diag"

    @property
    def rank(self) -> int:
        return self.factor.shape[2] if self.factor is not None else 0

    @property
    def covariance(self) -> torch.Tensor:
        """Dense Σ (K, D, D) in any structure (large for wide D: for checks and small tools)."""
        if self.chol is not None:
            return self.chol @ self.chol.transpose(1, 2)
        assert self.diag is not None, "the lowrank and diag structures keep the diagonal"
        dense = torch.diag_embed(self.diag)
        return dense + self.factor @ self.factor.transpose(1, 2) if self.factor is not None else dense

    def sample(self, per_class: torch.Tensor, generator: torch.Generator | None = None):
        """Draw per_class[j] samples of component j -> z (N, D), y (N,) on the prototypes' device.
        Empty components are skipped. The noise is drawn on the CPU, so one (CPU) generator gives
        the same draws whatever the device."""
        per_class = per_class.long().cpu().clone()
        per_class[(self.alpha <= 0).cpu()] = 0
        y = torch.repeat_interleave(torch.arange(self.k), per_class)
        dev = self.mean.device
        eps = torch.randn(y.shape[0], self.d, generator=generator).to(dev)  # (N, D)
        eps_u = torch.randn(y.shape[0], self.rank, generator=generator).to(dev)  # (N, r), empty unless low rank
        y = y.to(dev)
        if self.chol is None:
            assert self.diag is not None, "the lowrank and diag structures keep the diagonal"
            z = self.mean[y] + self.diag[y].sqrt() * eps  # z = μ + sqrt(d) ⊙ ε2 (+ U ε1 below)
        else:
            z = self.mean[y]  # indexing copies
        start = 0
        for j, n in enumerate(per_class.tolist()):  # per class: no (N, D, D) or (N, D, r) gather
            if n and self.chol is not None:
                z[start:start + n] += eps[start:start + n] @ self.chol[j].T
            elif n and self.factor is not None:
                z[start:start + n] += eps_u[start:start + n] @ self.factor[j].T
            start += n
        return z, y

    @property
    def atc_threshold(self) -> float | None:
        """The ATC confidence threshold fitted on the source data (signals.fit_atc), None when the
        file has none (written before it existed)."""
        value = self.meta.get("atc_threshold")
        return None if value in (None, "") else float(value)

    def log_prob(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """log N(z_i; μ_c, Σ_c) with c = classes[i], in the stored structure: z (N, D), classes (N,)
        -> (N,), on the prototypes' device. One component at a time: no (N, D, D) gather."""
        z, classes = z.to(self.mean.device, self.mean.dtype), classes.to(self.mean.device)
        out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
        for j in classes.unique().tolist():
            at = classes == j
            out[at] = self._component(j).log_prob(z[at])
        return out

    def _component(self, j: int) -> torch.distributions.Distribution:
        mean = self.mean[j]
        if self.chol is not None:
            return torch.distributions.MultivariateNormal(mean, scale_tril=self.chol[j], validate_args=False)
        assert self.diag is not None, "the lowrank and diag structures keep the diagonal"
        if self.factor is not None:
            return torch.distributions.LowRankMultivariateNormal(mean, self.factor[j], self.diag[j], validate_args=False)
        return torch.distributions.Independent(torch.distributions.Normal(mean, self.diag[j].sqrt()), 1)

    def to(self, device) -> Prototypes:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Prototypes(self.alpha.to(device), self.mean.to(device), move(self.chol),
                          self.counts.to(device), self.meta, move(self.factor), move(self.diag))


def class_name(j: int, labels: LabelSet = CITYSCAPES) -> str:
    """The label set's name of class j, or its number past the set's classes."""
    return labels.names[j] if j < labels.num_classes else str(j)


def finalize(stats: SufficientStats, min_count: int, shrink: float = 1e-3, covariance: str = "auto",
             labels: LabelSet = CITYSCAPES) -> Prototypes:
    """Eq. 3 from the sufficient statistics, with a per-class fallback to a lower τ and a shrunk Σ.

    μ_j and Σ_j come from the highest τ with at least `min_count` pixels of class j. α_j is
    counted at ONE level for every class, the lowest τ kept (all correctly predicted pixels when it
    is 0): counts taken at different levels are not comparable, and a class that fell back to a
    lower τ would be weighted up against the classes that did not. `covariance` picks how Σ_j
    is stored (`choose_covariance`)."""
    _, k, d = stats.sum.shape
    kind, rank = choose_covariance(d, covariance)
    mean = torch.zeros(k, d, dtype=torch.float64)
    cov = torch.eye(d, dtype=torch.float64).repeat(k, 1, 1)
    counts = torch.zeros(k, dtype=torch.float64)
    handling = {}
    for j in range(k):
        level = next((t for t in range(len(stats.taus)) if stats.count[t, j] >= min_count), None)
        if level is None:
            handling[class_name(j, labels)] = "absent: no usable pixels, weight 0"
            continue
        n = stats.count[level, j].cpu()
        mu = stats.sum[level, j].cpu() / n
        sigma = stats.outer[level, j].cpu() / n - torch.outer(mu, mu)
        # Shrink toward a scaled identity: keeps Σ positive definite for small or degenerate S_j.
        s = shrink + d / (n.item() + d)
        sigma = (1 - s) * sigma + s * torch.eye(d, dtype=torch.float64) * sigma.diagonal().mean().clamp(min=1e-6)
        mean[j], cov[j], counts[j] = mu, sigma, n
        if level > 0:
            handling[class_name(j, labels)] = f"tau lowered to {stats.taus[level]} ({int(n)} pixels)"
    if counts.sum() == 0:
        raise UserError("no class has a single correctly predicted source pixel: is the model trained, "
                        "and is this the data it was trained on?")
    weight = stats.count[-1].cpu() * (counts > 0)  # one level for all; absent classes stay at 0
    alpha = weight / weight.sum()
    meta = {"tau": stats.taus[0], "alpha_tau": stats.taus[-1], "handling": handling, "min_count": min_count}
    parts = structure(cov, kind, rank)
    return Prototypes(alpha.float(), mean.float(), parts.get("chol"), counts.float(), meta,
                      parts.get("factor"), parts.get("diag"))


def structure(cov: torch.Tensor, kind: str, rank: int = 0) -> dict[str, torch.Tensor]:
    """Dense float64 Σ (K, D, D) -> the float32 tensors of one structure: chol, or factor + diag,
    or diag. Low rank keeps the top-r eigenpairs (U = V_r sqrt(λ_r)) and gives the diagonal the
    variance they leave, d = diag(Σ) - rowsum(U²) > 0, so every marginal variance is kept."""
    if kind == "full":
        return {"chol": torch.linalg.cholesky(cov).float()}
    var = cov.diagonal(dim1=1, dim2=2)  # (K, D)
    if kind == "diag":
        return {"diag": var.float()}
    lam, vec = torch.linalg.eigh(cov)  # ascending
    u = vec[..., -rank:] * lam[:, -rank:].clamp(min=0).sqrt().unsqueeze(1)  # (K, D, r)
    rest = (var - (u * u).sum(-1)).clamp(min=1e-6 * var.mean(1, keepdim=True))
    return {"factor": u.float().contiguous(), "diag": rest.float()}


@torch.no_grad()
def fit(net, dataset, tau: float = 0.97, min_count: int = 100, device: str | torch.device = "cpu",
        batch_size: int = 8, covariance: str = "auto") -> Prototypes:
    """One pass over a labelled source dataset of (uint8 image (H,W,3), label (H,W)) pairs -> GMM.

    Labels are brought to the embedding grid (stride 8), where z and the prediction h(z) live,
    by the centre pixel of each cell (`labels_to_grid`); the confidence filter discards the
    boundary pixels this blurs. `covariance` (auto | full | lowrank | diag) picks how Σ_j is stored.

    Under torchrun each rank embeds its share of the batches (the very batches one process makes,
    so every pixel's z and prediction are the same) and the statistics are summed over the ranks
    before Eq. 3: every rank returns what one process would, up to float64 summation order.
    """
    choose_covariance(net.config.embed_dim, covariance)  # a bad choice fails before the pass
    with dist.session(device) as ctx:
        net = net.to(ctx.device).eval()
        stats = SufficientStats(net.config.num_classes, net.config.embed_dim,
                                (tau,) + tuple(t for t in FALLBACK_TAUS if t < tau), ctx.device)
        starts = range(0, len(dataset), batch_size)
        for b in tqdm(dist.shard(len(starts), ctx), desc="prototypes", leave=False, disable=ctx.rank != 0):
            stop = min(starts[b] + batch_size, len(dataset))
            _update(stats, net, [dataset[j] for j in range(starts[b], stop)], ctx.device)
        stats.all_reduce_()
    return finalize(stats, min_count, covariance=covariance, labels=net.labels)


def _update(stats: SufficientStats, net, items: list, device: str | torch.device) -> None:
    """Add one batch of (image, label) pairs to the statistics."""
    images = torch.from_numpy(np.stack([img for img, _ in items])).to(device)
    labels = torch.from_numpy(np.stack([lbl for _, lbl in items])).to(device)
    z = net.embed(net.normalize(images))  # (B, D, h, w)
    conf, pred = torch.softmax(net.head(z), 1).max(1)  # (B, h, w)
    lab = labels_to_grid(labels, z.shape[-2:])
    stats.update(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), lab.reshape(-1).long(),
                 pred.reshape(-1), conf.reshape(-1))


def labels_to_grid(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) -> (B, h, w): the label at the centre of each (H/h)×(W/w) cell, the pixel the
    cell's embedding sees best (nearest resizing would take its top-left corner)."""
    sh, sw = labels.shape[-2] // size[0], labels.shape[-1] // size[1]
    return labels[:, sh // 2::sh, sw // 2::sw][:, : size[0], : size[1]]


TENSORS = {"full": ("chol",), "lowrank": ("factor", "diag"), "diag": ("diag",)}


def save(proto: Prototypes, path: Path, model_sha256: str, source: str, labels: LabelSet | None = None) -> None:
    """Write the file with the label set the prototypes were fitted for (id, K, names): `labels`, the
    model's; None: Cityscapes-19 when K is 19, else an unnamed set of K classes (ids as names)."""
    if labels is None:
        labels = CITYSCAPES if proto.k == CITYSCAPES.num_classes else None
    elif proto.k != labels.num_classes:
        raise UserError(f"prototypes have K={proto.k} but label set {labels.id!r} has {labels.num_classes} classes")
    names = labels.names if labels else tuple(str(j) for j in range(proto.k))
    meta = {"tau": str(proto.meta.get("tau")), "classes": json.dumps(list(names)),
            "label_set": labels.id if labels else "", "num_classes": str(proto.k), "dim": str(proto.d),
            "model_sha256": model_sha256, "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "handling": json.dumps(proto.meta.get("handling", {})), "format": "mas3-edge-prototypes/1",
            "covariance": proto.structure, "rank": str(proto.rank)}
    if proto.atc_threshold is not None:  # optional: fitted by `mas3-edge prototypes` (signals.fit_atc)
        meta["atc_threshold"] = repr(proto.atc_threshold)
    tensors = {"alpha": proto.alpha, "mean": proto.mean, "counts": proto.counts}
    tensors |= {name: getattr(proto, name) for name in TENSORS[proto.structure]}
    atomic_write(Path(path), safetensors.torch.save({k: v.contiguous().cpu() for k, v in tensors.items()}, meta))


def load(path: Path, model_meta: dict | None = None) -> Prototypes:
    """Load and validate; with `model_meta` (model.json) check that the file belongs to that model.
    A file without a `covariance` entry (written before it existed) is a full one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prototype file {path} is missing; fit one with `mas3-edge prototypes`")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            kind = meta.get("covariance", "full")
            names = ("alpha", "mean", "counts") + TENSORS.get(kind, ())
            t = {k: f.get_tensor(k).float() for k in names if k in f.keys()}
    except Exception as e:
        raise UserError(f"prototype file {path} is unreadable ({str(e).splitlines()[0]})") from None
    if kind not in TENSORS:
        raise UserError(f"prototype file {path} has an unknown covariance structure {kind!r}; refit it")
    if missing := [k for k in names if k not in t]:
        raise UserError(f"prototype file {path} ({kind} covariance) lacks {', '.join(missing)}; refit it")
    proto = Prototypes(t["alpha"], t["mean"], t.get("chol"), t["counts"], meta, t.get("factor"), t.get("diag"))
    _validate(proto, path, model_meta)
    return proto


def _fitted_label_set(p: Prototypes, path: Path) -> tuple[str, int]:
    """(label-set id, K) the file was fitted for; "" for an unnamed set. Files from before label sets
    record neither: those of 19 classes were Cityscapes-19, the only set there was."""
    k = p.meta.get("num_classes", str(p.k))
    if k != str(p.k):
        raise UserError(f"prototype file {path} says {k} classes but stores {p.k}; refit it")
    return p.meta.get("label_set", LABEL_SET_ID if p.k == CITYSCAPES.num_classes else ""), p.k


def _check_label_set(fitted: tuple[str, int], path: Path, model_meta: dict) -> None:
    """Prototypes of another label set would sample components under the wrong class ids."""
    labels = version_labels(model_meta)  # Cityscapes-19 for a version from before label sets
    if "labels" not in model_meta and model_meta["architecture"]["num_classes"] != labels.num_classes:
        return  # a model of K classes from before label sets names none: the K check in _validate is all
    set_id, k = fitted
    if k != labels.num_classes or (set_id and set_id != labels.id):
        raise UserError(f"prototype file {path} was fitted for label set {set_id or '(unnamed)'!r} ({k} classes) "
                        f"but the model's label set is {labels.id!r} ({labels.num_classes} classes); "
                        "refit with `mas3-edge prototypes`")


def _validate(p: Prototypes, path: Path, model_meta: dict | None) -> None:
    k, d = p.mean.shape
    shapes = {"chol": (k, d, d), "factor": (k, d, p.rank), "diag": (k, d)}
    if (p.alpha.shape != (k,) or p.counts.shape != (k,) or p.rank >= max(d, 2)
            or any(getattr(p, n) is not None and getattr(p, n).shape != s for n, s in shapes.items())):
        raise UserError(f"prototype file {path} has inconsistent shapes")
    if p.structure == "lowrank" and p.meta.get("rank", str(p.rank)) != str(p.rank):
        raise UserError(f"prototype file {path} says rank {p.meta['rank']} but stores rank {p.rank}; refit it")
    if not all(torch.isfinite(x).all() for x in (p.alpha, p.mean, p.chol, p.factor, p.diag) if x is not None):
        raise UserError(f"prototype file {path} contains NaN or infinite values")
    used = p.alpha > 0
    if not used.any():
        raise UserError(f"prototype file {path} has no component with positive weight; refit it")
    if p.chol is not None and (p.chol[used].diagonal(dim1=1, dim2=2) <= 0).any():
        raise UserError(f"prototype file {path} has a covariance that is not positive definite")
    if p.diag is not None and (p.diag[used] <= 0).any():
        raise UserError(f"prototype file {path} has a variance that is not positive ({p.structure} covariance); refit it")
    try:
        atc = p.atc_threshold
    except ValueError:
        atc = float("nan")
    if atc is not None and not 0 <= atc <= 1:  # NaN fails too
        raise UserError(f"prototype file {path} has an ATC threshold {p.meta['atc_threshold']!r} that is not "
                        "a number in [0, 1]; refit it")
    fitted = _fitted_label_set(p, path)
    if model_meta is not None:
        _check_label_set(fitted, path, model_meta)
        arch = model_meta["architecture"]
        if (k, d) != (arch["num_classes"], arch["embed_dim"]):
            raise UserError(f"prototype file {path} has K={k}, D={d} but the model has "
                            f"K={arch['num_classes']}, D={arch['embed_dim']}")
        if p.meta.get("model_sha256") != model_meta.get("source_sha256"):
            raise UserError(f"prototype file {path} was fitted for another model "
                            f"({p.meta.get('model_sha256', '?')[:12]}), not this one "
                            f"({model_meta.get('source_sha256', '?')[:12]}); refit with `mas3-edge prototypes`")
