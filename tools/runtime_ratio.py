"""The serving path against its own engine, side by side: the `ratio` phases of tools/bench_runtime.py.

    python tools/bench_runtime.py --preset edge --size 256x512 --phases ratio,ratio-round --out r.json

`engine` is the engine alone in a fresh process (ONNX Runtime session, `--threads` intra-op threads,
the video's frames decoded beforehand, called back to back); `run` is `mas3-edge run` unpaced from
the same video with the same threads, counted at a subscriber in another process. The two alternate
`reps` times, so the machine's neighbours load both alike; the ratio is of the medians. `ratio-round`
does the same while a round process (the scheduler's own round function, 1 torch thread, nice 10,
on a copy of the bundle) adapts in a loop in the background: the serving rate during a round.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FLOOR = 0.85  # run / engine: unpaced serving keeps at least this share of its engine's throughput


def default_threads() -> int:
    """The service's own choice with --no-adapt (Service._threads): a core left to capture and encoding."""
    return max(1, (os.cpu_count() or 2) - 1)


def video_frames(video: Path, size: tuple[int, int], n: int = 30) -> np.ndarray:
    """The first `n` frames of the video, RGB at the model's size, as the camera hands them over."""
    import cv2

    from mas3_edge.runtime.sources import fit, to_rgb
    cap, out = cv2.VideoCapture(str(video)), []
    while len(out) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(fit(to_rgb(bgr, True), size))
    cap.release()
    return np.stack(out)


def engine_alone(vdir: str, video: str, threads: str, seconds: str, record: str) -> None:
    """Entry of the engine process: frames per second of `infer` alone, one frame per call."""
    from mas3_edge.runtime.engines import load_engine
    engine = load_engine(Path(vdir), "onnxruntime", "cpu", threads=int(threads), confidence=False)  # as `run` loads it
    frames = video_frames(Path(video), engine.input_size)
    engine.infer(frames[:1])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < float(seconds):
        engine.infer(frames[n % len(frames)][None])
        n += 1
    Path(record).write_text(json.dumps({"frames": n, "fps": n / (time.perf_counter() - t0)}))


def round_loop(bundle: str, frames: str, steps: str, limit: str) -> None:
    """Entry of the background round process: the service's round, again and again until killed."""
    os.nice(10)  # the scheduler's default nice and thread count
    from mas3_edge.runtime.scheduler import default_round, round_child
    n = 0
    while True:
        n += 1
        job = {"bundle": bundle, "frames": frames, "version": "v0001", "adapt": {"steps": int(steps)},
               "limit": int(limit), "export": False, "threads": 1}
        round_child(default_round, job, f"{bundle}/round-{n}.json", 0, os.getppid(), f"bench/round-{n}")


def _spawn(fn: str, *args: str) -> subprocess.Popen:
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import runtime_ratio as r; r.{fn}(*sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL if fn == "round_loop" else None)  # a failed engine must say why


def start_rounds(work: Path, bundle: Path, video: Path, size: tuple[int, int], steps: int, limit: int) -> subprocess.Popen:
    """A copy of the bundle, `limit` frames of the video as a buffer folder, and the round loop on them."""
    import cv2
    copy, folder = work / "round-bundle", work / "round-frames"
    shutil.copytree(bundle, copy)
    folder.mkdir()
    for i, rgb in enumerate(video_frames(video, size, limit)):
        cv2.imwrite(str(folder / f"{i:06d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    proc = _spawn("round_loop", copy, folder, steps, limit)
    time.sleep(15)  # past the child's imports and frame loading: into its steps
    return proc


def phase_ratio(work: Path, bundle: Path, video: Path, stream, threads: int, seconds: float, reps: int,
                name: str = "ratio") -> dict:
    """Alternate engine alone and `run` unpaced `reps` times; `stream` is bench_runtime.phase_stream."""
    engine, run, served = [], [], []
    for k in range(reps):
        record = work / f"{name}-engine-{k}.json"
        _spawn("engine_alone", bundle / "versions" / "v0001", video, threads, seconds, record).wait(timeout=seconds + 300)
        engine.append(json.loads(record.read_text())["fps"])
        s = stream(work, bundle, video, f"{name}-run-{k}", "onnxruntime", seconds, 0, extra=["--threads", str(threads)])
        run.append(s["fps"])
        served.append(s)
    ratio = float(np.median(run) / np.median(engine))
    # a cross-check that the neighbours' load does not move: the share of the loop's time inside the
    # engine, from each run's own rate and inference p50
    share = float(np.median([s["fps"] * (s["service"].get("infer_p50_ms") or 0) / 1e3 for s in served]))
    return {"threads": threads, "seconds": seconds, "engine_fps": engine, "run_fps": run,
            "ratio": ratio, "floor": FLOOR, "passed": ratio >= FLOOR, "infer_share": share, "run": served[-1]}


def run_phase(work: Path, bundle: Path, video: Path, a, stream, rounds: bool) -> dict:
    """One ratio phase of bench_runtime (its arguments `a`), with the round loop around it if `rounds`."""
    threads = a.threads or default_threads()
    bg = start_rounds(work, bundle, video, a.video_size, a.adapt_steps, a.round_frames) if rounds else None
    try:
        res = phase_ratio(work, bundle, video, stream, threads, a.seconds, a.ratio_reps,
                          name="ratio-round" if rounds else "ratio")
        if bg is not None:  # the background really adapted: rounds it finished, and that it still ran
            res.update(rounds_finished=len(list((work / "round-bundle").glob("round-*.json"))),
                       round_alive=bg.poll() is None)
        return res
    finally:
        if bg is not None:
            bg.kill()
            bg.wait()


def markdown_rows(res: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key, what in (("ratio", "no round"), ("ratio_round", "a round adapting in the background")):
        if key in res:
            r = res[key]
            rows.append((f"unpaced `run` / engine alone, {what}",
                         f"{r['ratio']:.2f} ({'pass' if r['passed'] else 'FAIL'}, floor {r['floor']:.2f})",
                         f"run {', '.join(f'{v:.1f}' for v in r['run_fps'])} fps; engine "
                         f"{', '.join(f'{v:.1f}' for v in r['engine_fps'])} fps; {r['threads']} intra-op thread(s), "
                         f"alternating, {r['seconds']:g} s each; inside run, rate x inference p50 "
                         f"{r.get('infer_share', float('nan')):.2f}"
                         + (f"; background rounds finished meanwhile: {r['rounds_finished']}" if "rounds_finished" in r else "")))
    return rows
