"""Camera capture behind one small interface: connect / read_latest / disconnect.

    with Camera("video.avi", size=(128, 256), loop=True) as cam:
        frame = cam.read_latest(timeout=1.0)   # Frame(id, capture_ns, image RGB uint8 (H, W, 3), label, ...)

Sources: a device index ("0"), a video file, an RTSP/HTTP URL, a GStreamer pipeline (contains
"!"), a folder of images, a ROS bag's image topic (runtime/bag.py: "drive_bag/?topic=/cam"), or
"synthetic://DOMAIN[?seed=N&shift=F]" (mas3_edge.synth scenes, which carry labels so the runtime
can report live mIoU).

A background thread reads as fast as the source gives frames and keeps only the newest one: the
serving loop never waits on I/O it does not need and never sees a stale frame (a frame replaced
before it was read is counted in `stats.dropped`). A live source that gives no good frame for
`stall_s` seconds (wall clock, however its reads fail: at once, after a network timeout, or
with garbage) is closed and reopened with exponential backoff; a file ends or loops. Corrupt frames are skipped and
counted; grey, 16-bit, BGRA and odd-sized frames are converted, centre-cropped to the model's
aspect ratio and resized; each frame says which box of the source it shows. `capture_ns` is
taken when the source hands over the frame, before any decoding or resizing of ours, so latency
figures downstream include that work. The design follows lerobot's OpenCV camera.

OpenCV and FFmpeg log to stderr on their own (a missing device alone prints ten lines); the
camera's own messages say what went wrong in one line, so both are kept quiet while a source is
opened (OpenCV's log level is restored after; FFmpeg's is set once, unless OPENCV_FFMPEG_LOGLEVEL
is already set to debug a stream).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from mas3_edge.errors import UserError

log = logging.getLogger(__name__)
# FFmpeg reads this once, when OpenCV first opens a file or stream with it: set it before that
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

SYNTHETIC = "synthetic://"
CAMERA_ID_MAX = 32  # bytes of the wire header's camera_id field
OK, BAD, FAIL, END = "ok", "bad", "fail", "end"  # a frame / undecodable data / no data / end of stream


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
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- frame conversion

def to_rgb(arr: np.ndarray, bgr: bool = True) -> np.ndarray:
    """Grey / BGR / BGRA (or RGB with bgr=False), 8- or 16-bit or float -> RGB uint8 (H, W, 3)."""
    if not isinstance(arr, np.ndarray) or arr.size == 0 or arr.ndim not in (2, 3):
        raise ValueError(f"not an image: {getattr(arr, 'shape', type(arr).__name__)}")
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = (np.clip(np.nan_to_num(arr), 0, 1) * 255 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    if arr.ndim == 2 or arr.shape[2] in (1, 2):
        return cv2.cvtColor(np.ascontiguousarray(arr if arr.ndim == 2 else arr[..., 0]), cv2.COLOR_GRAY2RGB)
    if arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    if arr.shape[2] != 3:
        raise ValueError(f"unsupported channel count {arr.shape[2]}")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if bgr else arr


def crop_box(shape: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred box (x, y, w, h) of an image of `shape` (H, W) with the aspect ratio of `size` (H, W)."""
    (ih, iw), (h, w) = shape[:2], size
    if ih * w > iw * h:  # too tall
        ch = max(1, round(iw * h / w))
        return 0, (ih - ch) // 2, iw, ch
    if ih * w < iw * h:  # too wide
        cw = max(1, round(ih * w / h))
        return (iw - cw) // 2, 0, cw, ih
    return 0, 0, iw, ih


def fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop to the aspect ratio of `size` (H, W), then resize: shapes are not distorted."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    x, y, cw, ch = crop_box(image.shape[:2], size)
    image = image[y:y + ch, x:x + cw]
    interp = cv2.INTER_AREA if ch > h else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)


def refit(frame: Frame, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """`frame.image` fitted to another `size` (H, W), and the box of the source it then shows."""
    ih, iw = frame.image.shape[:2]
    if (ih, iw) == tuple(size):
        return frame.image, frame.crop
    bx, by, bw, bh = crop_box((ih, iw), size)
    x, y, w, h = frame.crop or (0, 0, iw, ih)
    sx, sy = w / iw, h / ih
    return fit(frame.image, size), (x + round(bx * sx), y + round(by * sy), round(bw * sx), round(bh * sy))


def default_camera_id(source: str) -> str:
    """A short id for the stream header: cam0, a file or folder name, a URL's host and path (never its
    credentials), gstreamer, synthetic-night."""
    source = str(source).strip()
    if source.isdigit():
        sid = f"cam{source}"
    elif source.startswith(SYNTHETIC):
        sid = "synthetic-" + (urlparse(source).netloc or urlparse(source).path)
    elif "!" in source:
        sid = "gstreamer"
    elif "://" in source:
        url = urlparse(source)
        sid = f"{url.hostname or ''}{url.path}"
    else:
        sid = Path(source).name
    return re.sub(r"[^A-Za-z0-9._:/-]", "_", sid)[:CAMERA_ID_MAX] or "camera"


# ---------------------------------------------------------------- readers (one per kind of source)

class _QuietOpenCV:
    """OpenCV's log silenced while any thread is inside the block; the level before is restored
    when the last one leaves (the level is global, and the capture thread reopens on its own)."""

    def __init__(self):
        self._lock, self._depth, self._saved = threading.Lock(), 0, None

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            self._depth += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                cv2.utils.logging.setLogLevel(self._saved)


quiet_opencv = _QuietOpenCV()


class _CvReader:
    """cv2.VideoCapture on a device, file, URL or GStreamer pipeline."""

    def __init__(self, target, api: int, live: bool, what: str, params: list[int] | None = None):
        self.live, self.what, self.bgr = live, what, True
        with quiet_opencv:  # each backend tried says why it could not; our error says it once
            self.cap = cv2.VideoCapture(target, api, params or [])
            if not self.cap.isOpened():
                self.cap.release()
                raise UserError(f"cannot open {what}")
            if live:
                self.cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver's queue would hand us stale frames
            native = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = native if 1 <= native <= 240 else 30.0

    def read(self):
        """(status, image, label, capture_ns); grab() then retrieve() so the time is the grab's, not the decode's."""
        ok = self.cap.grab()
        t = time.time_ns()
        ok, arr = self.cap.retrieve() if ok else (False, None)
        if ok and arr is not None and arr.size:
            return OK, arr, None, t
        if self.live:
            return FAIL, None, None, t
        count, pos = self.cap.get(cv2.CAP_PROP_FRAME_COUNT), self.cap.get(cv2.CAP_PROP_POS_FRAMES)
        return (BAD if 0 < pos < count - 1 else END), None, None, t  # a hole mid-file is a corrupt frame

    def rewind(self) -> bool:
        return bool(self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0))

    def close(self) -> None:
        self.cap.release()


class _FolderReader:
    def __init__(self, folder: Path):
        from mas3_edge.data import list_images
        self.paths, self.i, self.live, self.fps, self.bgr = list_images(folder), 0, False, 30.0, False

    def read(self):
        from mas3_edge.data import read_image
        t = time.time_ns()  # a file is "grabbed" when we open it; its decoding counts as latency
        if self.i >= len(self.paths):
            return END, None, None, t
        path, self.i = self.paths[self.i], self.i + 1
        try:
            return OK, read_image(path), None, t
        except UserError as e:
            log.warning("skipping %s", e)
            return BAD, None, None, t

    def rewind(self) -> bool:
        self.i = 0
        return True

    def close(self) -> None:
        pass


class _SyntheticReader:
    """An endless stream of mas3_edge.synth scenes rendered at the model's size, with labels."""

    def __init__(self, spec: str, size: tuple[int, int]):
        from mas3_edge import synth
        url = urlparse(spec)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.domain, self.size = url.netloc or url.path, size
        self.seed, self.shift = int(q.get("seed", 0)), float(q.get("shift", 0.0))
        synth.render(self.domain, 0, (32, 32), self.shift)  # validates domain and options now
        self.i, self.live, self.fps, self.bgr = 0, False, 10.0, False

    def read(self):
        from mas3_edge import synth
        img, label = synth.render(self.domain, synth.scene_seed(self.seed, self.i), self.size, self.shift)
        self.i += 1
        return OK, img, label, time.time_ns()  # rendering stands in for the exposure

    def rewind(self) -> bool:
        return True

    def close(self) -> None:
        pass


def open_reader(source: str, size: tuple[int, int], live: bool | None = None, read_timeout_s: float = 5.0):
    """Parse a --camera value and open it; UserError (one line) when it cannot be opened. A network
    stream's reads give up after `read_timeout_s`, so a frozen stream is noticed by then."""
    source = str(source).strip()
    if source.startswith(SYNTHETIC):
        return _SyntheticReader(source, size)
    if source.isdigit():
        idx = int(source)
        try:
            return _CvReader(idx, cv2.CAP_ANY, True if live is None else live, f"camera {idx}")
        except UserError:
            raise UserError(f"no camera at index {idx} (is it plugged in and free? on Linux see /dev/video*)") from None
    if "!" in source:
        return _CvReader(source, cv2.CAP_GSTREAMER, True if live is None else live,
                         "GStreamer pipeline (is OpenCV built with GStreamer?)")
    if "://" in source:
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000,
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, max(100, round(read_timeout_s * 1000))]
        return _CvReader(source, cv2.CAP_FFMPEG, True if live is None else live, f"stream {source}", timeouts)
    from mas3_edge.bags import is_bag
    if is_bag(source):  # before the folder branch: a ROS 2 bag is a folder too
        from .bag import BagReader
        return BagReader(source)
    path = Path(source)
    if path.is_dir():
        return _FolderReader(path)
    if not path.is_file():
        raise UserError(f"camera source {source} is neither a file, a folder, a device index, a URL "
                        f"nor {SYNTHETIC}DOMAIN")
    try:
        return _CvReader(str(path), cv2.CAP_ANY, bool(live), f"video file {path}")
    except UserError:
        raise UserError(f"cannot read video file {path} (corrupt or an unsupported codec)") from None


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

    def connect(self, start: bool = True) -> "Camera":
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

    def __enter__(self) -> "Camera":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.disconnect()

    # ------------------------------------------------------------ capture thread

    def _run(self) -> None:
        failures, next_t = 0, self._pace(time.monotonic())  # the first frame was read by connect()
        while not self._stop.is_set():
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
