#!/usr/bin/env python
"""What an adapted model (several normalisation sets) costs against a one-set model, per engine.

    python tools/bench_sets.py --sizes 256x512,512x1024 --threads 1 --out docs/results/bench_sets.json
    python tools/bench_sets.py --device cuda --engines torch-cudagraph,torch-compile,tensorrt --sets 1,2
    python tools/bench_sets.py --quick                      # CI-sized: tiny model, 64x128
    python tools/bench_sets.py --sizes 256x512 --engines torch,torch-compile --keep /tmp/sets   # twice: a restart

The same untrained network (edge preset by default) is saved as bundle versions with 1, 2 and 8
normalisation sets (the extra sets: the source statistics moved a little, so every layer has sets
that differ and nothing folds the way a one-set model does), each exported with the usual parity
check. Engine rows:

    onnxruntime          model.onnx: an adapted model's sets blended per frame inside the graph
    onnxruntime-per-set  export/sets.py: the router, then the frame's set folded into its own graph
    torch                PyTorch eager; an adapted model as one folded copy per set (PerSetFolded)
    torch-*              the other PyTorch engines (GPU), torch-compile (Inductor, cached)
    tensorrt             TensorRT on model.onnx, or on the per-set graphs when exported (GPU)

Every (engine, sets) cell is called in turn, one call each, for --seconds per size and batch, so a
noisy neighbour slows them alike. Each call records its wall time and the process CPU time it
used: on a shared machine the CPU time (with --threads 1, a single thread that does all the work)
is the steadier measure of what a frame costs. `vs 1 set` is the cell's p50 over the one-set
model's p50 on the same engine (wall and CPU); the floor is <= 1.1x, judged on the CPU time on a
CPU and on the wall time on a GPU. Prints markdown, --out JSON.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import hardware, report  # noqa: E402

log = logging.getLogger("bench_sets")
FLOOR = 1.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "edge"], default=None, help="architecture (default edge; --quick tiny)")
    p.add_argument("--sizes", default=None, help="HxW list (default 256x512,512x1024; --quick 64x128)")
    p.add_argument("--sets", default="1,2,8", help="normalisation sets per model; must include 1 (default 1,2,8)")
    p.add_argument("--per-set-graphs", default="2", help="set counts that also get the per-set ONNX layout "
                   "(each set one more export; default 2; 'none' for none)")
    p.add_argument("--batches", default="1", help="batch sizes (default 1: the latency floor)")
    p.add_argument("--engines", default=None, help="default onnxruntime,onnxruntime-per-set,torch on CPU; "
                   "torch-cudagraph,torch-compile,tensorrt on CUDA")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime and torch intra-op threads")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per size and batch (all cells, "
                   "interleaved; default 40, --quick 2)")
    p.add_argument("--quick", action="store_true", help="tiny model at 64x128, 2 seconds")
    p.add_argument("--keep", type=Path, help="keep the bundle versions here, and reuse them when run again "
                   "(a second run shows what a restart costs: torch-compile reads its kernels from the disk cache)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    a.preset = a.preset or ("tiny" if a.quick else "edge")
    a.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in (a.sizes or ("64x128" if a.quick else "256x512,512x1024")).split(",")]
    a.sets = sorted({int(s) for s in a.sets.split(",")})
    a.per_set_graphs = [] if a.per_set_graphs == "none" else [int(s) for s in a.per_set_graphs.split(",")]
    a.batches = [int(b) for b in a.batches.split(",")]
    a.seconds = a.seconds if a.seconds is not None else (2.0 if a.quick else 40.0)
    cpu = a.device == "cpu"
    a.engines = a.engines.split(",") if a.engines else (
        ["onnxruntime", "onnxruntime-per-set", "torch"] if cpu else ["torch-cudagraph", "torch-compile", "tensorrt"])
    if 1 not in a.sets:
        p.error("--sets must include 1 (the one-set model every ratio is taken against)")
    return a


def with_sets(net, n: int, seed: int = 1):
    """A copy of `net` with n normalisation sets: the source set, then n-1 moved a little from it."""
    import torch
    from mas3_edge.model import DomainNorm
    net, g = copy.deepcopy(net), torch.Generator().manual_seed(seed)
    if n == 1:
        return net.eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, DomainNorm):
                rows = [m.working()]
                for _ in range(n - 1):
                    r = rows[0].clone()
                    r[0] += 0.1 * torch.randn(r.shape[1], generator=g)  # mean
                    r[2] *= 1 + 0.05 * torch.rand(r.shape[1], generator=g)  # weight
                    rows.append(r)
                m.bank = torch.stack(rows[:-1])
                m.set_working(rows[-1])
    return net.eval()


def make_versions(root: Path, args: argparse.Namespace, size: tuple[int, int]) -> dict[int, Path]:
    """One exported bundle version per set count (per-set graphs too for --per-set-graphs)."""
    import torch
    from mas3_edge import bundle
    from mas3_edge.config import preset
    from mas3_edge.export.onnx import export_onnx
    from mas3_edge.model import SegNet
    torch.manual_seed(0)
    net = SegNet(replace(preset(args.preset), input_size=size)).eval()
    out = {}
    for n in args.sets:
        t0 = time.perf_counter()
        keep = root / f"{args.preset}-{size[0]}x{size[1]}-{n}"
        vdir = bundle.resolve(keep) if (keep / "SERVING").exists() else \
            bundle.save_version(keep, with_sets(net, n), info={"note": "benchmark copy"})
        if needs_onnx(args.engines):
            export_onnx(vdir, per_set=n > 1 and n in args.per_set_graphs)  # reused when up to date
        log.info("%dx%d, %d set(s): saved and exported in %.0f s", *size, n, time.perf_counter() - t0)
        out[n] = vdir
    return out


def needs_onnx(engines: list[str]) -> bool:
    """Whether any engine asked for reads the export (TensorRT only where it can run)."""
    from mas3_edge.export.tensorrt import tensorrt_status
    return any(e.startswith("onnxruntime") for e in engines) or ("tensorrt" in engines and tensorrt_status()[0])


def load(kind: str, vdir: Path, n: int, args: argparse.Namespace):
    """The engine of `kind` for one version, or None where the cell does not apply."""
    from mas3_edge.runtime.engines import load_engine
    per_set = kind == "onnxruntime-per-set"
    if per_set and (n == 1 or n not in args.per_set_graphs):
        return None
    base = "onnxruntime" if per_set else kind
    # onnxruntime: the blended graph or (-per-set) the per-set graphs; tensorrt: per-set where exported
    return load_engine(vdir, base, args.device, batch_sizes=tuple(args.batches), threads=args.threads,
                       per_set=per_set if base == "onnxruntime" else None)


def bench_size(versions: dict[int, Path], size: tuple[int, int], args: argparse.Namespace) -> list[dict]:
    engines, rows = {}, []
    for kind in args.engines:
        for n, vdir in versions.items():
            try:
                t0 = time.perf_counter()
                e = load(kind, vdir, n, args)
            except Exception as ex:  # one engine missing here must not end the run: a row says why
                log.warning("%s, %d set(s): %s", kind, n, str(ex).splitlines()[0])
                rows.append({"engine": kind, "sets": n, "size": f"{size[0]}x{size[1]}", "error": str(ex).splitlines()[0]})
                continue
            if e is not None:
                engines[kind, n] = e
                e.load_s = time.perf_counter() - t0
                log.info("%s, %d set(s) loaded in %.1f s: %s", kind, n, e.load_s, e.provider)
    rng = np.random.default_rng(0)
    for batch in args.batches:
        frames = rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)
        for e in engines.values():
            e.infer(frames)  # warm-up
        wall: dict = {k: [] for k in engines}
        cpu: dict = {k: [] for k in engines}
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds or min(len(v) for v in wall.values()) < 3:
            for k, e in engines.items():  # one call each, in turn
                t, c = time.perf_counter(), time.process_time()
                e.infer(frames)
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
        for (kind, n), e in engines.items():
            w, c = np.array(wall[kind, n]) * 1e3, np.array(cpu[kind, n]) * 1e3
            rows.append({"engine": kind, "provider": e.provider, "sets": n, "size": f"{size[0]}x{size[1]}",
                         "batch": batch, "calls": len(w), "p50_ms": float(np.median(w)),
                         "p99_ms": float(np.percentile(w, 99)), "cpu_p50_ms": float(np.median(c)),
                         "load_s": e.load_s, **({"compile_cache": e.cache} if hasattr(e, "cache") else {})})
        log.info("%dx%d batch %d: %d rounds", *size, batch, min(len(v) for v in wall.values()))
    for e in engines.values():
        e.close()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """vs the one-set model on the same engine; ONNX Runtime per-set rows against onnxruntime's."""
    base = {(r["engine"], r["size"], r["batch"]): r for r in rows if r.get("sets") == 1 and "p50_ms" in r}
    for r in rows:
        if "p50_ms" not in r:
            continue
        one = base.get(("onnxruntime" if r["engine"] == "onnxruntime-per-set" else r["engine"], r["size"], r["batch"]))
        if one:
            r["vs_one_set"] = r["p50_ms"] / one["p50_ms"]
            r["cpu_vs_one_set"] = r["cpu_p50_ms"] / one["cpu_p50_ms"]


def markdown(rows: list[dict], hw: dict, args: argparse.Namespace) -> str:
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    gpu = f", GPU {hw['gpu']}" if hw.get("gpu") else ""
    lines = [f"Adapted vs one-set model, preset {args.preset} (untrained), {hw['cpu']} ({hw['cpu_count']} cores){gpu}, "
             f"{threads}; torch {hw['torch']}, onnxruntime {hw['onnxruntime']}. Floor: <= {FLOOR}x the one-set p50.",
             "", "| engine | size | batch | sets | p50 ms | p99 ms | CPU ms/call | vs 1 set (wall) | vs 1 set (CPU) | floor "
             "| load s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["size"], r.get("batch", 0), r["engine"].replace("-per-set", "~"), r["sets"])):
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['size']} | | {r['sets']} | unavailable: {r['error']} | | | | | | |")
            continue
        vs = f"{r['vs_one_set']:.2f}x" if "vs_one_set" in r else ""
        cvs = f"{r['cpu_vs_one_set']:.2f}x" if "cpu_vs_one_set" in r else ""
        judged = r.get("cpu_vs_one_set" if args.device == "cpu" else "vs_one_set")
        floor = "" if r["sets"] == 1 or judged is None else "met" if judged <= FLOOR else "not met"
        lines.append(f"| {r['engine']} | {r['size']} | {r['batch']} | {r['sets']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['cpu_p50_ms']:.1f} | {vs} | {cvs} | {floor} | {r['load_s']:.1f}"
                     + (f" (compile cache {r['compile_cache']})" if "compile_cache" in r else "") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    hw, rows = hardware(args.device), []
    with tempfile.TemporaryDirectory(prefix="mas3-bench-sets-") as tmp:
        for size in args.sizes:
            rows += bench_size(make_versions(args.keep or Path(tmp), args, size), size, args)
    add_ratios(rows)
    return report(rows, hw, args, markdown)


if __name__ == "__main__":
    main()
