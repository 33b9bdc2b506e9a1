"""What a camera source is, apart from the thread that reads it: frame conversion, the camera id,
and one reader per kind of source behind `open_reader(--camera value)`.

Sources: a device index ("0"), a video file, an RTSP/HTTP URL, a GStreamer pipeline (contains
"!"), a folder of images, a ROS bag's image topic (runtime/bag.py: "drive_bag/?topic=/cam"), or
"synthetic://DOMAIN[?seed=N&shift=F]" (mas3_edge.synth scenes, which carry labels so the runtime
can report live mIoU). A reader's read() returns (status, image, label, capture_ns).

OpenCV and FFmpeg log to stderr on their own (a missing device alone prints ten lines); our own
messages say what went wrong in one line, so both are kept quiet while a source is opened
(OpenCV's log level is restored after; FFmpeg's is set once, unless OPENCV_FFMPEG_LOGLEVEL is
already set to debug a stream).
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
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
