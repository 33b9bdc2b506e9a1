"""ROS bags as a source of unlabeled frames: ROS 2 (a folder with metadata.yaml, sqlite3 or MCAP
storage, or a bare .db3/.mcap file) and ROS 1 (.bag), read with `rosbags` (pure Python, no ROS).

    with Bag("drive_bag/?topic=/camera/image_raw") as bag:
        for stamp_ns, rgb, why in bag.frames():   # rgb: RGB uint8 (H, W, 3), or None and why not
            ...

The topic holds sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, 8UC1, 8UC3, mono16, 16UC1) or
sensor_msgs/CompressedImage (anything OpenCV decodes). Without `?topic=` the bag's only image topic
is taken. `header.stamp` is the frame's time (the bag's receive time when the driver left it zero).
The runtime's camera source (runtime/bag.py) and the adaptation frame loader (frames.py) share this.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from .errors import UserError

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
BAG_SUFFIXES = (".bag", ".mcap", ".db3")
INSTALL_HINT = 'reading ROS bags needs rosbags: pip install "mas3-edge[ros]"'
# encoding -> (dtype, channels, RGB order?) ; 16-bit is scaled to 8 bit as the camera does
ENCODINGS = {"rgb8": (np.uint8, 3, True), "bgr8": (np.uint8, 3, False), "8UC3": (np.uint8, 3, False),
             "rgba8": (np.uint8, 4, True), "bgra8": (np.uint8, 4, False), "mono8": (np.uint8, 1, True),
             "8UC1": (np.uint8, 1, True), "mono16": (np.uint16, 1, True), "16UC1": (np.uint16, 1, True)}


def split_source(source: str | Path) -> tuple[Path, str | None]:
    """'drive_bag/?topic=/cam' -> (Path('drive_bag'), '/cam'); no query -> (path, None)."""
    text = str(source)
    if "?" not in text or Path(text).exists():
        return Path(text), None
    path, query = text.rsplit("?", 1)
    topic = parse_qs(query).get("topic", [None])[-1]
    if topic is None:
        raise UserError(f"{source}: the only option after '?' is topic=/NAME (e.g. ?topic=/camera/image_raw)")
    return Path(path), topic


def is_bag(source: str | Path) -> bool:
    """A ROS 2 bag folder, a .bag/.mcap/.db3 file, or anything named with ?topic= (cheap: no rosbags import)."""
    if "?topic=" in str(source):
        return True
    path = Path(str(source))
    return (path.is_dir() and (path / "metadata.yaml").is_file()) or (path.is_file() and path.suffix in BAG_SUFFIXES)


def to_rgb8(msg) -> np.ndarray:
    """A deserialized Image or CompressedImage -> RGB uint8 (H, W, 3); ValueError if it cannot be."""
    if hasattr(msg, "format"):  # CompressedImage
        return _decode_compressed(msg)
    if msg.encoding not in ENCODINGS:
        raise ValueError(f"image encoding {msg.encoding!r} is not supported (use one of {', '.join(ENCODINGS)})")
    dtype, ch, rgb = ENCODINGS[msg.encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    row = w * ch * np.dtype(dtype).itemsize
    data = np.asarray(msg.data, np.uint8)
    if h * w == 0 or step < row or data.size < step * h:
        raise ValueError(f"a {w}x{h} {msg.encoding} image needs {step}x{h} bytes, the message has {data.size}")
    rows = data[: step * h].reshape(h, step)[:, :row]  # drop the row padding `step` allows
    arr = rows.copy().view(np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")).reshape(h, w, ch)
    return _rgb(arr.astype(dtype), rgb)


def _decode_compressed(msg) -> np.ndarray:
    import cv2
    arr = cv2.imdecode(np.asarray(msg.data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"a CompressedImage ({msg.format!r}) that OpenCV cannot decode")
    return _rgb(arr if arr.ndim == 3 else arr[..., None], False)  # OpenCV decodes colour as BGR(A)


def _rgb(arr: np.ndarray, rgb_order: bool) -> np.ndarray:
    """(H, W, C) uint8/uint16 -> RGB uint8 (H, W, 3)."""
    if arr.dtype == np.uint16:  # the same 16 -> 8 bit mapping as the camera's to_rgb
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    return np.ascontiguousarray(arr if rgb_order else arr[..., ::-1])


class Bag:
    """One image topic of a ROS bag, opened for reading (a context manager)."""

    def __init__(self, source: str | Path):
        self.source = str(source)
        self.path, wanted = split_source(source)
        if not self.path.exists():
            raise UserError(f"no ROS bag at {self.path}")
        self._reader = _open(self.path)
        try:
            self.topic, self.msgtype, self._conns = _pick_topic(self._reader, self.path, wanted)
        except UserError:
            self._reader.close()
            raise
        self.count = sum(c.msgcount for c in self._conns)

    @property
    def fps(self) -> float:
        """The topic's mean recorded rate (count over the bag's duration); 30 when it cannot tell."""
        seconds = self._reader.duration / 1e9
        return (self.count - 1) / seconds if self.count > 1 and seconds > 0 else 30.0

    def frames(self) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        """(stamp ns, RGB uint8 (H, W, 3) or None, why not) per message, in recording order.

        A message that does not decode yields None and the reason (the caller skips it); storage
        that fails part-way (a damaged file) raises UserError."""
        it = self._reader.messages(connections=self._conns)
        while True:
            try:
                conn, log_ns, raw = next(it)
            except StopIteration:
                return
            except Exception as e:  # sqlite / mcap / ROS 1 readers each raise their own types
                raise UserError(f"{self.path} is damaged part-way through topic {self.topic}: {e}") from None
            try:
                msg = self._reader.deserialize(raw, conn.msgtype)
                yield stamp_ns(msg.header) or log_ns, to_rgb8(msg), None
            except Exception as e:  # one bad message is skipped, not fatal
                yield log_ns, None, f"{self.topic} at {log_ns / 1e9:.3f} s: {e}"

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Bag:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _open(path: Path):
    """An open rosbags AnyReader; UserError for a missing rosbags or a damaged bag."""
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError:
        raise UserError(f"{path}: {INSTALL_HINT}") from None
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise UserError(f"{path} is a folder without metadata.yaml: not a ROS 2 bag")
    # bags from ROS 2 before Iron carry no message definitions: fall back to Humble's
    reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
    try:
        reader.open()
    except Exception as e:  # AnyReaderError, sqlite3 errors, a bad metadata.yaml ...
        raise UserError(f"{path} is not a readable ROS bag (truncated or damaged?): {e}; "
                        f"{_repair_hint(path)}") from None
    return reader


def _repair_hint(path: Path) -> str:
    files = [p.suffix for p in path.iterdir()] if path.is_dir() else [path.suffix]
    if ".bag" in files:
        return "`rosbag reindex` rebuilds a ROS 1 bag's index"
    if ".mcap" in files:
        return "`mcap recover` (the MCAP CLI) rebuilds an MCAP file's index"
    return "`sqlite3 FILE.db3 .recover` salvages a damaged database"


def _pick_topic(reader, path: Path, wanted: str | None):
    topics = {c.topic: c.msgtype for c in reader.connections}
    images = sorted(t for t, m in topics.items() if m in (IMAGE, COMPRESSED))
    if wanted is None and len(images) != 1:
        if not images:
            listed = ", ".join(f"{t} ({m})" for t, m in sorted(topics.items())) or "none"
            raise UserError(f"{path} has no sensor_msgs/Image or CompressedImage topic (topics: {listed})")
        raise UserError(f"{path} has {len(images)} image topics ({', '.join(images)}); "
                        f"pick one with {path}?topic=NAME")
    topic = wanted or images[0]
    if topic not in images:
        what = f"is {topics[topic]}, not an image" if topic in topics else "is not in the bag"
        raise UserError(f"{path}: topic {topic} {what}; image topics: {', '.join(images) or 'none'}")
    return topic, topics[topic], [c for c in reader.connections if c.topic == topic]
