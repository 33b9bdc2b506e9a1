"""The segmentation stream's wire format: one ZeroMQ frame per message (docs/wire-format.md).

    TOPIC (ASCII) 0x00 | HEADER (112 bytes, little-endian) | classes | [confidence] | [overlay JPEG]

One frame, not a multipart message, so a subscriber may use ZMQ_CONFLATE (which drops multipart
messages) to keep only the newest. The topic comes first so SUB prefix filtering works; the NUL
ends it so a parser finds the header without knowing the topic. The header is fixed-size and
carries its own size, so a reader can skip fields added later.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import numpy as np

MAGIC = b"M3SG"
WIRE_VERSION = 1
DEFAULT_TOPIC = "mas3/seg"
FLAG_CONFIDENCE, FLAG_OVERLAY = 1, 2
# magic, version, header size, frame id, capture ns, publish ns, latency us, infer us, width, height,
# flags, num classes, reserved, model version, engine, label set, class/conf/overlay byte counts, reserved
HEADER = struct.Struct("<4sHHQqqIIHHBBH16s16s16sIIII")
assert HEADER.size == 112


class WireError(ValueError):
    """A message that does not parse (wrong magic, truncated, sizes that do not add up)."""


@dataclass
class Message:
    """A decoded segmentation message; arrays are views into the received buffer (read-only)."""

    topic: str
    frame_id: int
    capture_ns: int
    publish_ns: int
    latency_us: int  # capture -> publish, inside the runtime
    infer_us: int
    version: str
    engine: str
    label_set: str
    num_classes: int
    classes: np.ndarray  # uint8 (H, W) train ids
    confidence: np.ndarray | None = None  # float32 (H, W) in [0, 1], quantised to 1/255
    overlay_jpeg: bytes | None = None

    @property
    def height(self) -> int:
        return int(self.classes.shape[0])

    @property
    def width(self) -> int:
        return int(self.classes.shape[1])

    def age_ms(self, now_ns: int | None = None) -> float:
        """Capture-to-now in milliseconds (same host clock as the publisher)."""
        return ((now_ns or time.time_ns()) - self.capture_ns) / 1e6

    def overlay_rgb(self) -> np.ndarray | None:
        """The JPEG overlay decoded to RGB uint8 (H, W, 3), or None when the message has none."""
        if not self.overlay_jpeg:
            return None
        import cv2
        bgr = cv2.imdecode(np.frombuffer(self.overlay_jpeg, np.uint8), cv2.IMREAD_COLOR)
        return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _text(s: str, n: int = 16) -> bytes:
    return s.encode("ascii", "replace")[:n]  # struct pads with NUL up to n


def encode(topic: str, frame_id: int, capture_ns: int, classes: np.ndarray, *, version: str = "",
           engine: str = "", label_set: str = "", num_classes: int = 0, infer_us: int = 0,
           confidence: np.ndarray | None = None, overlay_jpeg: bytes | None = None,
           publish_ns: int | None = None) -> bytes:
    """Pack one message. `classes` uint8 (H, W); `confidence` float (H, W) in [0, 1]."""
    if classes.dtype != np.uint8 or classes.ndim != 2:
        raise WireError(f"classes must be uint8 (H, W), got {classes.dtype} {classes.shape}")
    h, w = classes.shape
    conf = b""
    if confidence is not None:
        if confidence.shape != classes.shape:
            raise WireError(f"confidence shape {confidence.shape} differs from classes {classes.shape}")
        conf = np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8).tobytes()
    jpeg = overlay_jpeg or b""
    flags = (FLAG_CONFIDENCE if confidence is not None else 0) | (FLAG_OVERLAY if jpeg else 0)
    publish_ns = time.time_ns() if publish_ns is None else publish_ns
    latency_us = max(0, min((publish_ns - capture_ns) // 1000, 0xFFFFFFFF))
    header = HEADER.pack(MAGIC, WIRE_VERSION, HEADER.size, frame_id, capture_ns, publish_ns, latency_us,
                         min(int(infer_us), 0xFFFFFFFF), w, h, flags, num_classes, 0, _text(version),
                         _text(engine), _text(label_set), h * w, len(conf), len(jpeg), 0)
    return b"".join((topic.encode("ascii"), b"\0", header, np.ascontiguousarray(classes).tobytes(), conf, jpeg))


def _field(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def decode(buf: bytes | memoryview) -> Message:
    """Parse one message; raises WireError for anything malformed."""
    view = memoryview(buf)
    nul = bytes(view[:256]).find(b"\0")
    if nul < 0:
        raise WireError("no NUL after the topic in the first 256 bytes")
    start = nul + 1
    if len(view) < start + HEADER.size:
        raise WireError(f"message of {len(view)} bytes is shorter than its header")
    (magic, ver, hsize, fid, cap, pub, lat, inf, w, h, flags, k, _, version, engine, label_set,
     n_cls, n_conf, n_jpg, _) = HEADER.unpack_from(view, start)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if ver != WIRE_VERSION or hsize < HEADER.size:
        raise WireError(f"unsupported wire version {ver} (header {hsize} bytes)")
    off = start + hsize
    if n_cls != w * h or (flags & FLAG_CONFIDENCE and n_conf != w * h) or len(view) != off + n_cls + n_conf + n_jpg:
        raise WireError(f"payload sizes do not add up for a {w}x{h} map ({len(view)} bytes)")
    classes = np.frombuffer(view, np.uint8, n_cls, off).reshape(h, w)
    conf = None
    if flags & FLAG_CONFIDENCE:
        conf = np.frombuffer(view, np.uint8, n_conf, off + n_cls).reshape(h, w).astype(np.float32) / 255.0
    jpeg = bytes(view[off + n_cls + n_conf:]) if flags & FLAG_OVERLAY else None
    return Message(bytes(view[:nul]).decode("ascii", "replace"), fid, cap, pub, lat, inf, _field(version),
                   _field(engine), _field(label_set), k, classes, conf, jpeg)


def encode_overlay(image_rgb: np.ndarray, classes: np.ndarray, quality: int = 80, alpha: float = 0.5) -> bytes:
    """A JPEG of the class colours blended over the frame (standard JPEG: decoders return RGB)."""
    import cv2

    from mas3_edge.labels import overlay
    blended = overlay(image_rgb, classes, alpha)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(blended, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise WireError("JPEG encoding of the overlay failed")
    return buf.tobytes()
