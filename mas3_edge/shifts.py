"""Shifts of another family than appearance: a camera change, applied to an image and its label alike.

The tuning targets of the quality tools change how a scene looks (light, weather, noise, blur). A
robot that gets a new camera sees the same world through other optics: another field of view,
mounting pitch, lens distortion and resolution. `camera_change` warps a labelled frame that way
(bilinear for the image, nearest for the label, so labels stay exact class ids), which makes a
report target no default was tuned on.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Camera:
    zoom: float = 1.35  # > 1: a narrower field of view (longer lens)
    k1: float = -0.25  # radial distortion of the new lens (< 0: barrel, as wide-angle lenses)
    pitch: float = -0.12  # vertical shift of the view, in image heights (< 0: tilted up, horizon lower)
    resolution: float = 0.5  # the new sensor's linear resolution relative to the model's input


def _maps(h: int, w: int, cam: Camera) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel, where it lies in the source frame (float maps for cv2.remap)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (x - w / 2) / (w / 2), (y - h / 2) / (w / 2)  # normalised, square pixels
    r2 = u * u + v * v
    d = 1 + cam.k1 * r2  # radial distortion of the new lens
    u, v = u * d / cam.zoom, v * d / cam.zoom + cam.pitch * h / (w / 2)
    return u * (w / 2) + w / 2, v * (w / 2) + h / 2


def camera_change(image: np.ndarray, label: np.ndarray | None, cam: Camera = Camera(),
                  ignore: int = 255) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) uint8 image and (H, W) label -> the same scene through `cam`, same size."""
    h, w = image.shape[:2]
    mx, my = _maps(h, w, cam)
    out = cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if cam.resolution < 1:  # a coarser sensor, shown at the model's input size
        small = (max(1, round(w * cam.resolution)), max(1, round(h * cam.resolution)))
        out = cv2.resize(cv2.resize(out, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
    if label is None:
        return out, None
    lbl = cv2.remap(label, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=ignore)
    return out, lbl
