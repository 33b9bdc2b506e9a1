"""Zero-drop hot swap: follow the bundle's SERVING pointer, build the next engine off the loop.

    swapper = EngineSwapper(bundle, kind="auto")
    engine = swapper.start()                 # the serving version, or the last good one
    ...
    new = swapper.poll()                     # between two frames: an engine ready to serve, or None
    if new: engine = swapper.swap(engine, new)

Whoever changes the pointer - our own adaptation process, `mas3-edge adapt` in another shell,
`mas3-edge rollback` - the watcher thread sees it, exports the version to ONNX if it has no
verified model.onnx (in a child process, so the export's Python work cannot hold the serving
loop's GIL), loads and warms the engine, and hands it over. The loop swaps one reference between
frames, so no frame waits for a load. A version that cannot be loaded is skipped with a warning
and the current engine keeps serving.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mas3_edge import bundle as bundles
from mas3_edge.errors import UserError

log = logging.getLogger(__name__)

_NEEDS_ONNX = ("auto", "onnxruntime", "onnx", "ort", "tensorrt", "trt")


def export_in_child(vdir: Path, timeout: float = 900.0) -> None:
    """Export (with its parity check) in a niced child process; UserError with its last line on failure."""
    code = "import sys; from mas3_edge.export.onnx import export_onnx; export_onnx(sys.argv[1])"
    nice = (lambda: os.nice(10)) if hasattr(os, "nice") else None
    try:
        res = subprocess.run([sys.executable, "-c", code, str(vdir)], capture_output=True, text=True,
                             timeout=timeout, preexec_fn=nice)
    except subprocess.TimeoutExpired:
        raise UserError(f"export of {vdir.name} took longer than {timeout:.0f} s") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"export of {vdir.name} failed: {last}")


def _verified_onnx(vdir: Path) -> bool:
    from mas3_edge.export.onnx import check_onnx
    try:
        check_onnx(vdir)
    except UserError:
        return False
    return True


class EngineSwapper:
    def __init__(self, bundle: Path, *, kind: str = "auto", device: str | None = None, threads: int | None = None,
                 poll_s: float = 0.25, exporter=export_in_child):
        self.bundle, self.kind, self.device, self.threads = Path(bundle), kind, device, threads
        self.poll_s, self.exporter = poll_s, exporter
        self.root = None if bundles.is_version_dir(self.bundle) else self.bundle  # a bare version: no pointer
        self.version: str | None = None  # what the loop serves
        self.skipped: dict[str, str] = {}  # version -> why it cannot be served
        self.swaps: list[dict] = []
        self._target: str | None = None  # the pointer value last acted on
        self._ready = None
        self._retired: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ startup

    def start(self):
        """Load the serving version; if it is broken, the nearest ancestor (then any newer) that loads."""
        errors = []
        for vid in self.candidates():
            try:
                engine = self.load(vid)
            except UserError as e:
                log.warning("version %s cannot be served (%s); trying the previous good one", vid, e)
                self.skipped[vid] = str(e)
                errors.append(f"{vid}: {e}")
                continue
            self.version = engine.version or vid
            self._target = bundles.serving_id(self.root) if self.root else vid
            if self.root:
                self._thread = threading.Thread(target=self._watch, name="engine-swap", daemon=True)
                self._thread.start()
            return engine
        raise UserError(f"no servable version in {self.bundle}: " + ("; ".join(errors) or "it has no versions"))

    def candidates(self) -> list[str]:
        """Versions in the order start() tries them."""
        if self.root is None:
            return [self.bundle.name]
        ids = bundles.version_ids(self.root)
        order, vid = [], bundles.serving_id(self.root) or (ids[-1] if ids else None)
        while vid and vid not in order:  # the serving version, then its parent chain
            order.append(vid)
            try:
                vid = bundles.read_meta(self.root / "versions" / vid).get("parent")
            except UserError:
                break
        return order + [v for v in reversed(ids) if v not in order]

    def vdir(self, vid: str) -> Path:
        return self.bundle if self.root is None else self.root / "versions" / vid

    def load(self, vid: str):
        """Export if needed, load and warm one version's engine (slow: call off the serving loop)."""
        from mas3_edge.runtime.engines import load_engine
        vdir = self.vdir(vid)
        bundles.read_meta(vdir)  # a corrupt version fails here, before any export is tried
        if self.kind in _NEEDS_ONNX and not _verified_onnx(vdir):
            log.warning("version %s has no verified model.onnx; exporting it in a child process", vid)
            self.exporter(vdir)
        engine = load_engine(vdir, self.kind, self.device, threads=self.threads)
        engine.infer(np.zeros((1, *engine.input_size, 3), np.uint8))  # first-call allocations happen here
        return engine

    # ------------------------------------------------------------ the loop's side

    def poll(self):
        """An engine that is ready to replace the serving one, or None (cheap; call every frame)."""
        if self._ready is None:
            return None
        with self._lock:
            engine, self._ready = self._ready, None
        return engine

    def swap(self, old, new):
        """Record the swap and hand the old engine to the watcher thread to release."""
        self.swaps.append({"time": time.time(), "from": self.version, "to": new.version})
        log.info("now serving %s (%s on %s; was %s)", new.version, new.name, new.provider, self.version)
        self.version = new.version
        with self._lock:
            self._retired.append(old)
        return new

    # ------------------------------------------------------------ watcher thread

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._release_retired()
            try:
                vid = bundles.serving_id(self.root)
            except OSError:
                continue
            if vid is None or vid == self._target:
                continue
            self._target = vid
            if vid == self.version or vid in self.skipped:
                continue
            self._prepare(vid)

    def _prepare(self, vid: str) -> None:
        t0 = time.perf_counter()
        try:
            engine = self.load(vid)
        except Exception as e:  # anything: the serving engine must survive a bad version
            self.skipped[vid] = str(e)
            log.warning("cannot serve %s (%s); %s keeps serving", vid, e, self.version)
            return
        if self._stop.is_set() or bundles.serving_id(self.root) != vid:  # superseded while loading
            engine.close()
            return
        log.info("%s ready in %.2f s; swapping at the next frame", vid, time.perf_counter() - t0)
        with self._lock:
            stale, self._ready = self._ready, engine
        if stale is not None:
            stale.close()

    def _release_retired(self) -> None:
        with self._lock:
            old, self._retired = self._retired, []
        for engine in old:
            engine.close()

    def close(self, timeout: float = 0.5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._release_retired()
