"""`mas3-edge run`: camera -> engine -> ZeroMQ, with buffering, background adaptation and hot swap.

    Service(ServiceConfig(camera="synthetic://night", bundle=Path("bundle"))).run()

One loop thread does only per-frame work: take the newest frame, swap engines if a new one is
ready, infer, publish (never blocking), offer the frame to the buffer (queued to a writer
thread), tick the scheduler. Everything slow - capture, disk writes, engine loading and export,
adaptation - lives on other threads or in other processes. SIGINT/SIGTERM set a flag the loop
checks at least every 0.1 s; shutdown closes every part against one deadline (1 s), and a signal
then ends the process at once: the interpreter's own teardown of torch alone takes 0.5 s on a
desktop CPU (measured) and more on a small board, and a supervisor allows 2 s from SIGTERM to exit.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np

from mas3_edge.errors import UserError
from mas3_edge.labels import LABEL_SET_ID, LabelSet

from . import wire
from .camera import Camera, refit
from .fleet import FleetConfig, FleetRunner
from .frame_buffer import BufferPolicy, FrameBuffer
from .publisher import DEFAULT_ADDRESS, Publisher, check_address
from .scheduler import ScheduleConfig, Scheduler, default_round
from .swap import EngineSwapper
from .telemetry import MetricsServer, Telemetry, status_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    camera: str
    bundle: Path
    engine: str = "auto"
    device: str | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads
    precision: str | None = None  # fp32, fp16, int8 (None: each engine's default; engines.load_engine)
    publish: str = DEFAULT_ADDRESS
    topic: str = wire.DEFAULT_TOPIC
    camera_id: str | None = None  # the stream header's camera id (None: derived from the source)
    allow_remote: bool = False  # allows a non-loopback publish address and metrics host
    confidence: bool = False
    overlay: bool = True
    overlay_fps: float = 0.0  # at most this many overlays a second (0: one per frame)
    jpeg_quality: int = 80
    loop: bool = False
    fps: float | None = None  # pace file / synthetic sources (None: their own rate, 0: unpaced)
    buffer: Path | None = Path("frames")
    buffer_policy: BufferPolicy = field(default_factory=BufferPolicy)
    adapt: bool = True
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    fleet: FleetConfig | None = None  # share accepted rounds' sets, judge and serve the fleet's
    status_every: float = 5.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    health_stale_s: float = 5.0  # /healthz answers 503 once no frame was published for this long
    camera_stall_s: float = 3.0  # a live camera without a good frame for this long is reconnected
    events: Path | None = None  # JSON lines: status snapshots, rounds, swaps
    max_frames: int | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        if self.adapt and self.buffer is None:
            raise UserError("adaptation rounds need the frame buffer; drop --no-buffer or add --no-adapt")
        if self.fleet is not None and self.buffer is None:
            raise UserError("--fleet judges the fleet's sets on buffered frames; drop --no-buffer")
        if self.precision not in (None, "fp32", "fp16", "int8"):
            raise UserError(f"--precision must be fp32, fp16 or int8, got {self.precision!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        if not self.health_stale_s > 0:
            raise UserError(f"the health timeout must be positive, got {self.health_stale_s} s")
        for name, value, ok, rule in (
                ("--fps", self.fps, lambda v: v >= 0, "0 (unpaced) or more"),
                ("--overlay-fps", self.overlay_fps, lambda v: v >= 0, "0 (every frame) or more"),
                ("--duration", self.duration, lambda v: v > 0, "more than 0 seconds"),
                ("--max-frames", self.max_frames, lambda v: v >= 1, "at least 1"),
                ("--threads", self.threads, lambda v: v >= 1, "at least 1"),
                ("--status-every", self.status_every, lambda v: v > 0, "more than 0 seconds"),
                ("--metrics-port", self.metrics_port, lambda v: 0 <= v <= 65535, "a port in 0..65535 (0: any)"),
                ("the camera stall timeout", self.camera_stall_s, lambda v: v > 0, "more than 0 seconds")):
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise UserError(f"{name} must be {rule}, got {value}")
        check_address(self.publish, self.allow_remote)  # now, not after minutes of engine export


class RateWindow:
    """Frames per second of the frames served in the last `window` seconds. A stream silent for
    longer than max(1 s, 4 of its frame intervals) has stopped: its rate is 0, and the count starts
    afresh when frames come again. So an outage neither props the figure up while it lasts (a rate
    over the last N frames, however old, does) nor drags it down after."""

    def __init__(self, window: float = 5.0):
        self.window = window
        self._t: deque[float] = deque()
        self._lock = threading.Lock()  # the metrics thread reads what the serving loop writes

    def add(self, t: float | None = None) -> None:
        t = time.monotonic() if t is None else t
        with self._lock:
            if self._t and t - self._t[-1] > self._silence_limit():
                self._t.clear()
            self._t.append(t)
            while self._t[0] <= t - self.window:
                self._t.popleft()

    def fps(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._t) < 2 or now - self._t[-1] > self._silence_limit():
                return 0.0
            return (len(self._t) - 1) / (self._t[-1] - self._t[0]) if self._t[-1] > self._t[0] else 0.0

    def _silence_limit(self) -> float:
        t = self._t  # one frame alone tells no interval: the window's span then bounds the silence
        return max(1.0, 4 * (t[-1] - t[0]) / (len(t) - 1)) if len(t) > 1 else float("inf")


class Service:
    def __init__(self, cfg: ServiceConfig, *, echo: Callable[[str], None] | None = None,
                 round_fn: Callable[..., dict] = default_round, exit_on_signal: bool = True):
        self.cfg, self.round_fn, self.exit_on_signal = cfg, round_fn, exit_on_signal
        self.signalled: int | None = None  # the signal that stopped the loop
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.telemetry = Telemetry()
        self.camera = self.swapper = self.engine = self.publisher = self.buffer = None
        self._labels: dict[str, LabelSet] = {}  # version id -> its label set, read once from model.json
        self.scheduler = self.metrics = self._events = None
        self.fleet: FleetRunner | None = None
        self.infer_errors = 0
        self.overlay_due = 0.0  # monotonic time from which the next frame gets an overlay
        self.rate = RateWindow()
        self._stop = threading.Event()
        self._last_status = 0.0

    def stop(self, signum: int | None = None, _frame=None) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self.signalled = self.signalled or signum
        self._stop.set()
        if self.swapper is not None:
            self.swapper.stop()  # an export at startup would otherwise hold run() for minutes

    def run(self) -> dict:
        """Serve until the source ends, a limit is reached, or stop()/SIGINT/SIGTERM; return a summary.

        Run in the main thread, SIGINT/SIGTERM end the process (exit 0) once everything is closed and
        flushed, unless exit_on_signal=False."""
        restore = self._install_signals()
        try:
            self._open()
            self._loop()
        except UserError:
            if not self.signalled:
                raise  # stopped by a signal while starting (an engine export): a clean stop, not an error
        finally:
            self._close()
            for sig, handler in restore.items():
                signal.signal(sig, handler)
        summary = self.snapshot()
        self._emit_line(f"stopped after {summary['frames']} frames: " + status_line(summary))
        if self.signalled and self.exit_on_signal:
            _exit_now(0)
        return summary

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    # ------------------------------------------------------------ setup and teardown

    def _open(self) -> None:
        c = self.cfg
        if c.events is not None:
            c.events.parent.mkdir(parents=True, exist_ok=True)
            self._events = open(c.events, "a", buffering=1)
        self.swapper = EngineSwapper(c.bundle, kind=c.engine, device=c.device, precision=c.precision,
                                     confidence=c.confidence)
        size = self._input_size()
        # the camera first: "no camera" must fail in a second, before any engine is loaded. Its frames
        # are numbered from the first one served (start() in _loop): none is used up while loading.
        self.camera = Camera(c.camera, size, loop=c.loop, fps=c.fps, camera_id=c.camera_id,
                             stall_s=c.camera_stall_s).connect(start=False)
        # the sockets before the engine: a port in use fails now, and a subscriber already waiting
        # joins while the engine loads instead of missing the first frames
        self.publisher = Publisher(c.publish, c.topic, allow_remote=c.allow_remote)
        if c.metrics_port is not None:
            self.metrics = MetricsServer(c.metrics_port, self.snapshot, self.telemetry, host=c.metrics_host,
                                         allow_remote=c.allow_remote, stale_after=c.health_stale_s)
        self.swapper.threads = self._threads()
        self.engine = self.swapper.start()
        self.labels_of(self.engine.version)  # model.json is read here and at a swap, not per frame
        if c.buffer is not None:
            self.buffer = FrameBuffer(c.buffer, c.buffer_policy)
        if c.adapt and self.swapper.root is not None:
            self.scheduler = Scheduler(self.swapper.root, c.buffer, c.schedule, round_fn=self.round_fn)
        if c.fleet is not None and c.buffer is not None and self.swapper.root is not None:
            self.fleet = FleetRunner(c.fleet, self.swapper.root, c.buffer, c.schedule, self.camera.id)
        e = self.engine
        self._emit_line(f"serving {e.version} with {e.name} {e.precision} on {e.provider} | camera {c.camera} "
                        f"| publishing on {self.publisher.endpoint} topic {c.topic}"
                        + (f" | metrics on {self.metrics.url}/metrics" if self.metrics else ""))
        self._event("start", version=e.version, engine=e.name, precision=e.precision, provider=e.provider,
                    endpoint=self.publisher.endpoint)

    def _threads(self) -> int:
        """CPU threads for inference. More threads than free cores is a disaster on a small CPU: torch
        with 2 threads on 2 busy cores measured 1.5 s a frame against 13 ms with 1 (OpenMP workers spin
        against each other). So leave a core to capture/encoding, and half the cores to adaptation."""
        import os
        cores = os.cpu_count() or 2
        n = self.cfg.threads or max(1, cores // 2 if self.cfg.adapt else cores - 1)
        import torch
        if not torch.cuda.is_available() or self.cfg.device == "cpu":
            torch.set_num_threads(n)
        return n

    def labels_of(self, version: str) -> LabelSet:
        """The label set of a served version (its model.json): what each message's ids mean."""
        if version not in self._labels:
            from mas3_edge import bundle as bundles
            labels = bundles.version_labels(bundles.read_meta(self.swapper.vdir(version)))
            if len(labels.id) > wire.LABEL_SET_BYTES:  # the header would cut it: readers could not look it up
                raise UserError(f"label set id {labels.id!r} of {version} is longer than the {wire.LABEL_SET_BYTES} "
                                "characters the stream header holds; shorten it in the labels file")
            self._labels[version] = labels
        return self._labels[version]

    def _input_size(self) -> tuple[int, int]:
        """The size the camera resizes to: that of the first version the swapper would try."""
        from mas3_edge import bundle as bundles
        if not self.cfg.bundle.exists():
            raise UserError(f"bundle {self.cfg.bundle} does not exist; train one with `mas3-edge train` "
                            "or name another with --bundle")
        for vid in self.swapper.candidates():
            try:
                return tuple(bundles.read_meta(self.swapper.vdir(vid))["input_size"])
            except (UserError, KeyError):
                continue
        raise UserError(f"bundle {self.cfg.bundle} has no readable version; see `mas3-edge versions`")

    def _close(self) -> None:
        """Each part waits at most its own timeout and all of them together at most 1 s (then 0.05 s each)."""
        deadline = time.monotonic() + 1.0

        def left(cap: float) -> float:
            return max(0.05, min(cap, deadline - time.monotonic()))

        if self.swapper is not None:
            self.swapper.stop()  # now, not after the others: an export in progress is killed meanwhile
        for name, close in (("scheduler", lambda: self.scheduler.close(left(0.5))), ("fleet", lambda: self.fleet.close(left(0.3))),
                            ("camera", lambda: self.camera.disconnect(left(0.4))),
                            ("buffer", lambda: self.buffer.close(left(0.3), discard_pending=True)),
                            ("publisher", lambda: self.publisher.close()),
                            ("metrics", lambda: self.metrics.close()), ("swapper", lambda: self.swapper.close(left(0.2)))):
            if getattr(self, name) is None:
                continue
            try:
                close()
            except Exception as e:  # one part failing to close must not keep the others open
                log.warning("closing the %s failed: %s", name, e)
        if self._events is not None:
            self._event("stop", **{k: v for k, v in self.snapshot().items() if k != "miou_by_version"})
            self._events.close()
            self._events = None

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        self._stop.wait(self.publisher.join_wait())  # after a fast engine load: let waiting subscribers in
        self.camera.start()
        self.telemetry.started = time.monotonic()
        c, t_end = self.cfg, (time.monotonic() + self.cfg.duration) if self.cfg.duration is not None else None
        while not self._stop.is_set():
            if c.max_frames is not None and self.telemetry.frames >= c.max_frames:
                break
            if t_end is not None and time.monotonic() >= t_end:
                break
            new = self.swapper.poll()
            if new is not None:  # between two frames: nothing is in flight on the old engine
                old_version = self.engine.version
                self.labels_of(new.version)
                self.engine = self.swapper.swap(self.engine, new)
                self._emit_line(f"swapped {old_version} -> {new.version} ({new.name}) between frames "
                                f"{self.telemetry.frames} and {self.telemetry.frames + 1}")
                self._event("swap", **{"from": old_version, "to": new.version, "frame": self.telemetry.frames})
            frame = self.camera.read_latest(timeout=0.1)
            if frame is not None:
                self._serve(frame)
            elif self.camera.ended:
                self._emit_line(f"camera source {c.camera} ended" + (f" ({self.camera.error})" if self.camera.error else ""))
                break
            self._housekeeping()

    def _serve(self, frame) -> None:
        engine = self.engine
        image, crop = refit(frame, engine.input_size)  # a swap may change the input size
        t0 = time.perf_counter()
        try:
            classes, conf = engine.infer(image[None])
        except Exception as e:  # one bad call must not stop a robot's perception; many in a row do
            self.infer_errors += 1
            log.warning("inference failed on frame %d: %s", frame.id, e)
            if self.infer_errors >= 50:
                raise UserError(f"inference failed 50 times ({e}); stopping") from None
            return
        infer_ms = (time.perf_counter() - t0) * 1e3
        self.infer_errors = 0
        cls, labels = classes[0], self.labels_of(engine.version)
        jpeg = (wire.encode_overlay(image, cls, self.cfg.jpeg_quality, palette=labels.palette)
                if self._overlay_now() else None)
        msg = wire.encode(self.cfg.topic, frame.id, frame.capture_ns, cls, version=engine.version, engine=engine.name,
                          label_set=labels.id, num_classes=labels.num_classes, infer_us=int(infer_ms * 1e3),
                          confidence=conf[0] if self.cfg.confidence else None, overlay_jpeg=jpeg,
                          camera_id=self.camera.id, source_size=frame.source_size, crop=crop)
        self.publisher.send(msg)
        self.rate.add()
        self.telemetry.record((time.time_ns() - (frame.read_ns or frame.capture_ns)) / 1e6, infer_ms)
        # frames come with labels from synthetic sources only, and those are Cityscapes-19 train ids
        if frame.label is not None and frame.label.shape == cls.shape and labels.id == LABEL_SET_ID:
            self.telemetry.record_labels(cls, frame.label, engine.version, labels.num_classes, labels.ignore)
        if self.buffer is not None:
            self.buffer.offer(frame.image)

    def _overlay_now(self) -> bool:
        """Whether this frame's message carries an overlay: a picture for people, which costs more
        than a fast engine's frame at camera resolution, so `overlay_fps` can thin it out."""
        if not self.cfg.overlay:
            return False
        now = time.monotonic()
        if now < self.overlay_due:
            return False
        if self.cfg.overlay_fps:
            period = 1 / self.cfg.overlay_fps
            self.overlay_due += period  # on the clock, so that a 30 fps camera gets 10 overlays, not 7.5
            if self.overlay_due <= now:  # the first frame, or after a gap: count from now
                self.overlay_due = now + period
        return True

    def _housekeeping(self) -> None:
        if self.scheduler is not None and not (self.fleet is not None and self.fleet.busy):
            done = self.scheduler.tick(self.buffer.written, len(self.buffer))
            if done is not None:
                self._emit_line(f"adaptation round {done['round']} {done['outcome']}"
                                + (f" -> {done['version']}" if done.get("version") else "")
                                + f" after {done['seconds']:.0f} s: {done.get('reason')}")
                self._event("round", **done)
                if self.fleet is not None:
                    self.fleet.round_done(done)
        judged = self.fleet.tick(len(self.buffer), self.scheduler is not None and self.scheduler.busy) if self.fleet else None
        if judged is not None:
            self._emit_line(f"fleet set {judged['set'][:12]} of {judged['robot']} {judged['outcome']}"
                            + (f" -> {judged['version']}" if judged.get("version") else "") + f": {judged.get('reason')}")
            self._event("fleet", **judged)
        now = time.monotonic()
        if now - self._last_status >= self.cfg.status_every:
            self._last_status = now
            snap = self.snapshot()
            self._emit_line(status_line(snap))
            self._event("status", **snap)

    # ------------------------------------------------------------ reporting

    def snapshot(self) -> dict:
        s = self.telemetry.snapshot()
        s["fps"] = self.rate.fps()
        cam, e = self.camera, self.engine
        s.update(camera_dropped=cam.stats.dropped if cam else 0, camera_corrupt=cam.stats.corrupt if cam else 0,
                 camera_reconnects=cam.stats.reconnects if cam else 0, camera_connected=bool(cam is None or cam.connected or self._stop.is_set() or cam.ended),
                 publish_dropped=self.publisher.dropped if self.publisher else 0,
                 publish_sent=self.publisher.sent if self.publisher else 0,
                 engine=e.name if e else "-", provider=e.provider if e else "-", version=e.version if e else "-",
                 swaps=len(self.swapper.swaps) if self.swapper else 0,
                 buffer_frames=len(self.buffer) if self.buffer is not None else None,
                 buffer_stopped=self.buffer is not None and not self.buffer.enabled,
                 buffer_dropped=self.buffer.dropped if self.buffer is not None else 0,
                 rounds={}, last_round="off")
        if self.scheduler is not None:  # taken under the scheduler's lock: the metrics thread calls this too
            rounds = self.scheduler.snapshot()
            s.update(rounds=rounds["rounds"], last_round=rounds["last_round"])
        return s

    def _emit_line(self, line: str) -> None:
        self.echo(line)

    def _event(self, kind: str, **fields) -> None:
        if self._events is not None:
            rec = {"event": kind, "time": time.time(), **fields}
            self._events.write(json.dumps(rec, default=_jsonable) + "\n")


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown (everything of ours is closed by now)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe must not turn a clean stop into a traceback
            pass
    os._exit(code)


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)
