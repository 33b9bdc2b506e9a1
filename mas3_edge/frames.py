"""Unlabeled frames for adaptation: a folder of images or a ROS bag -> (N, H, W, 3) uint8 at the model's size."""
from __future__ import annotations

from collections import deque
from pathlib import Path

import cv2
import numpy as np

from .bags import Bag, is_bag
from .data import list_images, read_image
from .errors import UserError


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    interp = cv2.INTER_AREA if image.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def load_frames(folder: Path, size: tuple[int, int], limit: int | None = None) -> np.ndarray:
    """The newest `limit` images of `folder` (sorted by name), read robustly and resized.

    Unreadable files are skipped (a buffer may hold a frame written during a crash); a folder
    with no readable image at all is an error. A ROS bag (mas3_edge.bags) is read the same way.
    """
    if is_bag(folder):
        return _bag_frames(str(folder), size, limit)
    paths = list_images(Path(folder))
    if limit:
        paths = paths[-limit:]
    frames = []
    for p in paths:
        try:
            frames.append(resize(read_image(p), size))
        except UserError:
            continue
    if not frames:
        raise UserError(f"no readable images in {folder}; point --buffer at a folder of frames")
    return np.stack(frames)


def _bag_frames(source: str, size: tuple[int, int], limit: int | None) -> np.ndarray:
    """The newest `limit` decodable frames of a bag's image topic (bad messages skipped)."""
    frames: deque[np.ndarray] = deque(maxlen=limit or None)
    why = None
    with Bag(source) as bag:
        for _, rgb, err in bag.frames():
            if rgb is None:
                why = why or err
            else:
                frames.append(resize(rgb, size))
    if not frames:
        raise UserError(f"no readable frame in {source}" + (f": {why}" if why else ""))
    return np.stack(frames)
