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
from ..synth3d.looks import LOOKS as _LOOKS_3D  # names only: no renderer is imported here

DOMAINS = ("synthetic", "realistic", "night", "fog", "rain")
# The 3-D street scenes (mas3_edge.synth3d, rendered by Mitsuba 3) answer to the same render(): their
# names start with "r3d-". They are not in DOMAINS, which lists this module's own painted looks.


# ---- public API ------------------------------------------------------------------------------
def _check(domain: str, seed: int, size: tuple[int, int], label_shift: float) -> None:
    if domain not in DOMAINS and domain not in _LOOKS_3D:
        raise UserError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)} "
                        f"or a 3-D look ({', '.join(_LOOKS_3D)})")
    if domain in _LOOKS_3D and label_shift:
        raise UserError(f"the 3-D look {domain!r} has no label_shift; use 0")
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
    if domain in _LOOKS_3D:
        from .. import synth3d
        return synth3d.render(domain, int(seed), size)
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
