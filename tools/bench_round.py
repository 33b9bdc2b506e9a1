#!/usr/bin/env python
"""Memory and time of one adaptation round as the service runs it: the round's child process.

    python tools/bench_round.py --preset edge --size 256x512 --frames 20 --steps 5 --out round.json

An untrained model (a sharpened head and prototypes fitted on its own predictions, so the steps
run; speed and memory do not depend on the weights) and `--frames` synthetic night frames written
as a buffer folder. The round runs in a spawned child exactly as the scheduler starts it
(runtime.scheduler.round_child with default_round, 1 torch thread, nice 10), with the guard off so that
it writes and exports a version like an accepted round. The parent samples the child's RSS from
/proc every 0.05 s; the child reports each part's wall time and its peak RSS within the part
(mas3_edge.parts). `swap` is the service's side: loading the exported version's ONNX Runtime
engine and its first frame, in this process. Prints a table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

FLOOR_MB = 800.0  # the round's child on a small device
PARTS = ("load", "adapt", "judge", "write", "export", "int8 calibrate", "swap")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="edge")
    p.add_argument("--size", default="256x512", help="input size HxW (default 256x512)")
    p.add_argument("--frames", type=int, default=20, help="buffered frames the round adapts on (default 20)")
    p.add_argument("--steps", type=int, default=5, help="adaptation steps (default 5)")
    p.add_argument("--tau", type=float, default=0.5, help="the round's tau: low, so that the untrained model's GMM "
                   "samples pass it and the steps run (default 0.5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the round (the scheduler's default 1)")
    p.add_argument("--int8", action="store_true", help="the round also calibrates and checks the INT8 graphs "
                   "(as `run --precision int8`)")
    p.add_argument("--mmap-threshold-mb", type=int, help="the round child's glibc mmap threshold "
                   "(default: the runtime's, mas3_edge.parts.MMAP_THRESHOLD_MB)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.mmap_threshold_mb is None:
        from mas3_edge.parts import MMAP_THRESHOLD_MB
        a.mmap_threshold_mb = MMAP_THRESHOLD_MB
    a.size = tuple(int(v) for v in a.size.lower().split("x"))
    return a


def setup(work: Path, preset_name: str, size: tuple[int, int], n: int) -> tuple[Path, Path]:
    """A one-version bundle of an untrained model with self-fitted prototypes, and a buffer folder."""
    from dataclasses import replace

    import cv2
    import torch

    from bench_runtime import self_prototypes
    from mas3_edge import bundle, synth
    from mas3_edge.config import preset
    from mas3_edge.model import SegNet
    torch.manual_seed(0)
    net = SegNet(replace(preset(preset_name), input_size=size)).eval()
    with torch.no_grad():  # confident predictions, so the GMM samples pass --tau and the steps run (x300, as
        net.head.weight.mul_(30), net.head.bias.mul_(30)  # in bench_runtime, failed the export's parity check)
    root = work / "bundle"
    bundle.save_version(root, net, info={"note": "untrained (memory and time do not depend on weights)"})
    self_prototypes(bundle.load_version(root, "v0001"))
    frames = work / "frames"
    frames.mkdir()
    for i in range(n):
        img, _ = synth.render("night", synth.scene_seed(11, i), size)
        cv2.imwrite(str(frames / f"{i:06d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return root, frames


def run_child(root: Path, frames: Path, a: argparse.Namespace) -> tuple[dict, float, float]:
    """The round in a spawned child as the scheduler runs it -> (its result, peak RSS MB, wall s)."""
    from bench_runtime import rss_mb

    from mas3_edge.runtime.scheduler import default_round, round_child
    job = {"bundle": str(root), "frames": str(frames), "version": "v0001", "adapt": {"steps": a.steps, "guard": False, "tau": a.tau},
           "limit": a.frames, "export": True, "threads": a.threads, "int8": a.int8}
    result = root.parent / "round.json"
    proc = mp.get_context("spawn").Process(target=_child, args=(a.mmap_threshold_mb, round_child, default_round, job,
                                                                str(result), 10, os.getpid(), "bench"))
    t0, peak = time.monotonic(), 0.0
    proc.start()
    while proc.is_alive():
        try:
            peak = max(peak, rss_mb(proc.pid))
        except OSError:
            pass
        time.sleep(0.05)
    wall = time.monotonic() - t0
    proc.join()
    return json.loads(result.read_text()), peak, wall


def _child(mmap_threshold_mb: int | None, round_child, *args) -> None:
    from mas3_edge import parts
    if mmap_threshold_mb is not None:
        parts.MMAP_THRESHOLD_MB = mmap_threshold_mb
    round_child(*args)


def swap(root: Path, version: str, precision: str = "fp32") -> dict:
    """What the service does on its side: load the new version's engine (and its first frame)."""
    import numpy as np

    from mas3_edge.runtime.engines import load_engine
    t0 = time.perf_counter()
    engine = load_engine(root / "versions" / version, "onnxruntime", "cpu", precision=precision, threads=1,
                         confidence=False)  # as `run` loads it
    engine.infer(np.zeros((1, *engine.input_size, 3), np.uint8))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": None, "note": "in the serving process"}


def markdown(res: dict) -> str:
    lines = ["| part | wall s | peak RSS in the part, MB |", "|---|---:|---:|"]
    for name in PARTS:
        r = res["parts"].get(name)
        if r is None:
            lines.append(f"| {name} | not measured | |")
            continue
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "(serving process)"
        lines.append(f"| {name} | {r['seconds']:.1f} | {peak} |")
    c = res["child"]
    lines.append(f"\nround child: peak RSS {c['peak_rss_mb']:.0f} MB (floor < {FLOOR_MB:.0f} MB: "
                 f"{'pass' if c['peak_rss_mb'] < FLOOR_MB else 'FAIL'}), wall {c['wall_s']:.1f} s from spawn to exit, "
                 f"outcome {c['outcome']}; {res['frames']} frames, {res['steps_run']} of {res['steps']} steps run, {res['threads']} torch thread(s), "
                 f"{res['size'][0]}x{res['size'][1]}, mmap threshold {res['mmap_threshold_mb']} MB; torch {res['torch']}; load average at start {res['load_average']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mas3-bench-round-"))
    try:
        print(f"setting up in {work} ...", file=sys.stderr)
        root, frames = setup(work, a.preset, a.size, a.frames)
        load = [round(x, 1) for x in os.getloadavg()]
        print("the round ...", file=sys.stderr)
        out, peak, wall = run_child(root, frames, a)
        parts = dict(out.get("parts") or {})
        parts.setdefault("int8 calibrate", None)  # measured with --int8
        print(f"round: {out.get('outcome')} ({out.get('reason')})", file=sys.stderr)
        steps = None
        if out.get("version"):
            report = json.loads((root / "versions" / out["version"] / "report.json").read_text())
            steps = len(report.get("steps") or [])  # 0: the GMM samples failed tau, no step ran
            if (root / "versions" / out["version"] / "model.onnx").is_file():
                parts["swap"] = swap(root, out["version"], "int8" if (out.get("int8") or {}).get("passed") else "fp32")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch  # which build: a CUDA build maps about 300 MB more at import than a CPU-only one
    res = {"preset": a.preset, "size": list(a.size), "frames": a.frames, "steps": a.steps, "threads": a.threads,
           "mmap_threshold_mb": a.mmap_threshold_mb, "torch": torch.__version__, "int8": a.int8,
           "load_average": load, "parts": {k: v for k, v in parts.items() if v is not None},
           "steps_run": steps, "result": out,
           "child": {"peak_rss_mb": peak, "wall_s": wall, "outcome": out.get("outcome"), "reason": out.get("reason"),
                     "floor_mb": FLOOR_MB, "passed": peak < FLOOR_MB}}
    print(markdown(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
