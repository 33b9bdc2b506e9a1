"""Zero-drop hot swap: follow the bundle's SERVING pointer, build the next engine off the loop.

    swapper = EngineSwapper(bundle, kind="auto")
    engine = swapper.start()                 # the serving version, or the last good one
    ...
    new = swapper.poll()                     # between two frames: an engine ready to serve, or None
    if new: engine = swapper.swap(engine, new)

Whoever changes the pointer - our own adaptation process, `mas3-edge adapt` in another shell,
`mas3-edge rollback` - the watcher thread sees it, verifies the weights against model.json,
exports the version to ONNX if it has no verified model.onnx (in a child process that dies with
us, so the export's Python work cannot hold the serving loop's GIL), loads and warms the engine,
and hands it over. The loop swaps one reference between frames, so no frame waits for a load. A
version that cannot be loaded is tried again with backoff (1 s, 2 s, 4 s ... up to 5 min, and at
once when SERVING is written again, as `rollback` does): its files may be restored, and a rollback
to it must then swap. Each failure is one warning; the current engine keeps serving. Garbage in
SERVING is one warning, and the watcher goes on. The watcher compares the pointer with
what is served on every tick, so the served engine converges to the pointer whatever the order
of events (v1 -> v2 -> v1 while v2 loads ends on v1).
"""
from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mas3_edge import bundle as bundles
from mas3_edge.errors import UserError
from mas3_edge.store import BundleStore

from .children import python_child

log = logging.getLogger(__name__)

_NEEDS_ONNX = ("auto", "onnxruntime", "onnx", "ort", "tensorrt", "trt")


def export_in_child(vdir: Path, timeout: float = 900.0, stop: threading.Event | None = None) -> None:
    """Export (with its parity check) in a niced child process; UserError with its last line on failure.

    The child dies with this process, and is killed as soon as `stop` is set: an export that would
    finish after `run` stopped must not write a model.onnx nobody serves."""
    proc = python_child("mas3_edge.export.onnx", "export_onnx", str(vdir), nice=10)
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, err = proc.communicate(timeout=0.1)  # reads the pipes as it waits: a chatty child never blocks
            break
        except subprocess.TimeoutExpired:
            if (stop is not None and stop.is_set()) or time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                why = "was stopped" if stop is not None and stop.is_set() else f"took longer than {timeout:.0f} s"
                raise UserError(f"export of {vdir.name} {why}") from None
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"export of {vdir.name} failed: {last}")


def _verified_onnx(vdir: Path) -> bool:
    from mas3_edge.export.onnx import check_onnx
    try:
        check_onnx(vdir)
    except UserError:
        return False
    return True


@dataclass
class _Failure:
    """A version that failed to load: why, how often in a row, and when to try it again."""

    reason: str
    attempts: int
    retry_at: float
    pointer: tuple | None  # SERVING's stamp at the failure: a new write (a rollback) retries at once


class EngineSwapper:
    def __init__(self, bundle: Path, *, kind: str = "auto", device: str | None = None, threads: int | None = None,
                 precision: str | None = None, confidence: bool = True, poll_s: float = 0.25, exporter=export_in_child,
                 retry_s: float = 1.0, retry_max_s: float = 300.0):
        self.bundle, self.kind, self.device, self.threads = Path(bundle), kind, device, threads
        self.precision, self.confidence = precision, confidence
        self.poll_s, self.exporter = poll_s, exporter
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self.root = None if bundles.is_version_dir(self.bundle) else self.bundle  # a bare version: no pointer
        self.store = BundleStore(self.root) if self.root else None
        self.version: str | None = None  # what the loop serves (or is about to: poll() sets it)
        self._failures: dict[str, _Failure] = {}
        self.swaps: list[dict] = []
        self._target: str | None = None  # the pointer as the watcher last read it
        self._pointer_problem: str | None = None  # what is wrong with SERVING (warned once per problem)
        self._ready: tuple | None = None  # (version id, engine) prepared for the pointer
        self._retired: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ startup

    def start(self):
        """Load the serving version; if it is broken, the last one served before it (then any) that loads."""
        errors = []
        for vid in self.candidates():
            try:
                engine = self.load(vid)
            except UserError as e:
                if self._stop.is_set():  # the service was stopped during an export: no version is to blame
                    raise UserError("stopped while loading the engine") from None
                log.warning("version %s cannot be served (%s); trying the previous good one", vid, e)
                self._failed(vid, str(e), self.store.pointer_stamp() if self.store else None)
                errors.append(f"{vid}: {e}")
                continue
            self.version = vid
            self._target = self._read_pointer() if self.root else vid
            if self.root and self._target is None:
                log.warning("serving %s, the last version served (SERVING names none)", vid)
            if self.root:
                self._thread = threading.Thread(target=self._watch, name="engine-swap", daemon=True)
                self._thread.start()
            return engine
        raise UserError(f"no servable version in {self.bundle}: " + ("; ".join(errors) or "it has no versions"))

    def candidates(self) -> list[str]:
        """Versions in the order start() tries them: the pointer, those served before it (newest first),
        its parent chain, then the rest (newest first)."""
        if self.root is None:
            return [self.bundle.name]
        ids = self.store.ids()
        served = [v for v in reversed(self.store.history()) if v in ids]
        order = [v for v in (self._read_pointer(), *served) if v]
        vid, chain = (order[0] if order else (ids[-1] if ids else None)), []
        while vid and vid not in chain:
            chain.append(vid)
            vid = self.store.parent(vid)
        return list(dict.fromkeys(order + chain + list(reversed(ids))))

    def vdir(self, vid: str) -> Path:
        return self.bundle if self.store is None else self.store.path(vid)

    @property
    def skipped(self) -> dict[str, str]:
        """Versions that failed to load and wait for their next try -> why."""
        return {vid: f.reason for vid, f in list(self._failures.items())}

    def load(self, vid: str):
        """Verify, export if needed, load and warm one version's engine (slow: call off the serving loop)."""
        from mas3_edge.runtime.engines import load_engine
        vdir = self.vdir(vid)
        bundles.check_servable(vdir)  # corrupt weights or an unfinished round fail here, before any export
        if self.kind in _NEEDS_ONNX and not _verified_onnx(vdir):
            log.warning("version %s has no verified model.onnx; exporting it in a child process", vid)
            self.exporter(vdir, stop=self._stop)
        engine = load_engine(vdir, self.kind, self.device, threads=self.threads, precision=self.precision,
                             confidence=self.confidence)
        engine.infer(np.zeros((1, *engine.input_size, 3), np.uint8))  # first-call allocations happen here
        return engine

    # ------------------------------------------------------------ the loop's side

    def poll(self):
        """An engine that is ready to replace the serving one, or None (cheap; call every frame).

        The ready engine is handed over only if the pointer still names it: after v1 -> v2 -> v1 the
        v2 engine prepared in between is dropped, not served."""
        if self._ready is None:
            return None
        target = self.store.serving() or self._target  # one small read, only when an engine waits
        with self._lock:
            ready, self._ready = self._ready, None
            if ready is None:
                return None
            vid, engine = ready
            if vid != target:
                self._retired.append(engine)
                return None
            self.version = vid  # under the lock: the watcher compares the pointer with it
        return engine

    def swap(self, old, new):
        """Record the swap and hand the old engine to the watcher thread to release."""
        self.swaps.append({"time": time.time(), "from": old.version, "to": new.version})
        log.info("now serving %s (%s on %s; was %s)", new.version, new.name, new.provider, old.version)
        with self._lock:
            self._retired.append(old)
        return new

    # ------------------------------------------------------------ watcher thread

    def _watch(self) -> None:
        """Compare the pointer with what is served (or ready) on every tick, not only when it changes:
        whatever happened in between, the served engine ends up where the pointer is."""
        error = None
        while not self._stop.wait(self.poll_s):
            try:
                self._release_retired()
                self._tick()
                error = None
            except Exception as e:  # the watcher must outlive anything a bundle on disk can hold
                if str(e) != error:
                    log.warning("engine swap: %s; %s keeps serving", e, self.version)
                error = str(e)

    def _tick(self) -> None:
        vid = self._read_pointer()
        if vid is None:
            return
        with self._lock:
            self._target = vid
            if self._ready is not None and self._ready[0] != vid:  # prepared for an older pointer
                self._retired.append(self._ready[1])
                self._ready = None
            current = self._ready[0] if self._ready is not None else self.version
        if vid != current and self._due(vid):
            self._prepare(vid)

    def _due(self, vid: str) -> bool:
        """Whether to try `vid` now: never failed, its backoff has run out, or SERVING was written again."""
        failure = self._failures.get(vid)
        return (failure is None or time.monotonic() >= failure.retry_at
                or self.store.pointer_stamp() != failure.pointer)

    def _failed(self, vid: str, reason: str, stamp: tuple | None) -> _Failure:
        """Record a failure to load `vid` (tried with SERVING at `stamp`); each next try waits twice
        as long as the last, up to retry_max_s."""
        before = self._failures.get(vid)
        attempts = before.attempts + 1 if before else 1
        delay = min(self.retry_s * 2 ** (attempts - 1), self.retry_max_s)
        self._failures[vid] = failure = _Failure(reason, attempts, time.monotonic() + delay, stamp)
        return failure

    def _read_pointer(self) -> str | None:
        """The pointer, or None with one warning per problem: garbage in SERVING must not stop the watcher."""
        try:
            vid = self.store.read_serving()
        except UserError as e:
            if str(e) != self._pointer_problem:
                log.warning("%s%s", e, f"; {self.version} keeps serving" if self.version else "")
            self._pointer_problem = str(e)
            return None
        self._pointer_problem = None
        return vid

    def _prepare(self, vid: str) -> None:
        t0 = time.perf_counter()
        stamp = self.store.pointer_stamp()  # before the load: a rollback during it must still retry at once
        try:
            engine = self.load(vid)
        except Exception as e:  # anything: the serving engine must survive a bad version
            if self._stop.is_set():
                return
            failure = self._failed(vid, str(e), stamp)
            log.warning("cannot serve %s (%s); %s keeps serving; trying again in %.3g s", vid, e, self.version,
                        failure.retry_at - time.monotonic())
            return
        self._failures.pop(vid, None)
        if self._stop.is_set() or self.store.serving() != vid:  # superseded while loading
            engine.close()
            return
        log.info("%s ready in %.2f s; swapping at the next frame", vid, time.perf_counter() - t0)
        with self._lock:
            stale, self._ready = self._ready, (vid, engine)
        if stale is not None:
            stale[1].close()

    def _release_retired(self) -> None:
        with self._lock:
            old, self._retired = self._retired, []
        for engine in old:
            engine.close()

    def stop(self) -> None:
        """Tell the watcher to end (it kills an export in progress within 0.1 s); returns at once."""
        self._stop.set()

    def close(self, timeout: float = 0.5) -> None:
        """Stop the watcher and release the engines it holds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            self._retired.append(ready[1])
        self._release_retired()
