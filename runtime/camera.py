"""Camera capture behind one small interface: connect / read_latest / disconnect.

    with Camera("video.avi", size=(128, 256), loop=True) as cam:
        frame = cam.read_latest(timeout=1.0)   # Frame(id, capture_ns, image RGB uint8 (H, W, 3), label, ...)

The sources (devices, files, streams, folders, bags, synthetic scenes) and the conversion of their
frames are in runtime/sources.py.

A background thread reads as fast as the source gives frames and keeps only the newest one: the
serving loop never waits on I/O it does not need and never sees a stale frame (a frame replaced
before it was read is counted in `stats.dropped`). A file or synthetic source read unpaced
(fps=0) is the exception: it is read one frame ahead of the consumer and loses none, so the next
frame is decoded while the current one is served and no core decodes frames nobody takes. A live source that gives no good frame for
`stall_s` seconds (on the clock, however its reads fail: at once, after a network timeout, or with
garbage) is closed and reopened with exponential backoff; a file ends or loops. Corrupt frames are
skipped and counted; grey, 16-bit, BGRA and odd-sized frames are converted, centre-cropped to the
model's aspect ratio and resized; each frame says which box of the source it shows. `capture_ns`
is taken when the source hands over the frame, before any decoding or resizing of ours, so latency
figures downstream include that work. The design follows lerobot's OpenCV camera.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np

from mas3_edge.errors import UserError

from .sources import (BAD, CAMERA_ID_MAX, END, FAIL, OK, SYNTHETIC, crop_box, default_camera_id, fit,  # noqa: F401
                      open_reader, quiet_opencv, to_rgb)

log = logging.getLogger(__name__)


@dataclass
class Frame:
    id: int  # capture sequence number, +1 per frame grabbed (across reconnects and loops)
    capture_ns: int  # time.time_ns() when the source handed the frame over (before decode and resize)
    image: np.ndarray  # RGB uint8 (H, W, 3) at the requested size
    label: np.ndarray | None = None  # uint8 (H, W) train ids, synthetic sources only
    source_size: tuple[int, int] | None = None  # (H, W) as the source gave it; None: that of `image`
    crop: tuple[int, int, int, int] | None = None  # x, y, w, h in source pixels that `image` shows; None: all
    read_ns: int = 0  # local time.time_ns() of the read: the latency clock (capture_ns of a bag is its recorded stamp)


@dataclass
class CameraStats:
    grabbed: int = 0  # frames read from the source
    delivered: int = 0  # frames handed out by read_latest
    dropped: int = 0  # frames replaced by a newer one before anyone read them
    corrupt: int = 0  # undecodable or malformed frames skipped
    read_errors: int = 0  # reads that returned nothing (device gone, stream stalled)
    reconnects: int = 0
    stalls: int = 0  # reconnects because a live source gave no good frame for stall_s
    warmup: int = 0  # live frames read between connect(start=False) and start(), never handed out
    loops: int = 0


def refit(frame: Frame, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """`frame.image` fitted to another `size` (H, W), and the box of the source it then shows."""
    ih, iw = frame.image.shape[:2]
    if (ih, iw) == tuple(size):
        return frame.image, frame.crop
    bx, by, bw, bh = crop_box((ih, iw), size)
    x, y, w, h = frame.crop or (0, 0, iw, ih)
    sx, sy = w / iw, h / ih
    return fit(frame.image, size), (x + round(bx * sx), y + round(by * sy), round(bw * sx), round(bh * sy))


# ---------------------------------------------------------------- the camera

class Camera:
    """A source read on a background thread; `read_latest` hands out the newest unread frame."""

    def __init__(self, source: str, size: tuple[int, int], *, loop: bool = False, fps: float | None = None,
                 live: bool | None = None, max_failures: int = 30, backoff: tuple[float, float] = (0.25, 8.0),
                 camera_id: str | None = None, stall_s: float = 3.0):
        self.source, self.size, self.loop = str(source), (int(size[0]), int(size[1])), loop
        self.id = default_camera_id(self.source) if camera_id is None else camera_id
        if not (self.id and self.id.isascii() and self.id.isprintable() and len(self.id) <= CAMERA_ID_MAX):
            raise UserError(f"camera id {self.id!r} must be 1 to {CAMERA_ID_MAX} printable ASCII characters")
        if not stall_s > 0:
            raise UserError(f"the camera's stall timeout must be positive, got {stall_s} s")
        self.fps_limit, self.live_override = fps, live
        self.max_failures, self.backoff, self.stall_s = max_failures, backoff, stall_s
        self.stats = CameraStats()
        self._reader = None
        self._open = False  # the reader is open (False while reconnecting)
        self._last_good = self._opened = time.monotonic()  # the stall clocks: last good frame, last (re)open
        self._delay = backoff[0]  # the next reconnect's wait; back to the start after a good frame
        self._numbering = True  # False between connect(start=False) and start()
        self._cond = threading.Condition()
        self._fresh: Frame | None = None
        self._done = False  # the source ended (or failed for good) and the thread has stopped
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_id = 0

    @property
    def live(self) -> bool:
        return bool(self._reader and self._reader.live)

    @property
    def stalled(self) -> bool:
        """A live source that has given no good frame for stall_s (known even while a read hangs, and
        still so after a reopen until a frame comes)."""
        return self.live and time.monotonic() - self._last_good > self.stall_s

    @property
    def connected(self) -> bool:
        """Open and delivering: False while reconnecting, and as soon as a live source stalls."""
        return self._open and not self.stalled

    @property
    def ended(self) -> bool:
        return self._done

    @property
    def has_labels(self) -> bool:
        return self.source.startswith(SYNTHETIC)

    def connect(self, start: bool = True) -> Camera:
        """Open the source and check it yields a frame; UserError if not. Starts the capture thread.

        With start=False nothing is handed out or numbered until start(): a file is not read ahead
        (its first frames are not lost while the caller gets ready), and a live source is read all
        along (so its queue never fills with stale frames) but those frames are thrown away."""
        self._numbering = start
        self._reader = self._open_reader()
        rate = self.fps_limit if self.fps_limit is not None else (0.0 if self._reader.live else self._reader.fps)
        self._period = 1.0 / rate if rate and rate > 0 else 0.0
        if not self._probe():
            self._reader.close()
            raise UserError(f"camera source {self.source} opened but gave no readable frame")
        self._open = True
        if start or self._reader.live:
            self._start_thread()
        return self

    def start(self) -> None:
        """Hand out frames from now on, numbered from 0 (after connect(start=False))."""
        with self._cond:
            self._numbering = True
            probe = self._fresh
            if probe is not None and not self.live:  # a file's first frame, read by connect() and held:
                now = time.time_ns()  # the wait for start() is no latency of the stream, so it is read now
                probe.read_ns = now
                if not getattr(self._reader, "recorded", False):  # a bag's stamp is its recording's
                    probe.capture_ns = now
        if self._thread is None:
            self._start_thread()

    def _open_reader(self):
        return open_reader(self.source, self.size, self.live_override, read_timeout_s=self.stall_s)

    def _probe(self) -> bool:
        """Read until one good frame (True) or the end; give up after max_failures reads, or for a
        live source after stall_s. Kept quiet: a device that opens but cannot deliver warns per read."""
        deadline, status = time.monotonic() + self.stall_s, FAIL
        with quiet_opencv:
            for _ in range(self.max_failures):
                status = self._grab_one()
                if status in (OK, END) or (self._reader.live and time.monotonic() > deadline):
                    break
        return status == OK

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)
        self._thread.start()

    def read_latest(self, timeout: float = 1.0) -> Frame | None:
        """The newest frame not yet handed out; waits up to `timeout` s; None if none came (or ended)."""
        with self._cond:
            if self._fresh is None and not self._done:
                self._cond.wait_for(lambda: self._fresh is not None or self._done, timeout)
            frame, self._fresh = self._fresh, None
            if frame is not None:
                self.stats.delivered += 1
                self._cond.notify_all()  # an unpaced file's reader decodes the next one now
            return frame

    def disconnect(self, timeout: float = 1.0) -> None:
        """Stop the thread and release the source (a read stuck in a driver is abandoned after `timeout`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._reader is not None and not (self._thread and self._thread.is_alive()):
            self._reader.close()
        self._open = False
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def __enter__(self) -> Camera:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.disconnect()

    # ------------------------------------------------------------ capture thread

    def _run(self) -> None:
        failures, next_t = 0, self._pace(time.monotonic())  # the first frame was read by connect()
        while not self._stop.is_set():
            if self._hold and not self._wait_taken():
                break
            status = self._grab_one()
            if status == OK:
                failures = 0
                next_t = self._pace(next_t)
            elif status in (BAD, FAIL):
                failures += 1
                why = self._why_reconnect(failures)
                if why is not None:
                    failures = 0
                    if not self._recover(why):
                        break
            elif status == END and not self._at_end():
                break
        with self._cond:
            self._done = True
            self._cond.notify_all()

    @property
    def _hold(self) -> bool:
        """An unpaced file or synthetic source is read one frame ahead of the consumer: decoding frames
        only to replace them unread takes a whole core from inference on a 2-core CPU
        (tools/profile_run.py)."""
        return not self._period and not self.live

    def _wait_taken(self) -> bool:
        """Wait until the frame in hand was taken (True) or we are stopped (False)."""
        with self._cond:
            while self._fresh is not None and not self._stop.is_set():
                self._cond.wait(0.1)
        return not self._stop.is_set()

    def _why_reconnect(self, failures: int) -> str | None:
        """Why to reopen the source after this many failed reads in a row; None to read on. The clock
        matters more than the count: a frozen network stream fails each read only after its timeout."""
        if self.live and time.monotonic() - max(self._last_good, self._opened) > self.stall_s:
            self.stats.stalls += 1  # a reopened source gets stall_s of its own to deliver
            return f"no good frame for {self.stall_s:g} s"
        if failures >= self.max_failures:
            return f"{self.max_failures} failed reads in a row"
        return None

    def _grab_one(self) -> str:
        try:
            status, arr, label, t = self._reader.read()
        except Exception as e:  # a backend raising mid-stream is one more failed read, not a crash
            log.debug("read raised %s", e)
            status, arr, label, t = FAIL, None, None, 0
        if status == OK:
            try:
                rgb = to_rgb(arr, self._reader.bgr)
                image = fit(rgb, self.size)
            except (ValueError, cv2.error):
                status = BAD
            else:
                read_ns = time.time_ns() if getattr(self._reader, "recorded", False) else t
                self._publish(t, image, label, rgb.shape[:2], crop_box(rgb.shape[:2], self.size), read_ns)
        if status == BAD:
            self.stats.corrupt += 1
        elif status == FAIL:
            self.stats.read_errors += 1
        return status

    def _publish(self, capture_ns: int, image: np.ndarray, label: np.ndarray | None, source_size: tuple[int, int],
                 crop: tuple[int, int, int, int], read_ns: int) -> None:
        self._last_good, self._delay = time.monotonic(), self.backoff[0]
        if not self._numbering and self._reader.live:
            self.stats.warmup += 1  # before start(): read to keep the stream drained, never handed out
            return
        if label is not None and label.shape != image.shape[:2]:
            label = cv2.resize(label, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        with self._cond:
            frame = Frame(self._next_id, capture_ns, image, label, source_size, crop, read_ns)
            self._next_id += 1
            if self._fresh is not None:
                self.stats.dropped += 1
            self._fresh = frame
            self.stats.grabbed += 1
            self._cond.notify_all()

    def _pace(self, next_t: float) -> float:
        """Hold file/synthetic sources to their frame rate (live sources pace themselves)."""
        if not self._period:
            return next_t
        next_t = max(next_t + self._period, time.monotonic() - self._period)  # no burst after a stall
        self._stop.wait(max(0.0, next_t - time.monotonic()))
        return next_t

    def _at_end(self) -> bool:
        """End of stream: loop, reconnect (live) or stop. True to keep reading."""
        if self.loop and self._reader.rewind():
            self.stats.loops += 1
            return True
        if self._reader.live:
            return self._recover("the stream ended")
        log.info("camera source %s ended", self.source)
        return False

    def _recover(self, why: str) -> bool:
        """Reopen a live source with exponential backoff until it works or we are stopped. The backoff
        goes on growing across reopens that give no good frame: a source that opens and then
        stalls again is not hammered."""
        if not self._reader.live:
            self.error = f"{self.source}: {why}"
            log.warning("camera %s: %s; giving up on a non-live source", self.source, why)
            return False
        log.warning("camera %s: %s; reconnecting", self.source, why)
        self._open = False
        self._reader.close()
        while not self._stop.wait(self._delay):
            self._delay = min(self._delay * 2, self.backoff[1])
            try:
                self._reader = self._open_reader()
            except UserError as e:
                log.warning("camera %s: reconnect failed (%s); next try in %.1f s", self.source, e, self._delay)
                continue
            self.stats.reconnects += 1
            self._open, self._opened = True, time.monotonic()
            log.warning("camera %s: reconnected", self.source)
            return True
        return False
