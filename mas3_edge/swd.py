"""Sliced Wasserstein distance (paper Eq. 5), differentiable, for sets of different sizes."""
from __future__ import annotations

import torch


def random_directions(dim: int, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """n unit vectors in R^dim, as columns: (dim, n)."""
    theta = torch.randn(dim, n, generator=generator).to(device)  # CPU generator: same draws on any device
    return theta / theta.norm(dim=0, keepdim=True)


def _quantiles(sorted_proj: torch.Tensor, n: int) -> torch.Tensor:
    """Values of each sorted column at n evenly spaced quantile levels, by linear interpolation."""
    m = sorted_proj.shape[0]
    if m == n:
        return sorted_proj
    pos = (torch.arange(n, device=sorted_proj.device, dtype=sorted_proj.dtype) + 0.5) * (m / n) - 0.5
    pos = pos.clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    w = (pos - lo.to(pos.dtype)).unsqueeze(1)
    return sorted_proj[lo] * (1 - w) + sorted_proj[hi] * w


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 100,
                       projections: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over L random directions of the squared 1-D Wasserstein-2 distance.

    a: (N, D), b: (M, D). Each projection is sorted; when N != M the smaller set's sorted
    projections are matched to the larger one's quantile levels. Directions are drawn afresh
    on every call unless given as `projections` (D, L).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"SWD needs (N, D) and (M, D) sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    if projections is None:
        projections = random_directions(a.shape[1], n_projections, generator, a.device)
    projections = projections.to(a.dtype)
    pa = torch.sort(a @ projections, dim=0).values  # (N, L)
    pb = torch.sort(b.to(a.dtype) @ projections, dim=0).values  # (M, L)
    n = max(pa.shape[0], pb.shape[0])
    return ((_quantiles(pa, n) - _quantiles(pb, n)) ** 2).mean()
