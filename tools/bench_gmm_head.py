#!/usr/bin/env python
"""What the fused prototypes' classifier (mas3_edge/gmmhead.py) costs the served model: ONNX Runtime
CPU latency of the plain graph and of the fused one, side by side in one run, as a ratio.

    nice -n 10 python tools/bench_gmm_head.py --out docs/results/bench_gmm_head.json

Two networks at 256x512 (batch 1): the packaged bundle's (D = 19, its shipped prototypes, full
covariance) and the tiny architecture widened to D = 168 with low-rank prototypes (rank 32, random
weights: speed does not depend on them). Each is saved twice, without and with the head (w =
0.2), and exported through the usual path, so both graphs passed their parity check. The engines
are timed in interleaved rounds, so a noisy neighbour slows both alike. Floor: the fused graph at
most 1.15x the plain one for D = 19, printed pass/fail.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

FLOOR = 1.15  # fused / plain for D = 19
SIZE = (256, 512)


def _default_net():
    """The packaged bundle's network at SIZE, and its prototypes."""
    from mas3_edge import bundle, prototypes
    from mas3_edge.arch import build
    ver = bundle.load_version(bundle.PACKAGED)
    net = build(replace(ver.net.config, input_size=SIZE), ver.net.labels)
    net.load_weights(ver.net.state_dict())
    return net.eval(), prototypes.load(ver.prototypes_path, ver.meta)


def _wide_net(d: int = 168):
    """The tiny architecture with D = d and low-rank prototypes of a random covariance."""
    from mas3_edge import prototypes
    from mas3_edge.config import preset
    from mas3_edge.model import SegNet
    torch.manual_seed(0)
    net = SegNet(replace(preset("tiny"), embed_dim=d, input_size=SIZE)).eval()
    k = net.config.num_classes
    a = torch.randn(k, d, d, dtype=torch.float64)
    parts = prototypes.structure(a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64), "lowrank", 32)
    proto = prototypes.Prototypes(torch.full((k,), 1 / k), torch.randn(k, d), None, torch.ones(k), {},
                                  parts["factor"], parts["diag"])
    return net, proto


def export_pair(root: Path, name: str, net, proto, weight: float) -> dict[str, Path]:
    """The plain and the fused version of `net`, each exported with its parity check."""
    import copy
    from mas3_edge import bundle, gmmhead
    from mas3_edge.export.onnx import export_onnx
    fused = copy.deepcopy(net)
    gmmhead.install(fused, proto, weight)
    out = {}
    for kind, model in (("plain", net), ("fused", fused)):
        out[kind] = bundle.save_version(root / f"{name}-{kind}", model, info={"note": "benchmark copy"})
        export_onnx(out[kind], per_set=False)
    return out


def time_pair(vdirs: dict[str, Path], rounds: int, seconds: float, threads: int | None) -> dict[str, list[float]]:
    """Median latency (s) of each engine per round, the engines interleaved."""
    from mas3_edge.runtime.engines import load_engine
    engines = {k: load_engine(v, "onnxruntime", "cpu", threads=threads) for k, v in vdirs.items()}
    frames = np.random.default_rng(0).integers(0, 256, (1, *SIZE, 3), dtype=np.uint8)
    medians: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for k, eng in engines.items():
            eng.infer(frames)  # warm
            calls, start = [], time.perf_counter()
            while len(calls) < 5 or time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                eng.infer(frames)
                calls.append(time.perf_counter() - t0)
            medians[k].append(statistics.median(calls))
    return medians


def row(name: str, d: int, covariance: str, medians: dict[str, list[float]]) -> dict:
    ratios = [f / p for f, p in zip(medians["fused"], medians["plain"])]
    plain, fused = statistics.median(medians["plain"]), statistics.median(medians["fused"])
    return {"network": name, "embed_dim": d, "covariance": covariance, "plain_ms": plain * 1e3,
            "fused_ms": fused * 1e3, "ratio": statistics.median(ratios), "ratio_per_round": ratios}


def table(rows: list[dict]) -> str:
    lines = ["| network | D | covariance | plain ms | fused ms | fused / plain |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['embed_dim']} | {r['covariance']} | {r['plain_ms']:.1f} | {r['fused_ms']:.1f} "
              f"| {r['ratio']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weight", type=float, default=0.2, help="fusion weight w of the fused graphs")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per engine and round")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mas3-gmm-bench-") as tmp:
        for name, make in (("packaged bundle (tiny)", _default_net), ("tiny, D = 168", _wide_net)):
            net, proto = make()
            vdirs = export_pair(Path(tmp), str(len(rows)), net, proto, args.weight)
            rows.append(row(name, proto.d, proto.structure, time_pair(vdirs, args.rounds, args.seconds, args.threads)))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    ratio19 = next(r["ratio"] for r in rows if r["embed_dim"] == 19)
    floor = {"floor": FLOOR, "ratio_d19": ratio19, "pass": ratio19 <= FLOOR}
    print(f"ONNX Runtime CPU, {SIZE[0]}x{SIZE[1]}, batch 1, w = {args.weight}\n\n{table(rows)}\n\n"
          f"floor: fused <= {FLOOR}x plain for D = 19: {ratio19:.3f}x -> {'PASS' if floor['pass'] else 'FAIL'}")
    if args.out:
        from mas3_edge.fsutil import atomic_write_json
        atomic_write_json(args.out, {"size": list(SIZE), "batch": 1, "weight": args.weight, "rounds": args.rounds,
                                     "threads": args.threads, "torch": torch.__version__, "rows": rows, "floor": floor})
    if not floor["pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
