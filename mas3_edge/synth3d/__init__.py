"""3-D street scenes in the Cityscapes label space, rendered by Mitsuba 3 on the CPU, in several looks.

A scene is laid out from its seed alone (layout.py: road, lanes, sidewalks, buildings, trees,
poles, signs, traffic lights, cars, trucks, buses, people, cyclists, in metres); a look
(looks.py) lights, dresses and films it. One seed is one world in every look: the looks that keep
the camera keep the labels exactly, and differ only in the image.

    from mas3_edge import synth3d
    image, label = synth3d.render("r3d-fog", seed=7, size=(128, 256))

`mas3_edge.synth.render` renders these looks too (their names start with "r3d-"), so every tool
that names a synthetic domain can name them. Mitsuba is an optional dependency (`pip install
mas3-edge[render3d]`); it is imported on the first render, not here.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from .layout import World, layout
from .looks import CAMERA_LOOKS, LOOKS, SOURCE, Look

DOMAINS = tuple(LOOKS)

__all__ = ["CAMERA_LOOKS", "DOMAINS", "LOOKS", "SOURCE", "Look", "World", "layout", "render"]


def render(domain: str, seed: int, size: tuple[int, int] = (128, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Scene `seed` in look `domain`: (RGB uint8 (H, W, 3), train ids uint8 (H, W)), deterministic."""
    if domain not in LOOKS:
        raise UserError(f"unknown 3-D look {domain!r}; choose one of {', '.join(LOOKS)}")
    if int(seed) < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    if len(size) != 2 or min(size) < 16 or max(size) > 4096:
        raise UserError(f"size must be (height, width) with sides in 16..4096, got {size}")
    try:
        from .scene import render as _render
        return _render(layout(int(seed)), LOOKS[domain], (int(size[0]), int(size[1])),
                       int(seed) * 16 + DOMAINS.index(domain))
    except ModuleNotFoundError as e:
        if e.name not in ("mitsuba", "drjit"):
            raise
        raise UserError("the 3-D looks need Mitsuba 3: pip install 'mas3-edge[render3d]' "
                        "(or pip install 'mitsuba>=3.9,<3.10')") from None
