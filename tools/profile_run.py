#!/usr/bin/env python
"""Where the time of `mas3-edge run` goes: py-spy samples of every thread, sorted into the parts of
the serving path, in milliseconds of CPU per served frame.

    python tools/profile_run.py --bundle B --camera video.avi --seconds 25 --out profile.json

Runs `mas3-edge run` unpaced (--fps 0, --no-buffer --no-adapt unless --buffer) under
`py-spy record --native --threads` twice: once counting the samples where a thread is on the CPU,
once (--gil) those where it holds the GIL. Start-up (imports, engine load) is counted apart.
py-spy must be installed (`pip install -e .[profile]`) and allowed to trace its child (ptrace).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# (a frame of the stack, the part it is): the first that occurs in a stack names the part
PARTS = [("encode_overlay", "overlay colouring + JPEG"), ("wire.py", "wire message encode"),
         ("Publisher.send", "publish (ZeroMQ send)"), ("record_labels", "telemetry"), ("Telemetry", "telemetry"),
         ("FrameBuffer.offer", "buffer offer (thumbnail, queue)"), ("FrameBuffer._write", "buffer PNG encode + write"),
         ("_housekeeping", "status, metrics, scheduler"), ("refit", "refit to the engine's size"),
         ("OrtEngine._infer", "inference (ONNX Runtime run)"), ("Engine.infer", "input checks"),
         ("read_latest", "take the newest frame"), ("_CvReader.read", "decode (OpenCV)"),
         ("_SyntheticReader.read", "render (synthetic)"), ("to_rgb", "BGR -> RGB"), ("fit (", "crop + resize"),
         ("Camera._publish", "camera hand-over"), ("_wait_taken", "camera waits for the consumer"),
         ("EngineSwapper._watch", "engine swapper (a timed wait)"), ("GarbageCollectorThread", "ZeroMQ's gc thread (a wait)")]
# py-spy counts a thread blocked in a timed wait as on the CPU now and then: those rows are waits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--camera", required=True, help="a video file (read unpaced, looped)")
    p.add_argument("--engine", default="onnxruntime")
    p.add_argument("--threads", type=int, default=None, help="--threads of run (default: its own choice)")
    p.add_argument("--seconds", type=float, default=25.0)
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--buffer", action="store_true", help="buffer frames as a service with adaptation does")
    p.add_argument("--out", type=Path, help="write the table as JSON here")
    return p.parse_args(argv)


def record(a: argparse.Namespace, work: Path, gil: bool) -> tuple[Path, int]:
    """One py-spy recording of one `run`; the raw samples and the frames that run served."""
    raw = work / ("gil.txt" if gil else "cpu.txt")
    run = [sys.executable, "-c", "from mas3_edge.cli import main; main()", "run", "--camera", a.camera, "--loop",
           "--bundle", str(a.bundle), "--engine", a.engine, "--publish", f"ipc://{work}/p.sock", "--fps", "0",
           "--duration", str(a.seconds), "--status-every", "5", "--no-adapt"]
    run += ["--buffer", str(work / "frames"), "--buffer-every", "1", "--buffer-interval", "0"] if a.buffer else ["--no-buffer"]
    run += ["--threads", str(a.threads)] if a.threads else []
    spy = [shutil.which("py-spy") or "py-spy", "record", "--native", "--threads", "-r", str(a.rate), "-f", "raw",
           "-o", str(raw), *(["--gil"] if gil else []), "--"]
    out = subprocess.run(spy + run, capture_output=True, text=True, timeout=a.seconds + 300)
    m = re.search(r"stopped after (\d+) frames", out.stdout + out.stderr)
    if not raw.exists() or m is None:
        raise SystemExit(f"py-spy or run failed:\n{(out.stdout + out.stderr)[-2000:]}")
    return raw, int(m.group(1))


def tally(raw: Path) -> collections.Counter:
    """Samples per (thread, part); the main thread's samples outside the loop are start-up."""
    out: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        head = stack.split(";", 1)[0]
        thread = re.sub(r"\s*\(\d+\)", "", head.split(":", 1)[1]).strip() if ":" in head else "MainThread"
        thread = thread or "MainThread"
        part = next((p for s, p in PARTS if s in stack), "other")
        if thread == "MainThread" and "Service._loop" not in stack:
            part = "start-up (imports, engine load) and exit"
        out[(thread, part)] += int(n)
    return out


def table(cpu: collections.Counter, gil: collections.Counter, frames: int, gil_frames: int, rate: int) -> list[dict]:
    ms = lambda n, f: 1e3 * n / rate / max(f, 1)  # noqa: E731
    rows = [{"thread": t, "part": p, "cpu_ms_per_frame": ms(n, frames), "gil_ms_per_frame": ms(gil[(t, p)], gil_frames)}
            for (t, p), n in cpu.items()]
    return sorted(rows, key=lambda r: (r["part"].startswith("start-up"), -r["cpu_ms_per_frame"]))


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mas3-profile-"))
    try:
        cpu_raw, frames = record(a, work, gil=False)
        gil_raw, gil_frames = record(a, work, gil=True)
        rows = table(tally(cpu_raw), tally(gil_raw), frames, gil_frames, a.rate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"frames": frames, "seconds": a.seconds, "fps": frames / a.seconds, "rate": a.rate,
           "gil_run_frames": gil_frames, "rows": rows, "args": {k: str(v) for k, v in vars(a).items()}}
    print(f"{frames} frames in {a.seconds:g} s ({res['fps']:.1f} fps, start-up included); py-spy at {a.rate} Hz\n")
    print("| thread | part | CPU ms / frame | GIL held ms / frame |\n|---|---|---:|---:|")
    for r in rows:
        if r["cpu_ms_per_frame"] >= 0.05:
            print(f"| {r['thread']} | {r['part']} | {r['cpu_ms_per_frame']:.1f} | {r['gil_ms_per_frame']:.1f} |")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
