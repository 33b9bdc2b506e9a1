#!/usr/bin/env python
"""Inference speed per engine x resolution x batch, PyTorch eager side by side, in one run.

    python tools/bench_inference.py --preset edge                    # 256x512 and 512x1024, batch 1 and 8
    python tools/bench_inference.py --quick --out bench.json         # CI-sized
    python tools/bench_inference.py --bundle bundle --device cuda    # trained weights, GPU engines

Each timed call goes from a uint8 RGB frame batch in host memory to the class map and confidence
in host memory (normalisation, uploads and downloads included): what the serving loop pays. The
weights are untrained unless --bundle is given (speed does not depend on them); for each
resolution the network is saved as a temporary bundle version and exported with the usual parity
check, so the engines load exactly as the runtime loads them. Engines are timed in interleaved
rounds, so a noisy neighbour slows all of them alike. Each row also carries the network's FLOPs
and activation bytes per image and the achieved TFLOP/s, and with a peak (--peak-tflops, default
on CUDA the H200's fp16 dense 989) the fraction of it. Prints a markdown table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

log = logging.getLogger("bench")
CPU_ENGINES = ["torch", "onnxruntime"]
H200_FP16_TFLOPS = 989.0  # dense fp16/bf16 tensor-core peak of an H200 SXM
GPU_ENGINES = ["torch", "torch-fp16", "torch-cudagraph", "torch-compile", "onnxruntime", "tensorrt"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "edge"], default="edge", help="architecture (default edge)")
    p.add_argument("--bundle", type=Path, help="take the weights of this bundle's serving (or --version) version")
    p.add_argument("--version", help="version id inside --bundle")
    p.add_argument("--sizes", help="HxW list, default 256x512,512x1024 (--quick: 128x256)")
    p.add_argument("--batches", help="batch sizes, default 1,8 (--quick: 1,2)")
    p.add_argument("--engines", help=f"comma list; default {','.join(CPU_ENGINES)} on CPU, {','.join(GPU_ENGINES)} on CUDA")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"], help="TensorRT precision")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3, --quick 1)")
    p.add_argument("--seconds", type=float, default=None, help="minimum timed seconds per engine and round")
    p.add_argument("--no-parity", action="store_true", help="skip the TensorRT build's parity check "
                   "(untrained weights can have near-tied classes that fp16 flips)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak of the device, for the achieved fraction "
                   f"(default on CUDA {H200_FP16_TFLOPS:g}: H200 fp16 dense; none on CPU)")
    p.add_argument("--quick", action="store_true", help="a CI-sized run: small sizes, few iterations")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    a.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in (a.sizes or ("128x256" if a.quick else "256x512,512x1024")).split(",")]
    a.batches = [int(b) for b in (a.batches or ("1,2" if a.quick else "1,8")).split(",")]
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.seconds = a.seconds if a.seconds is not None else (0.0 if a.quick else 1.0)
    return a


def hardware(device: str) -> dict:
    """What the numbers were measured on (goes into the table header and the JSON)."""
    import onnxruntime
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers(),
            "device": device, "python": platform.python_version()}
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import tensorrt
        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    return info


def make_version(root: Path, args: argparse.Namespace, size: tuple[int, int]) -> Path:
    """A bundle version of the chosen network at `size`, exported to ONNX (with its parity check)."""
    import torch
    from mas3_edge.export.onnx import export_onnx
    from mas3_edge import bundle
    from mas3_edge.config import preset
    from mas3_edge.model import SegNet
    if args.bundle:
        src = bundle.load_version(args.bundle, args.version)
        net = SegNet(replace(src.net.config, input_size=size))
        net.load_weights(src.net.state_dict())  # fully convolutional: the weights fit any size
    else:
        torch.manual_seed(0)
        net = SegNet(replace(preset(args.preset), input_size=size))
    vdir = bundle.save_version(root / f"{size[0]}x{size[1]}", net.eval(), info={"note": "benchmark copy"})
    export_onnx(vdir)
    return vdir


def model_cost(vdir: Path) -> dict:
    """FLOPs (torch.utils.flop_counter: 2 per multiply-add) and activation bytes (every tensor an op
    writes, views excluded, fp32; half that under fp16) of one image through the served network."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode
    from mas3_edge.bundle import load_version
    from mas3_edge.model import Deployed, fold_batchnorm

    class Written(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not getattr(func, "is_view", False):
                self.total += sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            return out
    net = load_version(vdir).net.eval()
    model = Deployed(fold_batchnorm(net)).eval()  # what an engine runs (one set, folded)
    x = torch.zeros((1, *net.config.input_size, 3), dtype=torch.uint8)
    with torch.inference_mode(), FlopCounterMode(display=False) as flops, Written() as written:
        model(x)
    return {"gflop_per_image": flops.get_total_flops() / 1e9, "activation_mb_per_image": written.total / 1e6}


def load(kind: str, vdir: Path, args: argparse.Namespace, device: str):
    from mas3_edge.runtime.engines import load_engine
    if kind == "tensorrt" and args.no_parity:
        from mas3_edge.export.tensorrt import ensure_engine
        ensure_engine(vdir, args.precision, tuple(args.batches), device, verify=False)
    return load_engine(vdir, kind, device, precision=args.precision, batch_sizes=tuple(args.batches),
                       threads=args.threads)


def time_calls(engine, frames: np.ndarray, seconds: float, min_calls: int) -> list[float]:
    """Latencies (s) of back-to-back infer calls: at least `min_calls` and `seconds` of them."""
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        engine.infer(frames)
        out.append(time.perf_counter() - t0)
    return out


def bench_size(vdir: Path, size: tuple[int, int], args: argparse.Namespace, device: str, engines: list[str]) -> list[dict]:
    """All engines x batches at one resolution, timed in interleaved rounds."""
    loaded, rows, cost = {}, [], model_cost(vdir)
    for kind in engines:
        try:
            loaded[kind] = load(kind, vdir, args, device)
        except Exception as e:  # one missing engine must not end the run: report it as a row
            log.warning("%s at %dx%d: %s", kind, *size, str(e).splitlines()[0])
            rows.append({"engine": kind, "size": f"{size[0]}x{size[1]}", "error": str(e).splitlines()[0]})
    rng = np.random.default_rng(0)
    for batch in args.batches:
        frames = rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)
        lat: dict[str, list[float]] = {k: [] for k in loaded}
        for engine in loaded.values():
            time_calls(engine, frames, 0.0, 1 if args.quick else 3)  # warm-up: allocators, kernel choice
        for _ in range(args.rounds):
            for kind, engine in loaded.items():
                lat[kind] += time_calls(engine, frames, args.seconds, 2 if args.quick else 3)
        rows += [{**row(loaded[k], size, batch, v), **cost} for k, v in lat.items()]
        log.info("%dx%d batch %d done", *size, batch)
    for engine in loaded.values():
        engine.close()
    return rows


def row(engine, size: tuple[int, int], batch: int, lat: list[float]) -> dict:
    ms = np.array(lat) * 1000
    return {"engine": engine.name, "provider": engine.provider, "precision": engine.precision,
            "size": f"{size[0]}x{size[1]}", "batch": batch, "calls": len(lat),
            "fps": batch * len(lat) / float(np.sum(lat)), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def add_achieved(rows: list[dict], peak_tflops: float | None) -> None:
    """Achieved TFLOP/s (the model's FLOPs x images/s) and, given a peak, the fraction of it."""
    for r in rows:
        if "fps" in r:
            r["tflops"] = r["gflop_per_image"] * r["fps"] / 1e3
            if peak_tflops:
                r["peak_tflops"], r["pct_of_peak"] = peak_tflops, 100 * r["tflops"] / peak_tflops


def add_speedups(rows: list[dict]) -> None:
    """`vs_torch`: FPS over PyTorch eager's at the same size and batch (the side-by-side number)."""
    base = {(r["size"], r["batch"]): r["fps"] for r in rows if r.get("engine") == "torch" and "fps" in r}
    for r in rows:
        if "fps" in r and (r["size"], r["batch"]) in base:
            r["vs_torch"] = r["fps"] / base[(r["size"], r["batch"])]


def markdown(rows: list[dict], hw: dict, args: argparse.Namespace) -> str:
    gpu = f", GPU {hw['gpu']}" if hw.get("gpu") else ""
    lines = [f"Inference, preset {args.preset}{' (--bundle weights)' if args.bundle else ' (untrained weights)'}: "
             f"{hw['cpu']} ({hw['cpu_count']} cores){gpu}; torch {hw['torch']}, onnxruntime {hw['onnxruntime']}"
             f"{', TensorRT ' + hw['tensorrt'] if hw.get('tensorrt') else ''}. Times include uint8 frame in -> maps out.",
             "", "| engine | provider | precision | size | batch | FPS | p50 ms | p99 ms | vs torch eager | "
             "GFLOP/img | act. MB/img | TFLOP/s | % of peak |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | unavailable: {r['error']} | | {r['size']} | | | | | | | | | |")
            continue
        vs = f"{r['vs_torch']:.2f}x" if "vs_torch" in r else ""
        pct = f"{r['pct_of_peak']:.2f} %" if "pct_of_peak" in r else "-"
        lines.append(f"| {r['engine']} | {r['provider']} | {r['precision']} | {r['size']} | {r['batch']} | "
                     f"{r['fps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {vs} | {r['gflop_per_image']:.2f} | "
                     f"{r['activation_mb_per_image']:.0f} | {r['tflops']:.3f} | {pct} |")
    peak = next((r["peak_tflops"] for r in rows if "peak_tflops" in r), None)
    lines.append("\nFLOPs: torch.utils.flop_counter (2 per multiply-add) of the served network, one image; activations: "
                 "bytes every op writes, fp32 (half under fp16)." + (f" Peak: {peak:g} TFLOP/s." if peak else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch
    from mas3_edge.runtime.engines import _resolve_device
    device = _resolve_device(args.device)
    if device != "cpu":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels (this process only)
    engines = args.engines.split(",") if args.engines else (CPU_ENGINES if device == "cpu" else GPU_ENGINES)
    hw, rows = hardware(device), []
    with tempfile.TemporaryDirectory(prefix="mas3-bench-") as tmp:
        for size in args.sizes:
            rows += bench_size(make_version(Path(tmp), args, size), size, args, device, engines)
    add_speedups(rows)
    add_achieved(rows, args.peak_tflops if args.peak_tflops is not None else (H200_FP16_TFLOPS if device != "cpu" else None))
    return report(rows, hw, args, markdown)


def report(rows: list[dict], hw: dict, args: argparse.Namespace, to_markdown) -> dict:
    """Print the table and write the JSON (--out): the end of this tool and of bench_sets."""
    result = {"hardware": hw, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": rows}
    print(to_markdown(rows, hw, args))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
