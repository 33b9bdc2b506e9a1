#!/usr/bin/env python
"""INT8 against fp32 ONNX Runtime on a CPU: latency side by side, size on disk, resident memory.

    python tools/bench_int8.py                                   # edge model, 256x512, 1 and 2 threads
    python tools/bench_int8.py --variants qdq,qoperator,minmax --out docs/results/bench_int8_cpu.json

The model is an untrained `edge` network exported by export_onnx (latency does not depend on the
weights); its INT8 graphs are calibrated with export/quantize.py on synthetic frames of the same
size (their parity figures are printed, but say little about an untrained network). Each thread
count times fp32 and every INT8 variant in alternating rounds of single frames, so machine noise
falls on all of them alike; the ratio is p50(INT8) / p50(fp32), the floor INT8 <= 0.55x fp32.
Resident memory: a fresh process per graph and thread count reads its VmRSS before the session is
created, after, and after the first frame (first-run allocations). A round's calibration (the
frame cap of export/quantize.py) runs in another fresh process: its time and peak RSS.

`--outputs classes` times every graph without its confidence output and softmax (export/passes.py,
classes_only): what `run` serves unless it is asked to send the confidence map.

Variants (quantize_static options on top of export/quantize.py's settings):
  qdq          the shipped settings: QDQ, per-channel int8 weights (8-bit range with VNNI, else 7), percentile ranges
  qoperator    QOperator format (QLinearConv nodes instead of Q/DQ pairs)
  minmax       MinMax ranges, full 8-bit weight range
  noends       the shipped settings without the first and last convolution
  pertensor    per-tensor weights
  subdiv       the shipped settings with the input normalisation left as Sub and Div
  fullrange    the shipped settings with the full 8-bit weight range
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

FLOOR = 0.55


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="edge")
    p.add_argument("--size", default="256x512", help="input size HxW (default 256x512)")
    p.add_argument("--threads", default="1,2", help="ONNX Runtime intra-op threads to time (default 1,2)")
    p.add_argument("--variants", default="qdq", help="comma list of INT8 variants (see the docstring)")
    p.add_argument("--frames", type=int, default=16, help="synthetic calibration + held-out frames (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per thread count (default 5)")
    p.add_argument("--runs", type=int, default=6, help="frames per graph per round (default 6)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--profile", action="store_true", help="also print ONNX Runtime's time per op type (1 thread)")
    p.add_argument("--outputs", choices=["both", "classes"], default="both",
                   help="time the graphs with both outputs, or without the confidence map's softmax (classes: "
                        "what `run` serves unless --confidence)")
    p.add_argument("--keep", type=Path, help="keep the graphs in this folder (default: a temporary one)")
    p.add_argument("--_rss", nargs=2, help=argparse.SUPPRESS)  # internal: GRAPH THREADS -> RSS figures
    p.add_argument("--_calibrate", help=argparse.SUPPRESS)  # internal: VERSION_DIR -> a round's calibration
    return p.parse_args(argv)


def variant_options(name: str, fp32: Path) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat
    if name == "qdq":
        return {}
    if name == "qoperator":
        return {"quant_format": QuantFormat.QOperator}
    if name == "minmax":
        return {"calibrate_method": CalibrationMethod.MinMax, "reduce_range": False,
                "extra_options": {"CalibStridedMinMax": 4}}
    if name == "fullrange":  # 8-bit weights: what a CPU with VNNI can take without saturating
        return {"reduce_range": False}
    if name == "subdiv":  # the input normalisation left as the export's Sub and Div
        return {"norm_as_conv": False}
    if name == "pertensor":
        return {"per_channel": False}
    if name == "noends":
        convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
        return {"exclude": [convs[0], convs[-1]]}
    raise SystemExit(f"unknown variant {name!r}")


def make_graphs(work: Path, preset_name: str, size: tuple[int, int], variants: list[str], n: int) -> dict:
    """fp32 model.onnx of an untrained model and one calibrated INT8 graph per variant, with parity."""
    from dataclasses import replace

    import torch

    from mas3_edge import bundle, synth
    from mas3_edge.config import preset
    from mas3_edge.export import quantize
    from mas3_edge.export.onnx import export_onnx
    from mas3_edge.model import SegNet
    torch.manual_seed(0)
    net = SegNet(replace(preset(preset_name), input_size=size)).eval()
    vdir = bundle.save_version(work / "bundle", net, info={"note": "untrained (speed does not depend on weights)"})
    t0 = time.perf_counter()
    fp32 = export_onnx(vdir, per_set=False).path
    graphs = {"fp32": {"path": str(fp32), "bytes": fp32.stat().st_size, "seconds": round(time.perf_counter() - t0, 1)}}
    frames = np.stack([np.asarray(synth.render(synth.DOMAINS[i % 5], 7000 + i, size)[0]) for i in range(n)])
    cal, held = quantize.split_frames(frames)
    for name in variants:
        t0 = time.perf_counter()
        data = quantize.quantize_graph(fp32, cal, **variant_options(name, fp32))
        path = work / f"int8-{name}.onnx"
        path.write_bytes(data)
        check = quantize.parity_int8(fp32, data, held, None)
        graphs[f"int8-{name}"] = {"path": str(path), "bytes": len(data), "seconds": round(time.perf_counter() - t0, 1),
                                  "agreement": check["agreement"], "calibration_frames": len(cal)}
    return graphs


def trim_graphs(graphs: dict, work: Path) -> None:
    """Point every graph at a copy without the confidence softmax, as the engine loads it for `run`."""
    import onnx

    from mas3_edge.export.passes import classes_only
    for name, g in graphs.items():
        path = work / f"{name}.classes.onnx"
        path.write_bytes(classes_only(onnx.load(g["path"])).SerializeToString())
        g["path"] = str(path)


def session(path: str, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as the engine does
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def time_graphs(graphs: dict, threads: int, size: tuple[int, int], rounds: int, runs: int) -> dict:
    """p50/p90 ms of one frame per graph, timed in alternating rounds."""
    frame = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    sessions = {name: session(g["path"], threads) for name, g in graphs.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        for _ in range(2):  # warm-up: kernel choice, first allocations
            s.run(["classes"], {"images": frame})
    for r in range(rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
        for name in order:
            for _ in range(runs):
                t0 = time.perf_counter()
                sessions[name].run(None, {"images": frame})  # every output the graph has
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "n": len(t)}
            for name, t in times.items()}


def profile(path: str, size: tuple[int, int], n: int = 4) -> dict[str, float]:
    """ms per frame by op type, from ONNX Runtime's own profiler (1 thread)."""
    import collections

    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling, so.log_severity_level = 1, True, 3
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "bench-int8-profile")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    frame = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    for _ in range(n):
        s.run(None, {"images": frame})
    trace = Path(s.end_profiling())
    ops: collections.Counter = collections.Counter()
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ops[e["args"]["op_name"]] += e["dur"] / n / 1e3
    trace.unlink()
    return {"total": round(sum(ops.values()), 1), **{k: round(v, 1) for k, v in ops.most_common(8)}}


def rss_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_child(path: str, threads: int, size: tuple[int, int]) -> dict:
    """In this (fresh) process: RSS before the session, after creating it, after the first frame."""
    import onnxruntime  # noqa: F401  (the library itself is not the engine's cost)
    before = rss_kb()
    s = session(path, threads)
    created = rss_kb()
    s.run(None, {"images": np.zeros((1, *size, 3), np.uint8)})
    first = rss_kb()
    return {"session_mb": (created - before) / 1024, "after_first_frame_mb": (first - before) / 1024}


def calibrate_child(vdir: Path, size: tuple[int, int]) -> dict:
    """In this (fresh) process: a round's calibration (quantize_version on its frame cap), its wall
    time, and its peak RSS above the process's RSS when it began (the kernel's high-water mark is
    reset first, so the rendering of the frames does not count)."""
    from mas3_edge import synth
    from mas3_edge.export import quantize
    n = quantize.CALIBRATION_FRAMES
    frames = np.stack([np.asarray(synth.render(synth.DOMAINS[i % 5], 9000 + i, size)[0]) for i in range(n)])
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_kb("VmRSS")
    t0 = time.perf_counter()
    entry = quantize.quantize_version(vdir, frames)
    return {"frames": entry["calibration"], "seconds": round(time.perf_counter() - t0, 1),
            "rss_before_mb": round(before / 1024), "peak_rss_mb": round(rss_kb("VmHWM") / 1024)}


def measure_rss(path: str, threads: int, size: tuple[int, int]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--size", f"{size[0]}x{size[1]}", "--_rss", path, str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(res: dict) -> str:
    lines = ["| threads | graph | p50 ms | p90 ms | vs fp32 | floor <= 0.55x | size MB | RSS session MB | RSS after 1st frame MB | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t, row in res["threads"].items():
        base = row["latency"]["fp32"]["p50_ms"]
        for name, lat in row["latency"].items():
            g, m = res["graphs"][name], row["rss"][name]
            ratio = lat["p50_ms"] / base
            floor = "-" if name == "fp32" else ("pass" if ratio <= FLOOR else "FAIL")
            agree = f"{g['agreement']:.2%}" if "agreement" in g else "-"
            lines.append(f"| {t} | {name} | {lat['p50_ms']:.1f} | {lat['p90_ms']:.1f} | {ratio:.2f}x | {floor} "
                         f"| {g['bytes'] / 1e6:.2f} | {m['session_mb']:.1f} | {m['after_first_frame_mb']:.1f} | {agree} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if args._rss:
        print(json.dumps(rss_child(args._rss[0], int(args._rss[1]), size)))
        return None
    if args._calibrate:
        print(json.dumps(calibrate_child(Path(args._calibrate), size)))
        return None
    import onnxruntime
    from mas3_edge.export.quantize import cpu_flags
    flags = cpu_flags() or set()
    res: dict = {"preset": args.preset, "size": list(size), "onnxruntime": onnxruntime.__version__,
                 "cpu_flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")},
                 "cores": os.cpu_count(), "load_average_start": os.getloadavg(), "floor": FLOOR}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res["graphs"] = make_graphs(work, args.preset, size, args.variants.split(","), args.frames)
        res["outputs"], vdir = args.outputs, Path(res["graphs"]["fp32"]["path"]).parent
        if args.outputs == "classes":
            trim_graphs(res["graphs"], work)
        res["threads"] = {}
        for t in (int(v) for v in args.threads.split(",")):
            res["threads"][t] = {"latency": time_graphs(res["graphs"], t, size, args.rounds, args.runs),
                                 "rss": {n: measure_rss(g["path"], t, size) for n, g in res["graphs"].items()}}
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--_calibrate", str(vdir)],
                             capture_output=True, text=True, check=True)
        res["round_calibration"] = json.loads(out.stdout.strip().splitlines()[-1])
        if args.profile:
            res["profile_ms"] = {n: profile(g["path"], size) for n, g in res["graphs"].items()}
    for g in res["graphs"].values():
        g.pop("path")
    res["load_average_end"] = os.getloadavg()
    print(table(res))
    c = res["round_calibration"]
    print(f"a round's calibration ({c['frames']}): {c['seconds']} s, RSS {c['rss_before_mb']} MB before, "
          f"peak {c['peak_rss_mb']} MB")
    for name, ops in res.get("profile_ms", {}).items():
        print(f"{name}: " + ", ".join(f"{k} {v} ms" for k, v in ops.items()))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
