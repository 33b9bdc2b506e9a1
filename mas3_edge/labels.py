"""Label sets: class names, colours and the ignore id of a model's outputs.

Cityscapes-19 (19 train ids, 255 = ignore, the official names and palette) is the default. Any other
set of 2 to 255 classes comes from a labels file, the format of docs/labels/cityscapes19.json:

    {"label_set": "warehouse4", "ignore_id": 255,
     "classes": [{"id": 0, "name": "floor", "rgb": [128, 64, 128]}, ...]}

A LabelSet is stored in every version's model.json and travels with it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from .errors import UserError

IGNORE = 255
CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
NUM_CLASSES = len(CLASSES)
PALETTE: tuple[tuple[int, int, int], ...] = (  # RGB, the Cityscapes colours
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
LABEL_SET_ID = "cityscapes19"
# The classes a benchmark scores. The usual SYNTHIA benchmarks score 16 classes (no terrain, truck,
# train) or 13 (also no wall, fence, pole); their mIoU is the mean over those classes only.
SUBSETS: dict[str, tuple[int, ...]] = {
    "cityscapes19": tuple(range(NUM_CLASSES)),
    "synthia16": tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16)),
    "synthia13": tuple(c for c in range(NUM_CLASSES) if c not in (3, 4, 5, 9, 14, 16)),
}


@dataclass(frozen=True)
class LabelSet:
    """What a model's class ids mean: names and RGB colours by id, and the id labels use for "ignore"."""

    id: str
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore: int = IGNORE

    def __post_init__(self) -> None:
        k = len(self.names)
        if not 2 <= k <= 255:
            raise UserError(f"label set {self.id!r} has {k} classes; a label set has 2 to 255")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,16}", self.id or ""):  # the wire header holds 16 bytes
            raise UserError(f"label set id {self.id!r} must be 1-16 letters, digits, '.', '_' or '-'")
        if len(self.palette) != k or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.palette):
            raise UserError(f"label set {self.id!r}: every class needs an RGB colour of three values 0..255")
        if len(set(self.names)) != k or not all(isinstance(n, str) and n for n in self.names):
            raise UserError(f"label set {self.id!r}: class names must be distinct, non-empty strings")
        if not k <= self.ignore <= 255:
            raise UserError(f"label set {self.id!r}: ignore id {self.ignore} must be in {k}..255 (not a class id)")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        """The labels-file form (docs/labels/cityscapes19.json)."""
        return {"label_set": self.id, "num_classes": self.num_classes, "ignore_id": self.ignore,
                "classes": [{"id": i, "name": n, "rgb": list(c)} for i, (n, c) in enumerate(zip(self.names, self.palette))]}

    @classmethod
    def from_dict(cls, d: dict, where: str = "labels") -> LabelSet:
        try:
            rows = sorted(d["classes"], key=lambda r: r["id"])
            if [r["id"] for r in rows] != list(range(len(rows))):
                raise UserError(f"{where}: class ids must be 0..K-1, each once")
            if "num_classes" in d and d["num_classes"] != len(rows):
                raise UserError(f"{where}: num_classes {d['num_classes']} but {len(rows)} classes listed")
            palette = tuple(tuple(int(v) for v in r["rgb"]) for r in rows)  # __post_init__ checks: 3 values each
            return cls(str(d["label_set"]), tuple(r["name"] for r in rows),
                       cast("tuple[tuple[int, int, int], ...]", palette), int(d.get("ignore_id", IGNORE)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: not a labels file ({type(e).__name__}: {e}); "
                            "see docs/labels/cityscapes19.json for the format") from None

    def to_json(self) -> str:
        rows = ",\n".join(f'    {{"id": {i}, "name": {json.dumps(n)}, "rgb": {list(c)}}}'
                          for i, (n, c) in enumerate(zip(self.names, self.palette)))
        return (f'{{\n  "label_set": {json.dumps(self.id)},\n  "num_classes": {self.num_classes},\n'
                f'  "ignore_id": {self.ignore},\n  "classes": [\n{rows}\n  ]\n}}\n')


def load_labels(path: Path | str | None) -> LabelSet:
    """The label set of a labels file; Cityscapes-19 when `path` is None."""
    if path is None:
        return CITYSCAPES
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read labels file {path}: {e}") from None
    return LabelSet.from_dict(d, str(path))


CITYSCAPES = LabelSet(LABEL_SET_ID, CLASSES, PALETTE)


def colorize(labels: np.ndarray, palette=PALETTE) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) RGB uint8; ignore and unknown ids are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    if labels.dtype != np.uint8:  # ids past 255 must stay black, not wrap round
        return lut[np.where((labels >= 0) & (labels < 256), labels, IGNORE)]
    import cv2  # OpenCV's table lookup: 5-10x numpy's indexing, and the service colours every frame
    return cv2.LUT(cv2.merge([labels] * 3), lut[:, None])


def overlay(image_rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5, palette=PALETTE) -> np.ndarray:
    """Blend the colour map over an RGB uint8 image of the same size (rounded to nearest, in one
    saturating pass: a tenth of the time of blending in float at 512x1024)."""
    import cv2
    return cv2.addWeighted(np.ascontiguousarray(image_rgb, np.uint8), 1 - alpha, colorize(labels, palette), alpha, 0.0)
