"""The segmentation stream's wire format: one ZeroMQ frame per message (docs/wire-format.md).

    TOPIC (ASCII) 0x00 | HEADER (160 bytes, little-endian) | classes | [confidence] | [overlay JPEG]

One frame, not a multipart message, so a subscriber may use ZMQ_CONFLATE (which drops multipart
messages) to keep only the newest. The topic comes first so SUB prefix filtering works; the NUL
ends it so a parser finds the header without knowing the topic. The header is fixed-size and
carries its own size, so a reader can skip fields added later. Version 2 appended the source
frame's size, the crop box and the camera id to version 1's 112 bytes; `decode` reads both.
Class names and colours are not in the message: the header names the label set and its number of
classes; the serving version's model.json ("labels") and a labels file in the format of
docs/labels/cityscapes19.json (written by `label_set_json()`) hold them.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import numpy as np

from mas3_edge.labels import CITYSCAPES, PALETTE, LabelSet

MAGIC = b"M3SG"
WIRE_VERSION = 2
DEFAULT_TOPIC = "mas3/seg"
FLAG_CONFIDENCE, FLAG_OVERLAY = 1, 2
LABEL_SET_BYTES = 16  # the header's label_set field: a longer id cannot be sent
# magic, version, header size, frame id, capture ns, publish ns, latency us, infer us, width, height,
# flags, num classes, reserved, model version, engine, label set, class/conf/overlay byte counts, reserved
HEADER_V1 = struct.Struct("<4sHHQqqIIHHBBH16s16s16sIIII")
# appended in version 2: source width, height, crop x, y, w, h (source pixels), camera id, reserved
_V2_TAIL = struct.Struct("<HHHHHH32sI")
HEADER = struct.Struct(HEADER_V1.format + _V2_TAIL.format[1:])
assert (HEADER_V1.size, HEADER.size) == (112, 160)
_HEADER_SIZES = {1: HEADER_V1.size, 2: HEADER.size}


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
    wire_version: int = WIRE_VERSION
    camera_id: str = ""  # "" and zeros below: a version 1 message, which did not carry them
    source_width: int = 0
    source_height: int = 0
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # x, y, w, h in source pixels: what the maps cover

    @property
    def height(self) -> int:
        return int(self.classes.shape[0])

    @property
    def width(self) -> int:
        return int(self.classes.shape[1])

    def to_source(self, u: float, v: float) -> tuple[float, float]:
        """A point of the maps (u right, v down; pixel (i, j) spans [j, j+1) x [i, i+1)) in source pixels."""
        x, y, w, h = self.crop
        if not w or not h:
            raise WireError(f"a version {self.wire_version} message has no crop box")
        return x + u * w / self.width, y + v * h / self.height

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
           publish_ns: int | None = None, camera_id: str = "", source_size: tuple[int, int] | None = None,
           crop: tuple[int, int, int, int] | None = None) -> bytes:
    """Pack one message. `classes` uint8 (H, W); `confidence` float (H, W) in [0, 1]; `source_size` (H, W)
    of the camera frame and `crop` (x, y, w, h) in its pixels (default: the maps are the whole frame)."""
    if classes.dtype != np.uint8 or classes.ndim != 2:
        raise WireError(f"classes must be uint8 (H, W), got {classes.dtype} {classes.shape}")
    if len(label_set) > LABEL_SET_BYTES or not label_set.isascii():  # cut short, no reader could look it up
        raise WireError(f"label set id {label_set!r} is not ASCII of at most {LABEL_SET_BYTES} characters")
    h, w = classes.shape
    sh, sw = source_size or (h, w)
    cx, cy, cw, ch = crop or (0, 0, sw, sh)
    if not (0 < sw <= 0xFFFF and 0 < sh <= 0xFFFF and cw > 0 and ch > 0 and 0 <= cx <= sw - cw and 0 <= cy <= sh - ch):
        raise WireError(f"crop box {(cx, cy, cw, ch)} does not lie in a {sw}x{sh} source frame")
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
                         _text(engine), _text(label_set), h * w, len(conf), len(jpeg), 0,
                         sw, sh, cx, cy, cw, ch, _text(camera_id, 32), 0)
    return b"".join((topic.encode("ascii"), b"\0", header, np.ascontiguousarray(classes).tobytes(), conf, jpeg))


def _field(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def decode(buf: bytes | memoryview) -> Message:
    """Parse one message of wire version 1 or 2; raises WireError for anything malformed."""
    view = memoryview(buf)
    nul = bytes(view[:256]).find(b"\0")
    if nul < 0:
        raise WireError("no NUL after the topic in the first 256 bytes")
    start = nul + 1
    if len(view) < start + HEADER_V1.size:
        raise WireError(f"message of {len(view)} bytes is shorter than its header")
    (magic, ver, hsize, fid, cap, pub, lat, inf, w, h, flags, k, _, version, engine, label_set,
     n_cls, n_conf, n_jpg, _) = HEADER_V1.unpack_from(view, start)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r}")
    need = _HEADER_SIZES.get(ver)
    if need is None or hsize < need or len(view) < start + hsize:
        raise WireError(f"unsupported wire version {ver} (header {hsize} bytes, message {len(view)})")
    extra = {}
    if ver >= 2:
        sw, sh, cx, cy, cw, ch, camera_id, _ = _V2_TAIL.unpack_from(view, start + HEADER_V1.size)
        extra = dict(source_width=sw, source_height=sh, crop=(cx, cy, cw, ch), camera_id=_field(camera_id))
    off = start + hsize
    if n_cls != w * h or (flags & FLAG_CONFIDENCE and n_conf != w * h) or len(view) != off + n_cls + n_conf + n_jpg:
        raise WireError(f"payload sizes do not add up for a {w}x{h} map ({len(view)} bytes)")
    classes = np.frombuffer(view, np.uint8, n_cls, off).reshape(h, w)
    conf = None
    if flags & FLAG_CONFIDENCE:
        conf = np.frombuffer(view, np.uint8, n_conf, off + n_cls).reshape(h, w).astype(np.float32) / 255.0
    jpeg = bytes(view[off + n_cls + n_conf:]) if flags & FLAG_OVERLAY else None
    return Message(bytes(view[:nul]).decode("ascii", "replace"), fid, cap, pub, lat, inf, _field(version),
                   _field(engine), _field(label_set), k, classes, conf, jpeg, wire_version=ver, **extra)


def label_set_json(labels: LabelSet = CITYSCAPES) -> str:
    """A labels file, the readers' table of class names and RGB colours by class id (default
    docs/labels/cityscapes19.json). Rewrite that one with
        python -c "from mas3_edge.runtime import wire; print(wire.label_set_json(), end='')" \\
            > docs/labels/cityscapes19.json
    """
    return labels.to_json()


def encode_overlay(image_rgb: np.ndarray, classes: np.ndarray, quality: int = 80, alpha: float = 0.5,
                   palette=PALETTE) -> bytes:
    """A JPEG of the class colours (`palette`, the label set's) blended over the frame (standard
    JPEG: decoders return RGB)."""
    import cv2

    from mas3_edge.labels import overlay
    blended = overlay(image_rgb, classes, alpha, palette)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(blended, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise WireError("JPEG encoding of the overlay failed")
    return buf.tobytes()
