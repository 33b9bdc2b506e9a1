#!/usr/bin/env python
"""End-to-end runtime benchmark: a generated video -> `mas3-edge run` (a real process) -> a
subscriber in another process.

    python tools/bench_runtime.py                          # untrained tiny model, ~4 minutes
    python tools/bench_runtime.py --bundle bundle --out bench_runtime.json
    python tools/bench_runtime.py --quick                  # CI-sized: shorter phases, 2000 messages

Phases (each a fresh `run` process, adaptation off so the numbers are the serving path's):
  throughput  camera unpaced: frames per second the whole path sustains
  latency     camera paced at --fps: capture-to-subscriber latency p50/p99 in normal operation
  hot swaps   paced; `mas3-edge rollback` moves the SERVING pointer three times while serving;
              every frame id must reach the subscriber (dropped = ids missing) and no arrival
              gap may exceed one frame time beyond the period (late = gap > 2 periods)
  stalled     unpaced, --messages frames, one subscriber that connects and never reads:
              the publisher's RSS must stay flat
Prints a markdown table with the hardware; --out writes everything as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle to serve (copied; default: an untrained tiny model)")
    p.add_argument("--engine", default="auto")
    p.add_argument("--fps", type=float, default=15.0, help="camera rate of the paced phases")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the throughput and latency phases")
    p.add_argument("--messages", type=int, default=10000, help="messages of the stalled-subscriber phase")
    p.add_argument("--quick", action="store_true", help="shorter phases and 2000 stalled messages")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--_listen", help=argparse.SUPPRESS)  # internal: the subscriber process
    p.add_argument("--_stall", help=argparse.SUPPRESS)  # internal: the stalled subscriber process
    p.add_argument("--_record", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.messages = min(a.seconds, 8.0), min(a.messages, 2000)
    return a


# ---------------------------------------------------------------- the other processes

def listen(address: str, record: Path, idle_s: float = 4.0) -> None:
    """Every-message subscriber: record (frame id, capture ns, receive ns, version) until idle."""
    from mas3_edge.runtime.subscriber import Subscriber
    rows, last = [], time.monotonic()
    with Subscriber(address, latest_only=False, hwm=100000) as sub:
        while time.monotonic() - last < (idle_s if rows else 120):
            m = sub.recv(timeout=0.2)
            if m is not None:
                rows.append((m.frame_id, m.capture_ns, time.time_ns(), m.version))
                last = time.monotonic()
    record.write_text(json.dumps(rows))


def stall(address: str) -> None:
    """Connect, subscribe, never read: the worst subscriber a publisher can have."""
    import zmq
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    time.sleep(3600)


def py(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], **kw)


def run_cmd(*args: str, **kw) -> subprocess.Popen:
    return py("-c", "from mas3_edge.cli import main; main()", *args, **kw)


# ---------------------------------------------------------------- setup

def make_video(path: Path, n: int = 150, size: tuple[int, int] = (256, 512)) -> Path:
    """Night-domain synthetic scenes at twice the tiny model's size (the camera resizes), MJPG."""
    import cv2

    from mas3_edge import synth
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (size[1], size[0]))
    for i in range(n):
        img, _ = synth.render("night", synth.scene_seed(7, i), size)
        vw.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    vw.release()
    return path


def make_bundle(work: Path, source: Path | None) -> tuple[Path, list[str]]:
    """A bundle with four exported versions (the served one + three to swap to)."""
    import torch

    from mas3_edge.export.onnx import export_onnx
    from mas3_edge import bundle
    from mas3_edge.config import preset
    from mas3_edge.model import SegNet
    root = work / "bundle"
    if source is not None:
        ver = bundle.load_version(source)
        net = ver.net
        bundle.save_version(root, net, files={"prototypes.safetensors": ver.prototypes_path} if ver.prototypes_path.is_file() else None)
    else:
        torch.manual_seed(0)
        net = SegNet(preset("tiny")).eval()
        bundle.save_version(root, net, info={"note": "untrained (speed does not depend on weights)"})
    ids = ["v0001"]
    for k in range(3):
        with torch.no_grad():
            net.head.bias.add_(0.01 * (k + 1))  # a different model each time: a real swap, not a no-op
        ids.append(bundle.save_version(root, net, parent=bundle.load_version(root, ids[-1]), serve=False).name)
    for vid in ids:
        export_onnx(root, vid)
    bundle.set_serving(root, "v0001")
    return root, ids


# ---------------------------------------------------------------- phases

def serve(work: Path, bundle: Path, video: Path, name: str, engine: str, extra: list[str]) -> tuple[subprocess.Popen, str, Path]:
    addr = f"ipc://{work}/{name}.sock"
    events = work / f"{name}.events.jsonl"
    log = open(work / f"{name}.log", "w")
    proc = run_cmd("run", "--camera", str(video), "--loop", "--bundle", str(bundle), "--engine", engine,
                   "--publish", addr, "--no-buffer", "--no-adapt", "--status-every", "2", "--events", str(events),
                   *extra, stdout=log, stderr=subprocess.STDOUT)
    return proc, addr, events


def stop_event(events: Path) -> dict:
    recs = [json.loads(line) for line in events.read_text().splitlines()]
    return next((r for r in reversed(recs) if r["event"] == "stop"), {})


def phase_stream(work, bundle, video, name, engine, seconds, fps, swaps: list[str] | None = None) -> dict:
    record = work / f"{name}.json"
    sub = py(__file__, "--_listen", f"ipc://{work}/{name}.sock", "--_record", str(record))
    proc, _addr, events = serve(work, bundle, video, name, engine, ["--fps", str(fps), "--duration", str(seconds)])
    swap_times = []
    if swaps:
        from mas3_edge.runtime.versions import rollback  # what `mas3-edge rollback VERSION` does, minus its start-up
        _wait_for_first_message(events)
        for vid in swaps:
            time.sleep(seconds / (len(swaps) + 2))
            swap_times.append(time.time_ns())
            rollback(bundle, vid)
    proc.wait(timeout=seconds + 120)
    sub.wait(timeout=60)
    rows = json.loads(record.read_text())
    return summarize_stream(rows, fps, stop_event(events), swap_times)


def _wait_for_first_message(events: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if events.exists() and '"status"' in events.read_text():
            return
        time.sleep(0.2)
    raise RuntimeError("the service never started serving")


def summarize_stream(rows: list, fps: float, stop: dict, swap_times: list[int]) -> dict:
    ids = np.array([r[0] for r in rows])
    cap, recv = np.array([r[1] for r in rows], np.int64), np.array([r[2] for r in rows], np.int64)
    lat = (recv - cap) / 1e6
    span = (recv[-1] - recv[0]) / 1e9 if len(rows) > 1 else 0.0
    gaps = np.diff(recv) / 1e6
    period = 1000.0 / fps if fps else None
    versions = [r[3] for r in rows]
    changes = [i for i in range(1, len(rows)) if versions[i] != versions[i - 1]]
    return {
        "messages": len(rows), "fps": (len(rows) - 1) / span if span else 0.0,
        "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
        "dropped": int((np.diff(ids) - 1).sum()) if len(ids) > 1 else 0,
        "late": int((gaps > 2 * period).sum()) if period else None,
        "max_gap_ms": float(gaps.max()) if len(gaps) else None,
        "swaps_seen": len(changes), "swaps_requested": len(swap_times),
        "dropped_at_swaps": int(sum(ids[i] - ids[i - 1] - 1 for i in changes)),
        "gap_at_swaps_ms": [float(gaps[i - 1]) for i in changes],
        "service": {k: stop.get(k) for k in ("frames", "camera_dropped", "publish_dropped", "engine", "provider",
                                             "infer_p50_ms", "swaps")},
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phase_stalled(work, bundle, video, engine, messages) -> dict:
    addr = f"ipc://{work}/stall.sock"
    staller = py(__file__, "--_stall", addr)
    time.sleep(1.0)
    proc, _addr, events = serve(work, bundle, video, "stall", engine, ["--fps", "0", "--max-frames", str(messages)])
    samples = []
    while proc.poll() is None:
        try:
            samples.append((time.monotonic(), rss_mb(proc.pid)))
        except OSError:
            break
        time.sleep(0.25)
    staller.kill()
    stop = stop_event(events)
    rss = np.array([s[1] for s in samples])
    n = len(rss)
    warm = rss[n // 5: n // 5 + max(1, n // 10)].mean() if n >= 10 else rss[0]  # after 20 %: engine and socket warm
    return {"messages": stop.get("publish_sent"), "frames": stop.get("frames"), "seconds": samples[-1][0] - samples[0][0],
            "rss_mb_warm": float(warm), "rss_mb_end": float(rss[-max(1, n // 10):].mean()), "rss_mb_max": float(rss.max()),
            "growth_mb": float(rss[-max(1, n // 10):].mean() - warm), "publish_dropped": stop.get("publish_dropped")}


# ---------------------------------------------------------------- report

def hardware() -> dict:
    import onnxruntime
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def markdown(res: dict) -> str:
    t, lat, sw, st = res["throughput"], res["latency"], res["hot_swaps"], res["stalled"]
    hw = res["hardware"]
    eng = t["service"].get("engine"), t["service"].get("provider")
    rows = [
        ("throughput (camera unpaced)", f"{t['fps']:.1f} fps", f"engine {eng[0]} on {eng[1]}, infer p50 {t['service'].get('infer_p50_ms') or 0:.1f} ms"),
        (f"latency, camera at {res['fps']:.0f} fps", f"p50 {lat['latency_p50_ms']:.1f} ms, p99 {lat['latency_p99_ms']:.1f} ms",
         f"capture to subscriber; {lat['dropped']} dropped, {lat['late']} late of {lat['messages']}"),
        (f"3 hot swaps at {res['fps']:.0f} fps", f"{sw['dropped']} dropped, {sw['late']} late",
         (f"{sw['swaps_seen']}/{sw['swaps_requested']} swaps seen by the subscriber; {sw['dropped_at_swaps']} dropped "
          f"at the swaps; gaps at swaps {', '.join(f'{g:.0f}' for g in sw['gap_at_swaps_ms'])} ms "
          f"(period {1000 / res['fps']:.0f} ms)")),
        (f"stalled subscriber, {st['messages']} messages", f"RSS {st['rss_mb_warm']:.0f} -> {st['rss_mb_end']:.0f} MB",
         f"growth {st['growth_mb']:+.1f} MB over {st['seconds']:.0f} s, max {st['rss_mb_max']:.0f} MB"),
    ]
    lines = ["| measurement | result | notes |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append(f"\nHardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB, GPU {hw['gpu'] or 'none'}; "
                 f"Python {hw['python']}, torch {hw['torch']}, onnxruntime {hw['onnxruntime']}; "
                 f"load average at start {', '.join(f'{x:.1f}' for x in hw['load_average'] or [])}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    if a._listen:
        return listen(a._listen, a._record)
    if a._stall:
        return stall(a._stall)
    work = Path(tempfile.mkdtemp(prefix="mas3-bench-runtime-"))
    try:
        res = {"hardware": hardware(), "fps": a.fps, "args": {k: str(v) for k, v in vars(a).items() if not k.startswith("_")}}
        print(f"setting up in {work} ...", file=sys.stderr)
        bundle, ids = make_bundle(work, a.bundle)
        video = make_video(work / "camera.avi")
        print("throughput ...", file=sys.stderr)
        res["throughput"] = phase_stream(work, bundle, video, "throughput", a.engine, a.seconds, 0)
        print("latency ...", file=sys.stderr)
        res["latency"] = phase_stream(work, bundle, video, "latency", a.engine, a.seconds, a.fps)
        print("hot swaps ...", file=sys.stderr)
        res["hot_swaps"] = phase_stream(work, bundle, video, "swaps", a.engine, max(a.seconds, 16.0), a.fps, swaps=ids[1:])
        print(f"stalled subscriber, {a.messages} messages ...", file=sys.stderr)
        res["stalled"] = phase_stalled(work, bundle, video, a.engine, a.messages)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
