"""Cityscapes label space: 19 train ids, 255 = ignore, the official names and palette."""
from __future__ import annotations

import numpy as np

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


def colorize(labels: np.ndarray, palette=PALETTE) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) RGB uint8; ignore and unknown ids are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return lut[labels]


def overlay(image_rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour map over an RGB image of the same size."""
    colour = colorize(labels).astype(np.float32)
    return (image_rgb.astype(np.float32) * (1 - alpha) + colour * alpha).round().astype(np.uint8)
