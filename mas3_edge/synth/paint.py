"""Appearance: every domain paints the same index map of a laid-out scene in its own look."""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .layout import _EMISSIVE, _GROUND, _HSV, _M, _TEX, _Scene

# Per domain: saturation scale, value offset, value scale, hue jitter. The textured domains are
# muted and darker than the flat source look, so colour statistics shift as well as texture.
_LOOK = {"synthetic": (1.0, 0.0, 1.0, 0.0), "realistic": (0.5, 0.06, 0.8, 0.03),
         "night": (0.35, 0.0, 0.2, 0.03), "fog": (0.4, 0.12, 0.75, 0.03),
         "rain": (0.4, 0.04, 0.6, 0.03)}


def _hsv2rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.stack([np.choose(i, [v, q, p, p, t, v]), np.choose(i, [t, v, v, q, p, p]),
                     np.choose(i, [p, p, t, v, v, q])], -1)


def _colours(rows: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) RGB in 0..1 per primitive: the material's range at the object's colour key."""
    mat, u = rows[:, 1].astype(int), rows[:, 2:5]
    h0, h1, s0, s1, v0, v1 = _HSV[mat].T
    s_scale, v_off, v_scale, jitter = _LOOK[domain]
    hue = (h0 + u[:, 0] * (h1 - h0) + rng.normal(0, jitter, len(u))) % 1.0
    sat, val = s0 + u[:, 1] * (s1 - s0), v0 + u[:, 2] * (v1 - v0)
    glow = _EMISSIVE[mat]
    if domain == "night":  # some windows are lit from inside
        lit = (mat == _M["window"]) & (u[:, 2] > 0.55)
        glow, hue, sat = glow | lit, np.where(lit, 0.1 + 0.04 * u[:, 0], hue), np.where(lit, .5, sat)
    sat = np.where(glow, sat, sat * s_scale)
    val = np.where(glow, val, (v_off + v_scale * val) * rows[:, 5])
    return _hsv2rgb(hue, sat, np.clip(val, 0, 1)).astype(np.float32)


@lru_cache(maxsize=4)
def _grain(h: int, w: int) -> np.ndarray:
    """A fixed tile of white noise twice the image size; random crops of it are cheap."""
    return np.random.default_rng(12345).standard_normal((2 * h, 2 * w, 3), np.float32)


def _crop(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = rng.integers(0, h), rng.integers(0, w)
    return _grain(h, w)[y:y + h, x:x + w]


def _noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth value noise with features of about `cell` pixels, unit variance."""
    low = rng.standard_normal((h // cell + 3, w // cell + 3), np.float32)
    big = cv2.resize(low, ((w // cell + 3) * cell, (h // cell + 3) * cell),
                     interpolation=cv2.INTER_CUBIC)
    return big[cell:cell + h, cell:cell + w]


@lru_cache(maxsize=4)
def _grids(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _depth(s: _Scene, rows: np.ndarray) -> np.ndarray:
    """Per-pixel distance in metres for haze: ground rows, wall columns, object distances."""
    yy, xx = _grids(s.h, s.w)
    mode, param = rows[:, 6].astype(int)[s.index], rows[:, 7].astype(np.float32)[s.index]
    ground = s.f * s.cam_h / np.maximum(yy - s.hz, 1e-3)
    wall = s.f * param / np.maximum(np.abs(xx - s.cx), 1e-3)
    d = np.choose(mode, [param, ground, wall, np.float32(1e3)])
    return np.clip(d, 0.5, 1e3).astype(np.float32)[..., None]


def _base(s: _Scene, rows: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Flat colours, sky gradient, cast shadows, fence mesh and (except synthetic) textures."""
    mat = rows[:, 1].astype(np.uint8)[s.index]
    img = _colours(rows, domain, rng)[s.index]
    yy, xx = _grids(s.h, s.w)
    top = max(int(s.hz), 1)
    lift = np.clip(yy[:top] / top, 0, 1)[..., None] ** 2  # sky is paler towards the horizon
    sky = img[:top]
    img[:top] = np.where((mat[:top] == _M["sky"])[..., None],
                         sky * (1 - 0.4 * lift) + 0.4 * lift * sky.max(-1, keepdims=True), sky)
    if s.shadows:
        shade = np.ones((s.h, s.w), np.float32)
        for x, y, rx, ry in s.shadows:
            cv2.ellipse(shade, ((float(x), float(y)), (max(2 * rx, 1), max(2 * ry, 1)), 0), .5, -1)
        img *= np.where(_GROUND[mat], cv2.GaussianBlur(shade, (0, 0), 1.0), 1)[..., None]
    fence = mat == _M["fence"]
    if fence.any():  # a see-through fence reads as a lattice
        img[fence & (((xx + yy) % 4 < 1) | ((xx - yy) % 4 < 1))] *= 0.55
    if domain != "synthetic":
        amp = _TEX[mat]
        tex = amp[..., 0] * _crop(rng, s.h, s.w)[..., 0] + amp[..., 1] * _noise(rng, s.h, s.w, 3) \
            + amp[..., 2] * _noise(rng, s.h, s.w, 12)
        img *= 1 + tex[..., None]
    return img


def _glare(s: _Scene, rows: np.ndarray, img: np.ndarray, gain: float) -> np.ndarray:
    """Bright blobs with halos around the visible lamps (head, tail, street and traffic)."""
    layer = np.zeros_like(img)
    cols = _colours(rows, "synthetic", np.random.default_rng(0))
    for pid, x, y, r, lamp in s.lights:
        xi, yi = int(x), int(y)
        if 0 <= xi < s.w and 0 <= yi < s.h and \
                (s.index[max(yi - 1, 0):yi + 2, max(xi - 1, 0):xi + 2] == pid).any():  # unoccluded
            cv2.circle(layer, (xi, yi), int(np.clip(r * 1.5, 1, 0.025 * s.w)), cols[lamp].tolist(), -1)
    return img + gain * (cv2.GaussianBlur(layer, (0, 0), 1.5) + 0.6 * cv2.GaussianBlur(layer, (0, 0), 6))


def _finish(s: _Scene, img: np.ndarray, rng: np.random.Generator, blur: float, noise: float,
            vignette: float = 0.0) -> np.ndarray:
    if vignette:
        yy, xx = _grids(s.h, s.w)
        img *= (1 - vignette * (0.6 * (xx / s.w * 2 - 1) ** 2 + 0.4 * (yy / s.h * 2 - 1) ** 2))[..., None]
    if blur:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    if noise:
        img += noise * _crop(rng, s.h, s.w)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _paint(s: _Scene, domain: str, rng: np.random.Generator) -> np.ndarray:
    rows = np.asarray(s.rows, np.float64)
    img = _base(s, rows, domain, rng)
    if domain == "synthetic":  # flat, saturated, clean edges
        return _finish(s, img, rng, 0, 0)
    yy, xx = _grids(s.h, s.w)
    if domain == "realistic":
        sun = 1 + rng.uniform(-0.3, 0.3) * (xx / s.w - 0.5)
        img *= sun[..., None] * rng.uniform(0.88, 1.12, 3).astype(np.float32)  # white balance
        t = np.exp(-_depth(s, rows) / rng.uniform(400, 1200))  # aerial perspective
        return _finish(s, img * t + 0.7 * (1 - t), rng, rng.uniform(0.5, 0.8), 0.015, 0.35)
    if domain == "night":  # the ego headlights light the near road
        beam = np.exp(-((xx - s.w / 2) / (0.3 * s.w)) ** 2 - ((s.h - yy) / (0.3 * s.h)) ** 2)
        img *= (1 + 3 * beam * (s.index != 0))[..., None] * np.array([0.75, 0.85, 1.2], dtype=np.float32)
        return _finish(s, _glare(s, rows, img, 1.2), rng, 0.6, 0.04, 0.4)
    if domain == "fog":  # Koschmieder: haze grows with distance towards the airlight
        t = 0.9 * np.exp(-_depth(s, rows) * 3 / rng.uniform(25, 100))
        air = rng.uniform(0.7, 0.9) * (1 + 0.05 * _noise(rng, s.h, s.w, 32))[..., None]
        img = img * t + air * np.array([0.97, 0.99, 1.02], dtype=np.float32) * (1 - t)
        return _finish(s, img, rng, rng.uniform(0.7, 1.2), 0.012)
    return _rain(s, rows, img, rng)


def _rain(s: _Scene, rows: np.ndarray, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Wet reflections, lamps' glare, streaks and lens droplets over a dark, muted scene."""
    mat = rows[:, 1].astype(np.uint8)[s.index]
    src = np.clip(2 * int(np.clip(s.hz, 1, s.h - 1)) - np.arange(s.h), 0, s.h - 1)
    refl = cv2.GaussianBlur(img[src], (0, 0), sigmaX=0.1, sigmaY=3)  # mirrored about the horizon
    wet = np.isin(mat, [_M["road"], _M["marking"], _M["sidewalk"]])[..., None]
    img = np.where(wet, img * 0.6 + refl * rng.uniform(0.3, 0.5), img)
    img = _glare(s, rows, img, 0.5)
    n = max(3, int(s.h * rng.uniform(0.05, 0.12)))
    k, tilt = np.zeros((n, n), np.float32), rng.normal(0, 0.25)
    cv2.line(k, (int(n / 2 * (1 - tilt)), 0), (int(n / 2 * (1 + tilt)), n - 1), 1.0, 1)
    drops = (rng.random((s.h, s.w), np.float32) < rng.uniform(0.004, 0.012)).astype(np.float32)
    img += 0.5 * cv2.filter2D(drops, -1, k * (3 / k.sum()))[..., None]  # motion-blurred streaks
    lens = np.zeros((s.h, s.w), np.uint8)
    for _ in range(int(rng.integers(2, 9))):
        cv2.circle(lens, (int(rng.integers(s.w)), int(rng.integers(s.h))),
                   int(rng.uniform(0.02, 0.07) * s.w), 1, -1)
    img = np.where(lens[..., None] > 0, cv2.GaussianBlur(img, (0, 0), 3) * 1.1, img)
    return _finish(s, img, rng, rng.uniform(0.7, 1.1), 0.025, 0.3)
