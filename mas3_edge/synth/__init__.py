"""Procedural driving scenes in the Cityscapes label space, painted in five looks (domains).

A scene is laid out once from its seed as primitives (class, material, colour key, depth) drawn
far-to-near into an index map; every domain then paints that same map. So one seed gives the same
label map in every domain and the domains differ only in appearance. Colours vary per scene and per
object inside every class, so a model trained here must learn shape and context, not colour.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..data import track, write_png
from ..errors import UserError
from .layout import (BIKE, BUILDING, BUS, CAR, FENCE, LIGHT, MOTO, PERSON, POLE, RIDER, ROAD,  # noqa: F401
                     SIDEWALK, SIGN, SKY, TERRAIN, TRAIN, TRUCK, VEG, WALL, _layout)
from .paint import _paint

DOMAINS = ("synthetic", "realistic", "night", "fog", "rain")


# ---- public API ------------------------------------------------------------------------------
def _check(domain: str, seed: int, size: tuple[int, int], label_shift: float) -> None:
    if domain not in DOMAINS:
        raise UserError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if int(seed) < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    if len(size) != 2 or min(size) < 16 or max(size) > 4096:
        raise UserError(f"size must be (height, width) with sides in 16..4096, got {size}")
    if not 0.0 <= label_shift <= 1.0:
        raise UserError(f"label_shift must be in [0, 1], got {label_shift}")


def render(domain: str, seed: int, size: tuple[int, int] = (128, 256),
           label_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 (H, W, 3), train ids uint8 (H, W)). The label depends on seed,
    size and label_shift only, never on the domain."""
    _check(domain, seed, size, label_shift)
    size = (int(size[0]), int(size[1]))
    scene = _layout(int(seed), size, float(label_shift))
    classes = np.array([r[0] for r in scene.rows], np.uint8)
    look = np.random.default_rng([int(seed), DOMAINS.index(domain) + 1])
    return _paint(scene, domain, look), classes[scene.index]


def scene_seed(seed: int, i: int) -> int:
    """The seed of scene i of a stream; streams of different seeds do not overlap for i < 100003."""
    return int(seed) * 100003 + int(i)


def generate(domain: str, n: int, seed: int = 0, size: tuple[int, int] = (128, 256),
             label_shift: float = 0.0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """n scenes of one domain, deterministic in (domain, seed, size, label_shift)."""
    _check(domain, seed, size, label_shift)  # here, not lazily at the first scene
    return (render(domain, scene_seed(seed, i), size, label_shift) for i in range(int(n)))


def write_folder(out_dir: str | Path, domain: str, n: int, seed: int = 0,
                 size: tuple[int, int] = (128, 256), label_shift: float = 0.0,
                 labels: bool = True) -> Path:
    """Write n scenes as images/000000.png (+ labels/000000.png); each file appears atomically."""
    out = Path(out_dir)
    _check(domain, seed, size, label_shift)
    if n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    if labels:
        (out / "labels").mkdir(parents=True, exist_ok=True)
    stream = generate(domain, n, seed, size, label_shift)
    for i, (img, lbl) in enumerate(track(stream, n, f"synth {domain}")):
        write_png(out / "images" / f"{i:06d}.png", img)
        if labels:
            write_png(out / "labels" / f"{i:06d}.png", lbl)
    return out
