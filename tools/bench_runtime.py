#!/usr/bin/env python
"""End-to-end runtime benchmark: a generated video -> `mas3-edge run` (a real process) -> a
subscriber in another process.

    python tools/bench_runtime.py                          # untrained tiny model, ~4 minutes
    python tools/bench_runtime.py --bundle bundle --out bench_runtime.json
    python tools/bench_runtime.py --quick                  # CI-sized: shorter phases, 2000 messages
    python tools/bench_runtime.py --preset edge --size 256x512 --fps 5 --phases throughput,latency,round --quick

Phases (each a fresh `run` process, adaptation off so the numbers are the serving path's):
  throughput  camera unpaced: frames per second the whole path sustains
  latency     camera paced at --fps: capture-to-subscriber latency p50/p99 in normal operation
  hot swaps   paced; `mas3-edge rollback` moves the SERVING pointer three times while serving;
              every frame id must reach the subscriber (dropped = ids missing) and no arrival
              gap may exceed one frame time beyond the period (late = gap > 2 periods)
  stalled     unpaced, --messages frames, one subscriber that connects and never reads:
              the publisher's RSS must stay flat
  round       (only with --phases ...,round) paced, buffering every frame and adapting: one
              round of --adapt-steps steps on --round-frames frames in its child process; the
              RSS of the service and of each child (read from /proc, no psutil), sampled every
              0.25 s, and the latency while the round runs
  ratio       engine alone against `run` unpaced, alternating, same threads: run/engine, floor 0.85
  ratio-round the same with a round adapting in a loop in the background (tools/runtime_ratio.py)
Prints a markdown table with the hardware; --out writes everything as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # runtime_ratio, beside this file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle to serve (copied; default: an untrained tiny model)")
    p.add_argument("--engine", default="auto")
    p.add_argument("--preset", default="tiny", help="model of the untrained bundle (tiny, edge, ...; default tiny)")
    p.add_argument("--size", default=None, help="its input size HxW (default: the preset's)")
    p.add_argument("--video-size", default="256x512", help="frame size of the generated camera video (default 256x512)")
    p.add_argument("--phases", default="throughput,latency,swaps,stalled",
                   help="comma list of throughput, latency, swaps, stalled, round, ratio, ratio-round "
                        "(default: the first four)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the ratio phases (default: the service's own, cores - 1)")
    p.add_argument("--ratio-reps", type=int, default=2, help="alternations of engine and run in a ratio phase")
    p.add_argument("--adapt-steps", type=int, default=5, help="steps of the round phase's round (default 5)")
    p.add_argument("--round-frames", type=int, default=20, help="frames buffered before, and adapted on by, that round")
    p.add_argument("--round-timeout", type=float, default=600.0, help="give up on the round phase after this many seconds")
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
    a.size = tuple(int(v) for v in a.size.lower().split("x")) if a.size else None
    a.video_size = tuple(int(v) for v in a.video_size.lower().split("x"))
    a.phases = a.phases.split(",")
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


def make_bundle(work: Path, source: Path | None, preset_name: str = "tiny",
                size: tuple[int, int] | None = None) -> tuple[Path, list[str]]:
    """A bundle with four exported versions (the served one + three to swap to)."""
    from dataclasses import replace

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
        cfg = preset(preset_name)
        net = SegNet(replace(cfg, input_size=size) if size else cfg).eval()
        with torch.no_grad():  # confident predictions, so a round's GMM samples pass tau and the round runs its steps
            net.head.weight.mul_(300), net.head.bias.mul_(300)
        bundle.save_version(root, net, info={"note": "untrained (speed does not depend on weights)"})
        self_prototypes(bundle.load_version(root, "v0001"))
    ids = ["v0001"]
    for k in range(3):
        with torch.no_grad():
            net.head.bias.add_(0.01 * (k + 1))  # a different model each time: a real swap, not a no-op
        ids.append(bundle.save_version(root, net, parent=bundle.load_version(root, ids[-1]), serve=False).name)
    for vid in ids:
        export_onnx(root, vid)
    bundle.set_serving(root, "v0001")
    return root, ids


def self_prototypes(ver, n: int = 8) -> None:
    """Prototypes for an untrained model, so a MAS3 round can run (its cost, not its result, is
    measured): fitted on synthetic frames labelled with the model's own predictions."""
    import torch

    from mas3_edge import prototypes, synth
    from mas3_edge.model import Deployed
    size = tuple(ver.net.config.input_size)
    images = np.stack([synth.render("synthetic", synth.scene_seed(3, i), size)[0] for i in range(n)])
    with torch.no_grad():
        labels = Deployed(ver.net.eval())(torch.from_numpy(images))[0].numpy()
    proto = prototypes.fit(ver.net, list(zip(images, labels)), min_count=10)
    prototypes.save(proto, ver.prototypes_path, ver.meta["source_sha256"], "self-labelled synthetic frames (benchmark)")


# ---------------------------------------------------------------- phases

def serve(work: Path, bundle: Path, video: Path, name: str, engine: str, extra: list[str],
          adapt: bool = False) -> tuple[subprocess.Popen, str, Path]:
    addr = f"ipc://{work}/{name}.sock"
    events = work / f"{name}.events.jsonl"
    log = open(work / f"{name}.log", "w")
    quiet = [] if adapt else ["--no-buffer", "--no-adapt"]
    proc = run_cmd("run", "--camera", str(video), "--loop", "--bundle", str(bundle), "--engine", engine,
                   "--publish", addr, *quiet, "--status-every", "2", "--events", str(events),
                   *extra, stdout=log, stderr=subprocess.STDOUT)
    return proc, addr, events


def stop_event(events: Path) -> dict:
    recs = [json.loads(line) for line in events.read_text().splitlines()]
    return next((r for r in reversed(recs) if r["event"] == "stop"), {})


def phase_stream(work, bundle, video, name, engine, seconds, fps, swaps: list[str] | None = None,
                 extra: list[str] | None = None) -> dict:
    record = work / f"{name}.json"
    sub = py(__file__, "--_listen", f"ipc://{work}/{name}.sock", "--_record", str(record))
    proc, _addr, events = serve(work, bundle, video, name, engine, ["--fps", str(fps), "--duration", str(seconds),
                                                                    *(extra or [])])
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


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid` (from /proc/*/stat) and what it is: round, export, or other."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = {}, {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier and c not in out}
        for c in frontier:
            try:
                cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[c] = ("export" if "export_onnx" in cmd else "round" if "spawn_main" in cmd
                      else "tracker" if "resource_tracker" in cmd else "other")
    return out


def phase_round(work, bundle, video, engine, fps, steps, frames, timeout) -> dict:
    """Serve while buffering and adapting until one round has ended; RSS of the service and its children."""
    record = work / "round.json"
    sub = py(__file__, "--_listen", f"ipc://{work}/round.sock", "--_record", str(record))
    extra = ["--fps", str(fps), "--duration", str(timeout), "--buffer", str(work / "frames"), "--buffer-every", "1",
             "--buffer-interval", "0", "--round-every-frames", str(frames), "--round-frames", str(frames),
             "--adapt-steps", str(steps)]
    proc, _addr, events = serve(work, bundle, video, "round", engine, extra, adapt=True)
    service, child, started, ended = [], {}, None, None
    while proc.poll() is None:
        try:
            service.append(rss_mb(proc.pid))
            for pid, kind in descendants(proc.pid).items():
                rss = rss_mb(pid)
                if rss == rss:  # NaN: a zombie, no memory left to count
                    child.setdefault(kind, []).append(rss)
                started = started or (time.monotonic() if kind == "round" else None)
        except OSError:
            pass
        if ended is None and events.exists() and '"event": "round"' in events.read_text():
            ended = time.monotonic()
        if ended is not None and time.monotonic() - ended > 3:  # a few frames with the new version, then stop
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        time.sleep(0.25)
    sub.wait(timeout=60)
    rows = json.loads(record.read_text())
    rounds = [json.loads(line) for line in events.read_text().splitlines() if '"event": "round"' in line]
    stream = summarize_stream(rows, fps, stop_event(events), [])
    before = service[: max(1, len(service) // 10)]
    return {**stream, "service_rss_mb_start": float(np.median(before)), "service_rss_mb_max": float(max(service)),
            "child_rss_mb_max": {k: float(max(v)) for k, v in child.items()},
            "round": {k: rounds[0].get(k) for k in ("outcome", "version", "seconds", "reason")} if rounds else None}


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
    hw, rows, fps = res["hardware"], [], res["fps"]
    if "throughput" in res:
        t = res["throughput"]
        eng = t["service"].get("engine"), t["service"].get("provider")
        rows.append(("throughput (camera unpaced)", f"{t['fps']:.1f} fps",
                     f"engine {eng[0]} on {eng[1]}, infer p50 {t['service'].get('infer_p50_ms') or 0:.1f} ms"))
    if "latency" in res:
        lat = res["latency"]
        rows.append((f"latency, camera at {fps:g} fps", f"p50 {lat['latency_p50_ms']:.1f} ms, p99 {lat['latency_p99_ms']:.1f} ms",
                     f"capture to subscriber; {lat['dropped']} dropped, {lat['late']} late of {lat['messages']}"))
    if "hot_swaps" in res:
        sw = res["hot_swaps"]
        rows.append((f"3 hot swaps at {fps:g} fps", f"{sw['dropped']} dropped, {sw['late']} late",
                     (f"{sw['swaps_seen']}/{sw['swaps_requested']} swaps seen by the subscriber; {sw['dropped_at_swaps']} dropped "
                      f"at the swaps; gaps at swaps {', '.join(f'{g:.0f}' for g in sw['gap_at_swaps_ms'])} ms "
                      f"(period {1000 / fps:.0f} ms)")))
    if "stalled" in res:
        st = res["stalled"]
        rows.append((f"stalled subscriber, {st['messages']} messages", f"RSS {st['rss_mb_warm']:.0f} -> {st['rss_mb_end']:.0f} MB",
                     f"growth {st['growth_mb']:+.1f} MB over {st['seconds']:.0f} s, max {st['rss_mb_max']:.0f} MB"))
    if "round" in res:
        r = res["round"]
        rnd, kids = r["round"] or {}, r["child_rss_mb_max"]
        rows.append(("RSS of the service, one round", f"{r['service_rss_mb_start']:.0f} MB at start, max {r['service_rss_mb_max']:.0f} MB",
                     "the serving process (engine, camera, buffer, publisher)"))
        rows.append(("RSS of the round's child", f"max {kids['round']:.0f} MB" if "round" in kids else "no round child seen",
                     f"round {rnd.get('outcome', 'did not end')} after {rnd.get('seconds') or 0:.0f} s"
                     + (f"; its export child max {kids['export']:.0f} MB" if "export" in kids else "")
                     + (f"; multiprocessing's resource tracker {kids['tracker']:.0f} MB" if "tracker" in kids else "")))
        rows.append((f"latency while adapting, camera at {fps:g} fps", f"p50 {r['latency_p50_ms']:.1f} ms, p99 {r['latency_p99_ms']:.1f} ms",
                     f"{r['messages']} messages, {r['fps']:.1f} fps; {r['dropped']} dropped"))
    import runtime_ratio
    rows += runtime_ratio.markdown_rows(res)
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
        bundle, ids = make_bundle(work, a.bundle, a.preset, a.size)
        video = make_video(work / "camera.avi", size=a.video_size)
        if "throughput" in a.phases:
            print("throughput ...", file=sys.stderr)
            res["throughput"] = phase_stream(work, bundle, video, "throughput", a.engine, a.seconds, 0)
        if "latency" in a.phases:
            print("latency ...", file=sys.stderr)
            res["latency"] = phase_stream(work, bundle, video, "latency", a.engine, a.seconds, a.fps)
        if "swaps" in a.phases:
            print("hot swaps ...", file=sys.stderr)
            res["hot_swaps"] = phase_stream(work, bundle, video, "swaps", a.engine, max(a.seconds, 16.0), a.fps, swaps=ids[1:])
        if "stalled" in a.phases:
            print(f"stalled subscriber, {a.messages} messages ...", file=sys.stderr)
            res["stalled"] = phase_stalled(work, bundle, video, a.engine, a.messages)
        for phase in ("ratio", "ratio-round"):
            if phase in a.phases:
                print(f"{phase}: engine alone against run unpaced, {a.ratio_reps} times ...", file=sys.stderr)
                import runtime_ratio
                res[phase.replace("-", "_")] = runtime_ratio.run_phase(work, bundle, video, a, phase_stream,
                                                                       rounds=phase == "ratio-round")
        if "round" in a.phases:
            print(f"one adaptation round ({a.adapt_steps} steps on {a.round_frames} frames) ...", file=sys.stderr)
            res["round"] = phase_round(work, bundle, video, a.engine, a.fps, a.adapt_steps, a.round_frames, a.round_timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
