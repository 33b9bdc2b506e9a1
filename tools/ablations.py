"""Paper ablations on the synthetic setup: τ (Figure 4), λ, and the embedding picture (Figure 3).

τ rows refit the prototypes at τ on the source training split, report how separated the GMM
components are (see `separation`), then adapt a fresh source net with `mas3` and `mas3-paper`
(AdaptConfig's τ is the same confidence filter on the GMM samples). λ rows keep the default
prototypes. Every adapted net is scored on held-out labelled splits: realistic target and source.
The embedding picture projects GMM samples and held-out target embeddings before and after a
`mas3` round to 2-D (UMAP when importable, else PCA), coloured by class.

    python tools/ablations.py --preset small --out ablations.json --plot-dir docs/results
    python tools/ablations.py --preset smoke --steps 1 --what embedding   # plumbing only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mas3_edge import bundle, health, prototypes, rounds
from mas3_edge.config import AdaptConfig
from mas3_edge.errors import UserError
from mas3_edge.labels import CITYSCAPES, LabelSet
from mas3_edge.model import SegModel
from mas3_edge.prototypes import Prototypes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_quality lives beside this file
import bench_quality

TAUS, LAMS, METHODS = (0.0, 0.8, 0.97), (0.1, 0.5, 1.0, 2.0), ("mas3", "mas3-paper")
PARTS = ("tau", "lam", "embedding")
TARGET = "realistic"


def separation(proto: Prototypes) -> dict:
    """How far apart the GMM components with α > 0 are (higher: better separated).

    bhattacharyya_mean / _min: over component pairs (i, j), the Bhattacharyya distance
    D_B = ⅛ Δμᵀ Σ⁻¹ Δμ + ½ ln(det Σ / √(det Σ_i det Σ_j)), Σ = (Σ_i + Σ_j) / 2; 0 for identical
    components, None with fewer than two. fisher: α-weighted between-component scatter over
    within-component scatter, Σ α_j ‖μ_j − μ̄‖² / Σ α_j tr Σ_j (μ̄ the α-weighted mean).
    """
    used = (proto.alpha > 0).nonzero().flatten()
    mu, cov = proto.mean[used].double(), proto.covariance[used].double()  # (M, D), (M, D, D)
    a = proto.alpha[used].double() / proto.alpha[used].sum()
    between = (a * ((mu - (a[:, None] * mu).sum(0)) ** 2).sum(1)).sum()
    fisher = float(between / (a * cov.diagonal(dim1=1, dim2=2).sum(1)).sum())
    i, j = torch.triu_indices(len(used), len(used), 1)
    if len(i) == 0:
        return {"bhattacharyya_mean": None, "bhattacharyya_min": None, "fisher": fisher}
    s = (cov[i] + cov[j]) / 2  # (P, D, D)
    diff = (mu[i] - mu[j]).unsqueeze(-1)  # (P, D, 1)
    maha = (diff.transpose(1, 2) @ torch.linalg.solve(s, diff)).flatten()
    logdet = torch.linalg.slogdet(cov)[1]
    db = maha / 8 + 0.5 * (torch.linalg.slogdet(s)[1] - 0.5 * (logdet[i] + logdet[j]))
    return {"bhattacharyya_mean": float(db.mean()), "bhattacharyya_min": float(db.min()), "fisher": fisher}


def adapted(s: bench_quality.Setup, proto: Prototypes, cfg: AdaptConfig) -> SegModel:
    """A fresh copy of the source net after one round on the target's unlabeled frames."""
    net = bundle.load_version(s.root, s.src.id).net.to(s.device)
    return rounds.candidates(net, proto, s.data[f"{TARGET}-adapt"].x, replace(cfg, choose=False))[-1].net


def scores(s: bench_quality.Setup, proto: Prototypes, cfg: AdaptConfig) -> dict:
    """Target and source mIoU after a round, or the error that stopped it (e.g. no sample passes τ)."""
    try:
        net = adapted(s, proto, cfg)
    except UserError as e:
        return {"error": str(e)}
    return {"target": s.score(net, f"{TARGET}-val"), "source": s.score(net, "source-val")}


def tau_rows(s: bench_quality.Setup, steps: int) -> dict:
    rows = {}
    for tau in TAUS:
        proto = prototypes.fit(s.src.net, s.data["source-train"], tau=tau, device=s.device)
        lowered = sum(v.startswith("tau lowered") for v in proto.meta["handling"].values())
        rows[str(tau)] = {"separation": separation(proto), "support_pixels": int(proto.counts.sum()),
                          "classes": int((proto.alpha > 0).sum()), "classes_tau_lowered": lowered,
                          **{m: scores(s, proto, AdaptConfig(method=m, tau=tau, steps=steps)) for m in METHODS}}
    return rows


def lam_rows(s: bench_quality.Setup, steps: int) -> dict:
    return {str(lam): {m: scores(s, s.proto, AdaptConfig(method=m, lam=lam, steps=steps)) for m in METHODS}
            for lam in LAMS}


def _cell(r: dict) -> str:
    return f"failed: {r['error'].split(';')[0]}" if "error" in r else f"{r['target']:.1f} / {r['source']:.1f}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def tables(res: dict) -> str:
    """Markdown tables of the parts present in `res`."""
    base = res["source_only"]
    out = [f"source-only target / source mIoU: {base['target']:.1f} / {base['source']:.1f}"]
    methods = " | ".join(f"{m} target / source" for m in METHODS)
    if "tau" in res:
        out += ["", f"| τ | support pixels | classes (τ lowered) | Bhattacharyya mean / min | Fisher | {methods} |",
                "|" + "---|" * 7]
        for tau, r in res["tau"].items():
            sep = r["separation"]
            out.append(f"| {tau} | {r['support_pixels']} | {r['classes']} ({r['classes_tau_lowered']}) | "
                       f"{_num(sep['bhattacharyya_mean'])} / {_num(sep['bhattacharyya_min'])} | {sep['fisher']:.2f} | "
                       + " | ".join(_cell(r[m]) for m in METHODS) + " |")
    if "lam" in res:
        out += ["", f"| λ | {methods} |", "|" + "---|" * 3]
        out += [f"| {lam} | " + " | ".join(_cell(r[m]) for m in METHODS) + " |" for lam, r in res["lam"].items()]
    return "\n".join(out)


def embedding_points(s: bench_quality.Setup, steps: int, n: int = 3000, seed: int = 0) -> tuple[dict, str | None]:
    """{panel: (z (n, D), class (n,))} for GMM samples and held-out target frames before and after a
    mas3 round (panel left out if the round fails), and the round's error or None."""
    gen = torch.Generator().manual_seed(seed)
    models, error = {"target before": s.src.net.to(s.device)}, None
    try:
        models["target after (mas3)"] = adapted(s, s.proto, AdaptConfig(method="mas3", steps=steps))
    except UserError as e:
        error = str(e)
    points = {"GMM samples": s.proto.sample(torch.floor(s.proto.alpha * n + 0.5), gen)}
    for name, net in models.items():
        z, pred, _ = health.embed_frames(net, s.data[f"{TARGET}-val"].x)  # predicted class: no labels used
        points[name] = (z.cpu(), pred.cpu())
    keep = {k: torch.randperm(len(y), generator=gen)[:n] for k, (_, y) in points.items()}
    return {k: (z[keep[k]], y[keep[k]]) for k, (z, y) in points.items()}, error


def project(fit_on: torch.Tensor) -> tuple[str, Callable[[torch.Tensor], np.ndarray]]:
    """A 2-D projection fitted on `fit_on` (N, D): UMAP when importable, else PCA; -> (name, fn)."""
    try:
        import umap
        reducer = umap.UMAP(n_components=2, random_state=0).fit(fit_on.numpy())
        return "umap", lambda z: reducer.transform(z.numpy())
    except ImportError:
        centre = fit_on.double().mean(0)
        basis = torch.linalg.svd(fit_on.double() - centre, full_matrices=False)[2][:2].T  # (D, 2)
        return "pca", lambda z: ((z.double() - centre) @ basis).numpy()


def plot_embedding(points: dict, path: Path, labels: LabelSet = CITYSCAPES) -> str:
    """One panel per entry of `points` on shared axes, coloured by class in the model's label set; the
    projection is fitted on the GMM samples. Returns the projection's name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    name, fn = project(points["GMM samples"][0])
    xy = {k: fn(z) for k, (z, _) in points.items()}
    colours = np.asarray(labels.palette, float) / 255
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 4.2), sharex=True, sharey=True)
    for ax, (k, (_, y)) in zip(axes, points.items()):
        ax.scatter(xy[k][:, 0], xy[k][:, 1], c=colours[y.numpy()], s=2, linewidths=0)
        ax.set_title(k)
    present = sorted(set().union(*(y.unique().tolist() for _, y in points.values())))
    handles = [Line2D([], [], ls="", marker="o", color=colours[c], label=labels.names[c]) for c in present]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"embedding space ({name.upper()} fitted on the GMM samples)")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return name


def plot_ablations(res: dict, path: Path) -> None:
    """Target mIoU per method against τ (with the GMM separation) and against λ; failed rounds are gaps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("tau", "lam") if p in res]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        keys = list(res[part])
        x = np.arange(len(keys))  # evenly spaced: the values are the paper's, not a scale
        for m in METHODS:
            ax.plot(x, [res[part][k][m].get("target", np.nan) for k in keys], "o-", label=f"{m} target mIoU")
        ax.axhline(res["source_only"]["target"], color="grey", ls="--", label="source-only")
        ax.set_xticks(x, keys)
        ax.set_xlabel("τ" if part == "tau" else "λ")
        ax.set_ylabel("target mIoU")
        if part == "tau":
            ax2 = ax.twinx()
            ax2.bar(x, [res[part][k]["separation"]["bhattacharyya_mean"] or 0 for k in keys], alpha=0.2, color="k")
            ax2.set_ylabel("mean Bhattacharyya distance (bars)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(bench_quality.PRESETS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=100, help="adaptation steps per round")
    ap.add_argument("--what", default=",".join(PARTS), help=f"comma list of parts: {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=Path("ablations.json"))
    ap.add_argument("--plot-dir", type=Path, default=Path("."), help="where ablations.png and embedding.png go")
    args = ap.parse_args(argv)
    what = args.what.split(",")
    if unknown := [w for w in what if w not in PARTS]:
        sys.exit(f"error: unknown parts {unknown}; choose from {list(PARTS)}")
    t0 = time.perf_counter()
    s = bench_quality.Setup(args.preset, args.device, log=lambda msg: print(msg, file=sys.stderr))
    try:
        res = {"preset": args.preset, "device": bench_quality._device_name(args.device), "adapt_steps": args.steps,
               "source_only": {"target": s.score(s.src.net, f"{TARGET}-val"), "source": s.score(s.src.net, "source-val")}}
        for part in what:
            if part == "embedding":
                points, error = embedding_points(s, args.steps)
                png = args.plot_dir / "embedding.png"
                res["embedding"] = {"png": str(png), "projection": plot_embedding(points, png, s.src.net.labels),
                                    "points": {k: len(y) for k, (_, y) in points.items()}, "error": error}
            else:
                res[part] = (tau_rows if part == "tau" else lam_rows)(s, args.steps)
                plot_ablations(res, args.plot_dir / "ablations.png")
            res["seconds"] = time.perf_counter() - t0
            args.out.write_text(json.dumps(res, indent=1))  # after every part: a stopped run keeps its parts
            print(f"{part} done ({res['seconds']:.0f} s)", file=sys.stderr)
    finally:
        s.close()
    print(tables(res))
    return res


if __name__ == "__main__":
    main()
