"""Adaptation rounds in a background process, triggered from the serving loop.

The loop calls `tick()` once per frame (cheap: a few comparisons and, while a round runs, a
liveness check). When a trigger fires - N new buffered frames, T minutes, or a drift check whose
SWD between live embeddings and the prototypes passes a threshold - a round starts in a
*spawned* process: the adaptation's torch work gets its own interpreter, nice level and thread
count, so it can neither hold the serving loop's GIL nor crash it. The child writes its outcome
as JSON (temp + rename); a child that dies without one is a crashed round.

An accepted round has already written a new version and exported it (parity-checked) in the
child; the parent then moves the SERVING pointer - unless someone else moved it meanwhile (a
rollback, another `mas3-edge adapt`) - and the engine swapper picks the pointer change up like
any other. Only the parent moves the pointer, and the child dies with it (runtime/children.py).
The child opens the round in the bundle store (`begin_round`), so a version it writes carries an
INCOMPLETE mark until the parent has seen the round accepted and commits it: a kill at any moment
leaves the old pointer and at most a version marked as unfinished, which the next start removes.
Round results live in a scratch folder inside the bundle, and versions beyond `keep_versions` are
pruned by the store's retention policy after each round.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable

from mas3_edge.errors import UserError
from mas3_edge.store import MODEL_FILE, BundleStore

# mas3_edge.bundle (and so torch) is imported inside functions: a round process that runs a light
# round function starts in a fraction of a second instead of paying for torch.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    every_frames: int = 150  # new buffered frames since the last round (0: off)
    every_minutes: float = 0.0  # (0: off)
    drift_threshold: float | None = None  # SWD of live embeddings to the GMM that starts a round
    drift_every_minutes: float = 2.0
    min_frames: int = 40  # buffered frames a round needs at all
    limit: int = 150  # a round adapts on the newest `limit` buffered frames
    timeout_s: float = 1800.0
    export: bool = True  # export the accepted version to ONNX before it is served
    int8: bool = False  # then calibrate its INT8 graphs on the round's frames (served with --precision int8)
    threads: int = 1  # torch threads in the round process (leave cores to serving)
    nice: int = 10
    adapt: dict = field(default_factory=dict)  # explicit AdaptConfig and RoundConfig settings (config.round_configs)
    # versions the bundle keeps (0: all): a round every few minutes would otherwise fill the disk; the
    # store never drops the serving, previously served, its parent or a source version
    keep_versions: int = 20

    def __post_init__(self) -> None:
        if self.keep_versions < 0:
            raise UserError(f"keep_versions must be 0 (keep all) or more, got {self.keep_versions}")
        if self.every_frames < 0 or self.every_minutes < 0 or self.min_frames < 2 or self.limit < 2:
            raise UserError(f"invalid adaptation schedule {self}")
        from mas3_edge.config import round_configs
        round_configs(self.adapt)  # validate now, in the parent: a typo must not become a crashed round


def default_round(bundle: str, frames: str, version: str, adapt: dict, limit: int, export: bool,
                  drift_threshold: float | None = None, threads: int = 1, int8: bool = False) -> dict:
    """One round in the child: [drift check], MAS3 + health checks, export [, INT8 calibration].
    Returns a JSON-able dict."""
    import torch
    torch.set_num_threads(threads)
    from mas3_edge.config import round_configs
    from mas3_edge.parts import Parts
    from mas3_edge.rounds import run_round
    gpu = torch.cuda.is_available()
    cfg, rcfg, sized = round_configs(adapt, cpu=not gpu)  # explicit settings win over the CPU sizing
    out: dict = {"device": "cuda" if gpu else "cpu", "settings": adapt, "cpu_sizing": sized}
    if drift_threshold is not None:
        out["drift"] = _drift(bundle, frames, version, limit)
        if out["drift"] < drift_threshold:
            return {**out, "outcome": "skipped", "reason": f"no drift (SWD {out['drift']:.4f} < {drift_threshold})"}
    parts = Parts()
    try:
        res = run_round(bundle, frames, cfg, version, rcfg, limit=limit, device="cuda" if gpu else "cpu", parts=parts)
    except UserError as e:  # e.g. the loss became NaN: the round failed, the service did not
        return {**out, "outcome": "rejected", "reason": str(e), "parts": parts.rows}
    out.update(outcome="accepted" if res.accepted else "rejected", reason=res.reason, parts=parts.rows,
               **{k: res.report.get(k) for k in ("health_before", "health_after", "gate_after", "checks", "used_labels")})
    if res.accepted:
        out["version"] = res.version_dir.name
        if export:
            from mas3_edge.export.onnx import export_onnx
            try:
                with parts("export"):
                    export_onnx(res.version_dir, per_set=True if int8 else None)  # INT8 serves the folded set graphs
            except UserError as e:
                return {**out, "outcome": "rejected", "reason": f"export failed: {e}"}
            if int8:
                with parts("int8 calibrate"):
                    out["int8"] = _calibrate(res.version_dir, frames, limit)
    return out


def _calibrate(vdir: Path, frames: str, limit: int) -> dict:
    """The new version's INT8 graphs, calibrated on this round's newest frames. A failure never
    rejects the round: the version is served in fp32, and the outcome says why."""
    from mas3_edge.export.quantize import quantize_buffer
    try:
        entry = quantize_buffer(vdir, Path(frames), limit)
    except Exception as e:  # calibration is an optimisation: the adapted fp32 model still serves
        log.warning("INT8 calibration of %s failed (%s); fp32 is served", vdir.name, e)
        return {"passed": False, "reason": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
    return {k: entry[k] for k in ("passed", "reason", "seconds")}


def _drift(bundle: str, frames: str, version: str, limit: int) -> float:
    from mas3_edge import bundle as bundles
    from mas3_edge import health, prototypes
    from mas3_edge.frames import load_frames
    ver = bundles.load_version(bundle, version)
    proto = prototypes.load(ver.prototypes_path, ver.meta)
    return health.drift_score(ver.net, proto, load_frames(Path(frames), ver.net.config.input_size, min(limit, 32)))


def round_child(round_fn: Callable[..., dict], job: dict, result: str, nice: int, parent_pid: int, label: str) -> None:
    """Entry point of a round process (and of a fleet judgement): run, then write the outcome atomically."""
    from mas3_edge.runtime.children import die_with_parent
    die_with_parent(parent_pid)  # an orphaned round must not go on writing versions
    # spawn hands the parent's sys.path over with "" made the working directory, where a stray onnx.py or
    # export.py would shadow what the round imports later (this function and its module are loaded already)
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
    # versions written from here on carry INCOMPLETE until the parent has seen the round finish
    BundleStore(job["bundle"]).begin_round(owner=parent_pid, label=label)
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    from mas3_edge.parts import tame_heap
    tame_heap()  # what a part of the round frees goes back to the system, not to the next part's peak
    try:
        out = round_fn(**job)
        if out.get("outcome") == "accepted":
            out = _check_finite(job["bundle"], out)
    except Exception as e:  # a crash is a rejected round with a reason, never a dead service
        out = {"outcome": "crashed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    tmp = Path(result + ".tmp")
    tmp.write_text(json.dumps(out, default=str))
    os.replace(tmp, result)


def _check_finite(bundle: str, out: dict) -> dict:
    """Whatever the round function says, a version with NaN/inf weights is never served."""
    import numpy as np
    import safetensors.numpy  # not mas3_edge.bundle: that pulls in torch, seconds for a light round
    weights = safetensors.numpy.load_file(str(BundleStore(bundle).path(out["version"]) / MODEL_FILE))
    bad = [k for k, v in weights.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        return {**out, "outcome": "rejected", "reason": f"weights are not finite ({bad[0]}, ...)"}
    return out


class Scheduler:
    def __init__(self, bundle: Path, frames: Path, cfg: ScheduleConfig = ScheduleConfig(), *,
                 round_fn: Callable[..., dict] = default_round):
        self.bundle, self.frames, self.cfg, self.round_fn = Path(bundle), Path(frames), cfg, round_fn
        self.store = BundleStore(self.bundle)
        self.counts: Counter = Counter()
        self.last: dict | None = None
        self.history: list[dict] = []
        self._proc = None
        self._job: dict = {}
        self._lock = threading.Lock()  # the metrics thread reads (snapshot) what the serving loop writes (tick)
        self.store.cleanup()  # what an earlier run's killed rounds left
        self.store.prune(cfg.keep_versions)
        self._tmp = self.store.scratch("rounds")
        self._ctx = mp.get_context("spawn")
        now = time.monotonic()
        self._last_round_t = self._last_drift_t = now
        self._buffered_at_last = 0
        self._failures = 0  # rounds in a row that were not accepted

    @property
    def backoff(self) -> int:
        """Factor on the round interval: a round that keeps failing (a bad prototype file, a domain
        where adaptation does not help) is retried ever less often instead of every N frames."""
        return 2 ** min(self._failures, 4)

    @property
    def busy(self) -> bool:
        return self._proc is not None

    def snapshot(self) -> dict:
        """Counts by outcome, the status text and the last outcome, read consistently from any thread."""
        with self._lock:
            return {"rounds": dict(self.counts), "last_round": self._describe(), "busy": self._proc is not None,
                    "last": dict(self.last) if self.last else None}

    def describe(self) -> str:
        """The round part of the status line."""
        with self._lock:
            return self._describe()

    def _describe(self) -> str:
        if self._proc is not None:
            return f"#{sum(self.counts.values()) + 1} running ({time.monotonic() - self._job['t0']:.0f} s)"
        if self.last is None:
            return "none yet"
        v = f" {self.last['version']}" if self.last.get("version") else ""
        return f"#{sum(self.counts.values())} {self.last['outcome']}{v} ({self.last['reason']})"

    def tick(self, buffered_total: int, in_buffer: int, now: float | None = None) -> dict | None:
        """Start a round when one is due; return a finished round's outcome (once)."""
        now = time.monotonic() if now is None else now
        if self._proc is not None:
            return self._poll(now)
        if in_buffer < self.cfg.min_frames:
            return None
        new = buffered_total - self._buffered_at_last
        c, k = self.cfg, self.backoff
        if (c.every_frames and new >= c.every_frames * k) or (c.every_minutes and new > 0
                                                               and now - self._last_round_t >= c.every_minutes * 60 * k):
            self._launch(buffered_total, now, drift=False)
        elif c.drift_threshold is not None and now - self._last_drift_t >= c.drift_every_minutes * 60:
            self._launch(buffered_total, now, drift=True)
        return None

    def _launch(self, buffered_total: int, now: float, drift: bool) -> None:
        version = self.store.serving()
        if version is None:
            return
        n = sum(self.counts.values()) + 1
        result = self._tmp / f"round-{n}.json"
        label = f"{self._tmp.name}/round-{n}"  # names the versions this round writes, in their marks
        job = {"bundle": str(self.bundle), "frames": str(self.frames), "version": version, "adapt": dict(self.cfg.adapt),
               "limit": self.cfg.limit, "export": self.cfg.export, "threads": self.cfg.threads,
               "drift_threshold": self.cfg.drift_threshold if drift else None,
               **({"int8": True} if self.cfg.int8 else {})}  # only then: a custom round_fn need not take it
        proc = self._ctx.Process(target=round_child, args=(self.round_fn, job, str(result), self.cfg.nice, os.getpid(), label),
                                 name=f"mas3-round-{n}")  # not daemonic: a round may use worker processes
        proc.start()
        with self._lock:
            self._proc, self._job = proc, {**job, "t0": now, "result": result, "n": n, "label": label}
        self._last_drift_t = now
        if not drift:
            self._last_round_t, self._buffered_at_last = now, buffered_total
        log.info("adaptation round %d started on %s (%s)", n, version, "drift check" if drift else "scheduled")

    def _poll(self, now: float) -> dict | None:
        proc, job = self._proc, self._job
        if proc.is_alive():
            if now - job["t0"] <= self.cfg.timeout_s:
                return None
            proc.kill()
            proc.join(1.0)
            return self._finish({"outcome": "crashed", "reason": f"timed out after {self.cfg.timeout_s:.0f} s"}, now)
        proc.join(0.1)
        try:
            out = json.loads(job["result"].read_text())
        except (OSError, ValueError):
            out = {"outcome": "crashed", "reason": f"the round process died (exit code {proc.exitcode})"}
        if out.get("outcome") == "skipped":  # a drift check that found no drift is not a round
            with self._lock:
                self._proc = None
            log.info("drift check: %s", out.get("reason"))
            return None
        return self._finish(out, now)

    def _finish(self, out: dict, now: float) -> dict:
        job = self._job
        out = {**out, "parent": job["version"], "seconds": now - job["t0"], "round": job["n"]}
        current = self.store.serving()
        if out["outcome"] == "accepted" and current != job["version"]:  # a rollback or another process
            out.update(outcome="superseded", reason=f"serving moved to {current} during the round")  # moved it
        self._settle(out, job["label"])  # before the pointer moves: the swapper refuses an unfinished version
        if out["outcome"] == "accepted":
            self.store.set_serving(out["version"])
        with self._lock:
            self._proc = None
            self.counts[out["outcome"]] += 1
            self.last = out
            self.history.append(out)
        if out["outcome"] in ("rejected", "crashed"):
            self._failures += 1
        elif out["outcome"] == "accepted":
            self._failures = 0
        log.info("adaptation round %d %s%s: %s", job["n"], out["outcome"],
                 f" ({out['version']})" if out.get("version") else "", out.get("reason"))
        self.store.prune(self.cfg.keep_versions)
        return out

    def _settle(self, out: dict, label: str) -> None:
        """Commit the round's version if the round finished it; reject whatever else it wrote, saying why."""
        done = out["outcome"] in ("accepted", "superseded")
        for vid in self.store.round_versions(label):  # a crashed round may have written one it never named
            if done and vid == out.get("version"):
                self.store.commit(vid)
            else:
                self.store.reject(vid, f"round {out['outcome']}: {out.get('reason')}")

    def close(self, timeout: float = 0.5) -> None:
        """Stop a running round (a version it wrote keeps its mark; the next start removes it)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(0.2)
        with self._lock:
            self._proc = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
