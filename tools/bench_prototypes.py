"""Which covariance structure keeps the prototype GMM faithful for wide embeddings.

Fits K = 19 synthetic Gaussians in D dimensions (correlated covariances: a random rotation of a
power-law spectrum, as learned embeddings have) in one streaming pass, stores Σ_j in each
structure, and reports the file size and the sliced-Wasserstein distance (mas3_edge/swd.py)
between samples of the stored GMM and samples of the true distribution: pooled (the mixture),
and per class (the class-conditional view that adaptation and health use). The last row is two
independent samples of the truth: the floor no model can beat at this sample size.

    python tools/bench_prototypes.py              # K = 19, D = 256
    python tools/bench_prototypes.py --dim 1024 --n-fit 3000
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mas3_edge import prototypes as P
from mas3_edge.swd import random_directions, sliced_wasserstein


def truth(k: int, d: int, g: torch.Generator, decay: float = 1.0):
    """Means (K, D) and Cholesky factors (K, D, D) of correlated class covariances."""
    mean = torch.randn(k, d, generator=g, dtype=torch.float64) * 2
    q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=torch.float64))
    lam = (torch.arange(1, d + 1, dtype=torch.float64) ** -decay) * d ** 0.5  # power-law spectrum
    cov = q @ torch.diag(lam) @ q.transpose(1, 2)
    return mean, torch.linalg.cholesky(cov)


def draw(mean, chol, per_class, g):
    y = torch.repeat_interleave(torch.arange(mean.shape[0]), per_class)
    z = torch.randn(y.shape[0], mean.shape[1], generator=g, dtype=torch.float64)
    z = torch.cat([mean[j] + z[y == j] @ chol[j].T for j in range(mean.shape[0])])  # y is sorted
    return z.float(), y


def swd_pair(a, ya, b, yb, theta) -> tuple[float, float]:
    pooled = sliced_wasserstein(a, b, projections=theta).item()
    per = [sliced_wasserstein(a[ya == j], b[yb == j], projections=theta).item() for j in ya.unique().tolist()]
    return pooled, sum(per) / len(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-fit", type=int, default=4000, help="fitting samples per class")
    ap.add_argument("--n-eval", type=int, default=2000, help="evaluation samples per class")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    k, d = args.classes, args.dim
    g = torch.Generator().manual_seed(args.seed)
    mean, chol = truth(k, d, g)
    stats = P.SufficientStats(k, d, (0.0,))
    for _ in range(4):  # streamed in pieces, as over a dataset
        z, y = draw(mean, chol, torch.full((k,), args.n_fit // 4), g)
        stats.update(z, y, y, torch.ones(len(y)))
    ref = P.finalize(stats, min_count=10, covariance="full")
    cov = ref.covariance.double()
    per_class = torch.full((k,), args.n_eval)
    theta = random_directions(d, 256, g)
    zt, yt = draw(mean, chol, per_class, g)
    true_cov = chol @ chol.transpose(1, 2)
    auto = P.choose_covariance(d)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, rank in [("full", 0), ("lowrank", 16), ("lowrank", 32), ("lowrank", 64), ("diag", 0)]:
            s = P.structure(cov, kind, rank)
            proto = P.Prototypes(ref.alpha, ref.mean, s.get("chol"), ref.counts, {}, s.get("factor"), s.get("diag"))
            path = Path(tmp) / f"{kind}{rank}.safetensors"
            P.save(proto, path, "bench", "synthetic")
            zs, ys = P.load(path).sample(per_class, g)
            err = ((proto.covariance.double() - true_cov).norm(dim=(1, 2)) / true_cov.norm(dim=(1, 2))).mean()
            name = f"{kind} r={rank}" if rank else kind
            rows.append((name + (" (auto)" if (kind, rank) == auto else ""), path.stat().st_size / 1024,
                         *swd_pair(zs, ys, zt, yt, theta), err.item()))
    z2, y2 = draw(mean, chol, per_class, g)
    rows.append(("truth vs truth (floor)", 0.0, *swd_pair(z2, y2, zt, yt, theta), 0.0))
    print(f"K = {k}, D = {d}, {args.n_fit} fitting / {args.n_eval} evaluation samples per class, 256 directions")
    print("| structure | file KB | SWD pooled | SWD per class | ‖Σ̂−Σ‖F/‖Σ‖F |\n|---|---:|---:|---:|---:|")
    for name, kb, pooled, per, err in rows:
        print(f"| {name} | {kb:.0f} | {pooled:.5f} | {per:.5f} | {err:.3f} |")


if __name__ == "__main__":
    main()
