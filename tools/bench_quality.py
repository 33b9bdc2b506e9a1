"""Adaptation quality: every method on every synthetic target, scored on held-out labelled splits.

For each target: target mIoU (held-out split no method adapted on), source mIoU after adaptation
(forgetting), whether the unsupervised health check would accept the round, and wall time.
Prints a markdown table (gain over source-only / change in source mIoU) and writes JSON.

    python tools/bench_quality.py --preset small --out bench_quality.json   # 2 CPU cores
    python tools/bench_quality.py --preset full --device cuda --out q.json   # a GPU
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from mas3_edge import adapt, bundle, health, prototypes, synth, train
from mas3_edge.config import AdaptConfig, preset
from mas3_edge.evaluate import evaluate

TARGETS = {"realistic": 0.0, "night": 0.0, "fog": 0.0, "rain": 0.0, "label-shift": 0.7}
PRESETS = {"small": dict(n_train=600, n_adapt=200, n_val=60, train_steps=1000, workers=2),
           "full": dict(n_train=600, n_adapt=300, n_val=100, train_steps=2000, workers=15)}
# Each row changes one thing, so the table shows what each change of the shipped mas3 does.
METHODS = {
    "bn": dict(method="bn"), "tent": dict(method="tent"), "pseudo": dict(method="pseudo"),
    "mas3-paper": dict(method="mas3-paper"),
    "mas3 (all params at lr 1e-4)": dict(method="mas3", params="all", lr=1e-4),
    "mas3 (pooled SWD)": dict(method="mas3", class_conditional=False),
    "mas3 (bn mix 0.5)": dict(method="mas3", bn_mix=0.5),
    "mas3": dict(method="mas3"),
}


class Pairs:
    def __init__(self, pairs):
        self.x, self.y = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _render(args):
    domain, seed, i, shift = args
    return synth.render(domain, synth.scene_seed(seed, i), (128, 256), shift)


def make_data(p: dict) -> dict[str, Pairs]:
    splits = {"source-train": ("synthetic", 1, p["n_train"], 0.0), "source-val": ("synthetic", 2, p["n_val"], 0.0)}
    for t, shift in TARGETS.items():
        domain = "realistic" if t == "label-shift" else t
        splits[f"{t}-adapt"], splits[f"{t}-val"] = (domain, 3, p["n_adapt"], shift), (domain, 4, p["n_val"], shift)
    with Pool(p["workers"]) as pool:
        return {k: Pairs(pool.map(_render, [(d, s, i, sh) for i in range(n)], chunksize=8))
                for k, (d, s, n, sh) in splits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=100, help="adaptation steps per round")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of rows (names as in METHODS)")
    ap.add_argument("--out", type=Path, default=Path("bench_quality.json"))
    args = ap.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        sys.exit(f"error: unknown rows {unknown}; choose from {list(METHODS)}")
    p, t0 = PRESETS[args.preset], time.perf_counter()
    data = make_data(p)
    root = Path(tempfile.mkdtemp(prefix="mas3-quality-"))
    train.train(data["source-train"], preset("tiny"), train.TrainConfig(steps=p["train_steps"]), root,
                root / "ckpt", device=args.device)
    src = bundle.load_version(root)
    proto = prototypes.fit(src.net, data["source-train"], device=args.device)
    prototypes.save(proto, src.prototypes_path, src.meta["source_sha256"], "synth:synthetic")
    print(f"source model and prototypes ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    def score(net, target):
        net = net.to(args.device)
        return evaluate(net, data[f"{target}-val"])["miou"], evaluate(net, data["source-val"])["miou"]

    results = {"source-only": {t: dict(zip(("target", "source"), score(src.net, t))) for t in TARGETS}}
    for name in args.methods.split(","):
        results[name] = {}
        for t in TARGETS:
            r = adapt.run_round(root, data[f"{t}-adapt"].x, AdaptConfig(steps=args.steps, **METHODS[name]),
                                src.id, guard=False, device=args.device)
            tgt, s = score(bundle.load_version(r.version_dir).net, t)
            ok, why = health.accept(r.report["health_before"], r.report["health_after"])
            results[name][t] = {"target": tgt, "source": s, "accepted": ok, "reason": why,
                                "seconds": r.report.get("seconds"), "health_before": r.report["health_before"],
                                "health_after": r.report["health_after"]}
            shutil.rmtree(r.version_dir)
        print(f"{name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        report = {"preset": args.preset, "device": _device_name(args.device), "adapt_steps": args.steps,
                  "results": results, "seconds": time.perf_counter() - t0}
        args.out.write_text(json.dumps(report, indent=1))  # after every row: a stopped run keeps its rows
    shutil.rmtree(root)
    print(table(results))


def table(results: dict) -> str:
    base = results["source-only"]
    head = "| method | " + " | ".join(f"{t} gain / source Δ" for t in TARGETS) + " | mean gain |"
    rows = [head, "|" + "---|" * (len(TARGETS) + 2),
            "| source-only (mIoU) | " + " | ".join(f"{base[t]['target']:.1f} / {base[t]['source']:.1f}" for t in TARGETS) + " | |"]
    for name, r in results.items():
        if name == "source-only":
            continue
        cells = [f"{r[t]['target'] - base[t]['target']:+.1f} / {r[t]['source'] - base[t]['source']:+.1f}"
                 f"{'' if r[t]['accepted'] else ' (r)'}" for t in TARGETS]
        mean = np.mean([r[t]["target"] - base[t]["target"] for t in TARGETS])
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {mean:+.2f} |")
    return "\n".join(rows) + "\n\n(r): the unsupervised health check would have rejected the round."


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    import platform
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
