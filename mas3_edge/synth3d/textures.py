"""Procedural texture tiles (numpy, float32 in 0..1), made per scene from its look's generator.

Each tile repeats: the renderer scales its UVs so that one tile covers a fixed size in metres.
Colour tiles are multiplied by the prim's own colour, so objects of one material still differ.
"""
from __future__ import annotations

import cv2
import numpy as np

TILE = 64  # pixels per tile side
WINDOW_CELLS = 4  # a facade tile holds 4 x 4 windows (4 bays by 4 floors)
BAY, FLOOR = 3.0, 3.2  # metres per window cell


def _f32(values) -> np.ndarray:
    return np.asarray(values, np.float32)


def _smooth(rng: np.random.Generator, cell: int, n: int = TILE) -> np.ndarray:
    """Tileable value noise with features of about `cell` pixels, unit std."""
    k = max(1, n // cell)
    low = rng.standard_normal((k, k)).astype(np.float32)
    big = cv2.resize(np.tile(low, (3, 3)), (3 * n, 3 * n), interpolation=cv2.INTER_CUBIC)[n:2 * n, n:2 * n]
    return (big - big.mean()) / (big.std() + 1e-6)


def window_mask(rng: np.random.Generator) -> np.ndarray:
    """(TILE, TILE, 1): 1 inside the windows of a 4 x 4 cell facade tile, 0 on the wall."""
    c = TILE // WINDOW_CELLS
    fw, fh = rng.uniform(0.35, 0.7), rng.uniform(0.4, 0.65)
    cell = np.zeros((c, c), np.float32)
    x0, y0 = int(c * (1 - fw) / 2), int(c * (1 - fh) / 2)
    cell[y0:c - y0, x0:c - x0] = 1.0
    return np.tile(cell, (WINDOW_CELLS, WINDOW_CELLS))[..., None]


def window_light(rng: np.random.Generator, mask: np.ndarray, rgb: tuple[float, float, float]) -> np.ndarray:
    """(TILE, TILE, 3): the lit windows of `mask` (about a third of them, each its own brightness)."""
    lit = (rng.random((WINDOW_CELLS, WINDOW_CELLS)) < 0.35) * rng.uniform(0.4, 1.0, (WINDOW_CELLS, WINDOW_CELLS))
    per_cell = np.kron(lit, np.ones((TILE // WINDOW_CELLS,) * 2)).astype(np.float32)
    return mask * per_cell[..., None] * _f32(rgb)


def asphalt(rng: np.random.Generator) -> np.ndarray:
    """Grain, darker patches and a few repaired strips; grey, about 1 on average."""
    t = 1 + 0.25 * _smooth(rng, 2) + 0.2 * _smooth(rng, 16)
    for _ in range(int(rng.integers(1, 4))):
        x, w = rng.integers(0, TILE), int(rng.integers(3, 12))
        t[:, x:x + w] *= rng.uniform(0.6, 0.85)
    return np.repeat(np.clip(t, 0.2, 2.0)[..., None], 3, -1).astype(np.float32)


def paving(rng: np.random.Generator) -> np.ndarray:
    """Slabs or cobbles with dark joints, each stone its own shade."""
    n = int(rng.choice([4, 8]))
    c = TILE // n
    shade = np.kron(rng.uniform(0.75, 1.25, (n, n)), np.ones((c, c)))
    joints = np.ones((TILE, TILE))
    joints[::c, :], joints[:, ::c] = 0.35, 0.35
    t = shade * joints * (1 + 0.1 * _smooth(rng, 4))
    return np.repeat(t[..., None], 3, -1).astype(np.float32)


def brick(rng: np.random.Generator) -> np.ndarray:
    """Running-bond brick: 8 courses a tile, light mortar, brick-to-brick shade variation."""
    rows, per = 8, 4
    h, w = TILE // rows, TILE // per
    t = np.ones((TILE, TILE, 3), np.float32)
    for r in range(rows):
        shift = (w // 2) * (r % 2)
        for k in range(per + 1):
            x0 = k * w - shift
            t[r * h:(r + 1) * h, max(0, x0):max(0, x0 + w)] = rng.uniform(0.7, 1.2) * _f32(
                [1.0, rng.uniform(0.85, 1.0), rng.uniform(0.8, 1.0)])
        t[r * h, :] = 1.6  # mortar (brightened against the brick colour)
        for k in range(per + 1):
            x = k * w - shift
            if 0 <= x < TILE:
                t[r * h:(r + 1) * h, x] = 1.6
    return t * (1 + 0.08 * _smooth(rng, 4))[..., None]


def mottled(rng: np.random.Generator, amount: float = 0.35) -> np.ndarray:
    """Leaves or grass: blotches of light and shade, with a slight hue change."""
    t = 1 + amount * _smooth(rng, 8) + 0.5 * amount * _smooth(rng, 2)
    tint = 1 + 0.15 * _smooth(rng, 16)
    return np.clip(np.stack([t * tint, t, t / tint], -1), 0.1, 2.0).astype(np.float32)


def tiles_for(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The textured materials' tiles of one scene (worn palette)."""
    return {"road": asphalt(rng), "sidewalk": paving(rng), "building": brick(rng), "facade": brick(rng),
            "grass": mottled(rng), "terrain": mottled(rng, 0.5), "foliage": mottled(rng, 0.5),
            "hedge": mottled(rng, 0.4)}


# Metres covered by one tile of each textured material (the UV scale of the shape follows).
TILE_METRES = {"road": 4.0, "sidewalk": 2.0, "building": 2.5, "facade": 2.5, "grass": 3.0, "terrain": 6.0,
               "foliage": 2.0, "hedge": 2.0}
