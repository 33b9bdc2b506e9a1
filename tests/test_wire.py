"""docs/wire-format.md and docs/labels/ against the code: the header table read byte by byte from a
packed message, the label-set file against mas3_edge.labels, and the map-to-camera mapping."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import cv2
import numpy as np

from mas3_edge import labels
from mas3_edge.runtime import wire
from mas3_edge.runtime.camera import Camera

DOCS = Path(__file__).parents[1] / "docs"
_TYPES = {"uint8": "B", "uint16": "H", "uint32": "I", "uint64": "Q", "int64": "q"}
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+(?:\[\d+\])?)\s*\|\s*`?(\w+)`?\s*\|", re.M)


def _doc_header() -> list[tuple[int, int, str, str]]:
    """(offset, size, struct code, field) for every row of the header table."""
    rows = []
    for off, size, kind, name in _ROW.findall((DOCS / "wire-format.md").read_text()):
        char = re.fullmatch(r"char\[(\d+)\]", kind)
        rows.append((int(off), int(size), f"{char[1]}s" if char else _TYPES[kind], name))
    return rows


def test_the_documented_header_is_the_packed_one():
    doc = (DOCS / "wire-format.md").read_text()
    assert f"### Header ({wire.HEADER.size} bytes, `struct` format `{wire.HEADER.format}`)" in doc
    rows = _doc_header()
    assert [r[0] for r in rows] == [0] + list(np.cumsum([r[1] for r in rows[:-1]]))  # contiguous, no gaps
    assert rows[-1][0] + rows[-1][1] == wire.HEADER.size
    assert all(struct.calcsize("<" + code) == size for _, size, code, _ in rows)

    classes = np.full((8, 16), 3, np.uint8)
    buf = wire.encode("mas3/seg", 123456789012, 1_700_000_000_000_000_000, classes, version="v0007",
                      engine="tensorrt", label_set="cityscapes19", num_classes=19, infer_us=4321,
                      confidence=np.zeros((8, 16)), overlay_jpeg=b"\xff\xd8jpeg", publish_ns=1_700_000_000_005_000_000,
                      camera_id="front-left", source_size=(720, 1280), crop=(160, 40, 960, 480))
    h = buf.index(b"\0") + 1
    got = {name: struct.unpack_from("<" + code, buf, h + off)[0] for off, _, code, name in rows if name != "reserved"}
    got = {k: v.rstrip(b"\0") if isinstance(v, bytes) else v for k, v in got.items()}
    assert got == {
        "magic": b"M3SG", "wire_version": 2, "header_size": 160, "frame_id": 123456789012,
        "capture_ns": 1_700_000_000_000_000_000, "publish_ns": 1_700_000_000_005_000_000, "latency_us": 5000,
        "infer_us": 4321, "width": 16, "height": 8, "flags": 3, "num_classes": 19, "model_version": b"v0007",
        "engine": b"tensorrt", "label_set": b"cityscapes19", "class_bytes": 128, "conf_bytes": 128,
        "overlay_bytes": 6, "source_width": 1280, "source_height": 720, "crop_x": 160, "crop_y": 40,
        "crop_w": 960, "crop_h": 480, "camera_id": b"front-left"}
    reserved = [struct.unpack_from("<" + code, buf, h + off)[0] for off, _, code, name in rows if name == "reserved"]
    assert reserved == [0, 0, 0]
    assert len(buf) == h + got["header_size"] + got["class_bytes"] + got["conf_bytes"] + got["overlay_bytes"]


def test_the_label_set_file_is_what_labels_py_holds():
    path = DOCS / "labels" / f"{labels.LABEL_SET_ID}.json"
    assert path.read_text() == wire.label_set_json(), f"regenerate {path} (see wire.label_set_json)"
    doc = json.loads(path.read_text())
    assert (doc["label_set"], doc["num_classes"], doc["ignore_id"]) == (labels.LABEL_SET_ID, labels.NUM_CLASSES,
                                                                         labels.IGNORE)
    assert [c["id"] for c in doc["classes"]] == list(range(labels.NUM_CLASSES))
    assert tuple(c["name"] for c in doc["classes"]) == labels.CLASSES
    assert tuple(tuple(c["rgb"]) for c in doc["classes"]) == labels.PALETTE
    assert f"labels/{labels.LABEL_SET_ID}.json" in (DOCS / "wire-format.md").read_text()


def test_a_map_pixel_maps_back_to_its_camera_pixel(tmp_path):
    """A white square in a 4:3 camera frame, seen by a 2:1 model: the documented crop-box mapping finds
    it where it is; the version 1 advice (scale by camera_width / width) put it 80 px too high."""
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[200:240, 400:440] = 255  # centre (420, 220)
    (tmp_path / "f").mkdir()
    cv2.imwrite(str(tmp_path / "f" / "0.png"), frame)
    with Camera(str(tmp_path / "f"), (64, 128), fps=0) as cam:
        f = cam.read_latest(timeout=5)
    classes = (f.image[..., 0] > 127).astype(np.uint8)
    m = wire.decode(wire.encode("t", f.id, f.capture_ns, classes, camera_id=cam.id, source_size=f.source_size,
                                crop=f.crop))
    assert (m.source_width, m.source_height, m.crop, m.camera_id) == (640, 480, (0, 80, 640, 320), "f")
    rows, cols = np.nonzero(m.classes)
    x, y = m.to_source(cols.mean() + 0.5, rows.mean() + 0.5)
    assert abs(x - 420) < 3 and abs(y - 220) < 3
    old_y = (rows.mean() + 0.5) * 640 / m.width
    assert abs(old_y - 220) > 60
