"""Scene layout: a perspective road scene as primitives (class, material, colour key, depth)
rasterised far-to-near into an index map, from a seed alone (no appearance here)."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import cv2
import numpy as np

from ..labels import IGNORE

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY, PERSON, RIDER, CAR,
 TRUCK, BUS, TRAIN, MOTO, BIKE) = range(19)

# Material -> (hue0, hue1, sat0, sat1, val0, val1) of the source look, and texture amplitudes
# (fine, medium, coarse) used by the textured domains. Hue ranges are wide on purpose and overlap
# between classes: a car may be any hue, a building any colour, the road any grey.
_MAT = {
    "sky": ((0.52, 0.66, 0.10, 0.70, 0.70, 1.00), (0.00, 0.02, 0.08)),
    "road": ((0.00, 1.00, 0.00, 0.22, 0.20, 0.55), (0.10, 0.05, 0.06)),
    "marking": ((0.11, 0.16, 0.00, 0.80, 0.78, 1.00), (0.08, 0.05, 0.03)),
    "sidewalk": ((0.00, 1.00, 0.03, 0.50, 0.40, 0.85), (0.06, 0.06, 0.05)),
    "terrain": ((0.06, 0.36, 0.20, 0.80, 0.30, 0.80), (0.14, 0.10, 0.08)),
    "building": ((0.00, 1.00, 0.05, 0.70, 0.30, 0.90), (0.04, 0.05, 0.08)),
    "window": ((0.50, 0.70, 0.05, 0.50, 0.08, 0.45), (0.02, 0.04, 0.04)),
    "wall": ((0.00, 1.00, 0.03, 0.45, 0.35, 0.85), (0.07, 0.08, 0.05)),
    "fence": ((0.00, 1.00, 0.05, 0.60, 0.30, 0.80), (0.05, 0.04, 0.03)),
    "metal": ((0.00, 1.00, 0.00, 0.35, 0.20, 0.75), (0.03, 0.02, 0.02)),
    "sign": ((0.00, 1.00, 0.55, 1.00, 0.55, 1.00), (0.02, 0.02, 0.02)),
    "foliage": ((0.10, 0.42, 0.30, 0.90, 0.18, 0.70), (0.18, 0.14, 0.08)),
    "trunk": ((0.04, 0.11, 0.25, 0.70, 0.15, 0.45), (0.10, 0.06, 0.03)),
    "cloth": ((0.00, 1.00, 0.00, 1.00, 0.08, 0.95), (0.04, 0.04, 0.02)),
    "skin": ((0.02, 0.10, 0.20, 0.60, 0.30, 0.95), (0.02, 0.02, 0.02)),
    "body": ((0.00, 1.00, 0.00, 1.00, 0.12, 0.95), (0.02, 0.02, 0.04)),
    "glass": ((0.52, 0.65, 0.05, 0.40, 0.06, 0.40), (0.02, 0.03, 0.05)),
    "tyre": ((0.00, 1.00, 0.00, 0.10, 0.03, 0.14), (0.04, 0.02, 0.02)),
    "lamp_red": ((0.98, 1.01, 0.75, 1.00, 0.80, 1.00), (0.0, 0.0, 0.0)),
    "lamp_white": ((0.10, 0.16, 0.00, 0.30, 0.90, 1.00), (0.0, 0.0, 0.0)),
    "lamp_green": ((0.36, 0.45, 0.60, 1.00, 0.80, 1.00), (0.0, 0.0, 0.0)),
    "lamp_amber": ((0.08, 0.12, 0.80, 1.00, 0.85, 1.00), (0.0, 0.0, 0.0)),
}
_MNAMES = tuple(_MAT)
_M = {n: i for i, n in enumerate(_MNAMES)}
_HSV = np.array([v[0] for v in _MAT.values()], np.float32)
_TEX = np.array([v[1] for v in _MAT.values()], np.float32)
_EMISSIVE = np.array([n.startswith("lamp") for n in _MNAMES])
_GROUND = np.isin(np.arange(len(_MNAMES)), [_M[n] for n in ("road", "marking", "sidewalk", "terrain")])
_CONST, _PLANE, _FACADE, _FAR = 0, 1, 2, 3  # depth modes: object distance, ground row, wall, sky


class _Scene:
    """Camera + primitives rasterised into an index map (index 0 is the sky)."""

    def __init__(self, size: tuple[int, int], rng: np.random.Generator, shift: float):
        self.h, self.w = size
        self.rng = rng
        self.f = self.w * rng.uniform(0.55, 0.75)
        self.cx = self.w / 2 + rng.normal(0, 0.03 * self.w)
        # Camera pitch moves the horizon; label_shift tilts it down (more road, less sky).
        self.hz = self.h * (0.42 + rng.normal(0, 0.03) - 0.12 * shift)
        self.cam_h = rng.uniform(1.3, 1.9)
        self.curve = rng.normal(0, 0.0012)
        self.znear = 0.8 * self.f * self.cam_h / (self.h - self.hz)  # ground seen at the bottom row
        self.index = np.zeros((self.h, self.w), np.int32)
        self.rows: list[tuple] = []   # class, material, u0, u1, u2, shade, depth mode, depth param
        self.lights: list[tuple] = []  # primitive id, x px, y px, radius px, material
        self.shadows: list[tuple] = []  # x px, y px, rx px, ry px
        self.add(SKY, "sky", mode=_FAR)

    def add(self, cls: int, mat: str, z: float = 1e3, u=None, shade: float = 1.0,
            mode: int = _CONST) -> int:
        u = self.rng.random(3) if u is None else u
        self.rows.append((cls, _M[mat], u[0], u[1], u[2], shade, mode, z))
        return len(self.rows) - 1

    def pt(self, x: float, y: float, z: float) -> tuple[float, float]:
        """World (x right of the road axis, y up, z ahead) -> pixel; the road bends as curve*z^2."""
        z = max(z, 0.5)
        return self.cx + self.f * (x + self.curve * z * z) / z, self.hz + self.f * (self.cam_h - y) / z

    def proj(self, x, y, z: np.ndarray) -> np.ndarray:
        """pt() for arrays (x, y broadcast against z); returns (..., 2)."""
        z = np.maximum(z, 0.5)
        out = np.empty(z.shape + (2,))
        out[..., 0] = self.cx + self.f * (x + self.curve * z * z) / z
        out[..., 1] = self.hz + self.f * (self.cam_h - y) / z
        return out

    def fill(self, pid: int, pts) -> None:
        lim = 8 * self.w  # cv2 draws in 28.4 fixed point; callers keep vertices near the view
        p = np.clip(np.asarray(pts, np.float64), -lim, lim)
        cv2.fillPoly(self.index, [np.rint(p * 16).astype(np.int32)], pid, cv2.LINE_8, 4)

    def flat(self, pid: int, xs, ys, z: float) -> None:
        """A polygon in the plane facing the camera at distance z."""
        self.fill(pid, [self.pt(x, y, z) for x, y in zip(xs, ys, strict=True)])

    def rect(self, pid: int, x0: float, x1: float, y0: float, y1: float, z: float) -> None:
        self.flat(pid, (x0, x1, x1, x0), (y0, y0, y1, y1), z)

    def ground(self, pid: int, x0: float, x1: float, z0: float, z1: float, y: float = 0.0) -> None:
        """A strip parallel to the ground, sampled along z so that curved edges stay smooth."""
        z = _zs(max(z0, self.znear if y < self.cam_h else 0.6), z1, 12)
        self.fill(pid, self.proj(x0 + (x1 - x0) * _SEL[12], y, np.concatenate((z, z[::-1]))))

    def facade(self, pid: int, x: float, z0: float, z1: float, y0: float, y1: float, n=6) -> None:
        """A wall parallel to the road at lateral position x, from z0 to z1."""
        z0 = max(z0, self.f * abs(x) / (2 * self.w), 0.6)  # nearer than this it is off-screen
        if z1 > z0:
            z = _zs(z0, z1, n)
            self.fill(pid, self.proj(x, y0 + (y1 - y0) * _SEL[n], np.concatenate((z, z[::-1]))))

    def quads(self, pid: int, x: float, z0, z1, y0, y1) -> None:
        """Many small rectangles on the wall plane x (windows) in one call."""
        pts = self.proj(x, np.stack([y0, y0, y1, y1], -1), np.stack([z0, z1, z1, z0], -1))
        pts = np.rint(np.clip(pts, -8 * self.w, 8 * self.w) * 16).astype(np.int32)
        cv2.fillPoly(self.index, list(pts), pid, cv2.LINE_8, 4)

    def blob(self, pid: int, x: float, y: float, z: float, rx: float, ry: float) -> None:
        (u, v), s = self.pt(x, y, z), self.f / max(z, 0.5)
        cv2.ellipse(self.index, ((u, v), (max(2 * rx * s, 1), max(2 * ry * s, 1)), 0), pid, -1)

    def limb(self, pid: int, pts, z: float, width: float) -> None:
        p = np.rint(np.array([self.pt(x, y, z) for x, y in pts]) * 16).astype(np.int32)
        th = max(1, int(round(width * self.f / z)))
        cv2.polylines(self.index, [p], False, pid, th, cv2.LINE_8, 4)

    def px(self, z: float) -> float:
        return self.f / z


# ---- objects: each draws itself at distance z; callers sort them far-to-near ------------------
_T = {n: np.linspace(0, 1, n) for n in (2, 6, 12)}
_SEL = {n: np.repeat([0.0, 1.0], n) for n in (2, 6, 12)}  # first / second edge of a strip


def _zs(z0: float, z1: float, n: int) -> np.ndarray:
    return z0 * (z1 / z0) ** _T[n]  # geometric steps are even steps in the image


def _car(s: _Scene, x: float, z: float, kind: int, oncoming: bool) -> None:
    """A box seen from behind (or the front when oncoming): back face, visible side, roof."""
    w, ln, h, cab = {CAR: (1.8, 4.3, 1.5, 0.45), TRUCK: (2.5, 8.0, 3.4, 0.0),
                    BUS: (2.6, 12.0, 3.2, 0.0), TRAIN: (2.7, 30.0, 3.5, 0.0)}[kind]
    w, ln, h = w * s.rng.uniform(0.9, 1.1), ln * s.rng.uniform(0.9, 1.15), h * s.rng.uniform(0.9, 1.1)
    u, side = s.rng.random(3), (x - w / 2 if x > 0 else x + w / 2)
    low = h * (1 - cab)
    s.shadows.append((*s.pt(x, 0, z + 0.3), w * s.px(z) * 0.65, w * s.px(z) * 0.18))
    s.facade(s.add(kind, "body", z, u, 0.72), side, z, z + ln, 0.25, low, n=2)
    if low < s.cam_h:
        s.ground(s.add(kind, "body", z, u, 1.12), x - w / 2, x + w / 2, z, z + ln, low)
    glass = s.add(kind, "glass", z, shade=0.8)
    for dz in (0.8, ln - 1.0):  # wheels on the visible side
        s.blob(s.add(kind, "tyre", z), side, 0.35, z + dz, 0.05, 0.35)
    if cab:  # passenger car: a narrower cabin on the lower body
        zc, zc1, xs = z + ln * 0.25, z + ln * 0.75, x + np.array([-.42, .42, .36, -.36]) * w
        s.facade(s.add(kind, "body", z, u, 0.72), side * 0.93 + x * 0.07, zc, zc1, low, h, n=2)
        s.facade(glass, side * 0.9 + x * 0.1, zc + 0.3, zc1 - 0.2, low + 0.1, h - 0.1, n=2)
        s.ground(s.add(kind, "body", z, u, 1.1), x - w * 0.4, x + w * 0.4, zc, zc1, h)
        s.flat(s.add(kind, "body", z, u), xs, (low, low, h, h), zc)
        s.flat(glass, x + (xs - x) * 0.9, (low + .08, low + .08, h - .06, h - .06), zc)
    else:  # side windows of buses, trams and truck cabs
        s.facade(glass, side, z + 0.8, z + (ln - 0.8 if kind != TRUCK else 2.2), h * .55, h * .85, 2)
    s.rect(s.add(kind, "body", z, u), x - w / 2, x + w / 2, 0.25, low, z)
    if not cab and (oncoming or kind != TRUCK):
        s.rect(glass, x - w * 0.42, x + w * 0.42, h * 0.5, h * 0.9, z)
    for dx in (-w / 2 + 0.05, w / 2 - 0.45):
        s.rect(s.add(kind, "tyre", z), x + dx, x + dx + 0.4, 0.0, 0.3, z)
        lamp = s.add(kind, "lamp_white" if oncoming else "lamp_red", z)
        s.rect(lamp, x + dx, x + dx + 0.4, low * 0.3 + .25, low * 0.3 + .42, z)
        s.lights.append((lamp, *s.pt(x + dx + 0.2, low * 0.3 + .33, z), 0.25 * s.px(z), lamp))


def _person(s: _Scene, x: float, z: float) -> None:
    k, st = s.rng.uniform(0.85, 1.1), s.rng.uniform(-0.25, 0.25)  # height factor, stride
    top, legs, skin = s.add(PERSON, "cloth", z), s.add(PERSON, "cloth", z), s.add(PERSON, "skin", z)
    s.shadows.append((*s.pt(x, 0, z), 0.4 * s.px(z), 0.1 * s.px(z)))
    s.limb(legs, [(x - 0.1 - st, 0.05), (x - 0.08, 0.9 * k)], z, 0.15)
    s.limb(legs, [(x + 0.1 + st, 0.05), (x + 0.08, 0.9 * k)], z, 0.15)
    s.limb(top, [(x - 0.2, 1.42 * k), (x - 0.27, 0.85 * k)], z, 0.11)
    s.limb(top, [(x + 0.2, 1.42 * k), (x + 0.27 + st * 0.3, 0.85 * k)], z, 0.11)
    s.flat(top, (x - .17, x + .17, x + .21, x - .21), (.85 * k, .85 * k, 1.47 * k, 1.47 * k), z)
    s.blob(skin, x, 1.62 * k, z, 0.1, 0.125)


def _cycle(s: _Scene, x: float, z: float, kind: int, ridden: bool) -> None:
    """A bicycle or motorcycle seen from the side, with its rider when ridden."""
    d, r = (1 if s.rng.random() < 0.5 else -1), (0.34 if kind == BIKE else 0.31)
    frame, tyre = s.add(kind, "body" if kind == MOTO else "metal", z), s.add(kind, "tyre", z)
    hub = [(x - d * 0.55, r), (x + d * 0.55, r)]
    if ridden:  # the rider sits behind the near-side frame: draw it first
        body, skin = s.add(RIDER, "cloth", z), s.add(RIDER, "skin", z)
        s.limb(body, [(x - d * 0.15, 0.95), (x + d * 0.1, 0.62), (x + d * 0.02, 0.38)], z, 0.14)
        s.limb(body, [(x - d * 0.18, 0.95), (x + d * 0.02, 1.48), (x + d * 0.38, 1.02)], z, 0.16)
        s.blob(skin, x + d * 0.08, 1.66, z, 0.11, 0.12)
    a = np.linspace(0, 2 * np.pi, 14)
    for hx, hy in hub:
        if kind == MOTO:
            s.blob(tyre, hx, hy, z, r, r)
        else:
            s.limb(tyre, list(zip(hx + r * np.cos(a), hy + r * np.sin(a), strict=True)), z, 0.06)
    if kind == MOTO:
        s.flat(frame, (x - d * .6, x + d * .45, x + d * .35, x - d * .45), (.5, .45, .95, .9), z)
        lamp = s.add(kind, "lamp_white", z)
        s.blob(lamp, x + d * 0.5, 0.9, z, 0.07, 0.07)
        s.lights.append((lamp, *s.pt(x + d * 0.5, 0.9, z), 0.15 * s.px(z), lamp))
    else:
        s.limb(frame, [hub[0], (x, 0.38), (x - d * 0.15, 0.95), hub[0]], z, 0.05)
        s.limb(frame, [(x, 0.38), (x + d * 0.42, 0.95), hub[1]], z, 0.05)
        s.limb(frame, [(x - d * 0.15, 0.95), (x + d * 0.4, 0.9)], z, 0.05)


def _pole_thing(s: _Scene, x: float, z: float, kind: str, side: int) -> None:
    """A pole with a sign, a traffic light or a street lamp; side points away from the road."""
    pole = s.add(POLE, "metal", z)
    top = {"sign": 2.6, "light": 3.6, "lamp": 8.0, "pole": 5.0}[kind] * s.rng.uniform(0.85, 1.15)
    s.rect(pole, x - 0.08, x + 0.08, 0, top, z)
    if kind == "sign":
        face, shape = s.add(SIGN, "sign" if s.rng.random() < 0.8 else "metal", z), s.rng.integers(3)
        if shape == 0:
            s.blob(face, x, top, z, 0.32, 0.32)
        elif shape == 1:  # warning triangle
            s.flat(face, (x - .38, x + .38, x), (top - .3, top - .3, top + .36), z)
        else:  # direction board
            s.rect(face, x - s.rng.uniform(0.3, 0.9), x + 0.3, top - 0.3, top + 0.3, z)
    elif kind == "light":
        x1 = x - side * s.rng.uniform(1, 5) if s.rng.random() < 0.4 else x  # arm over the road
        s.limb(pole, [(x, top - 0.1), (x1, top - 0.1)], z, 0.1)
        s.rect(s.add(LIGHT, "metal", z, shade=0.4), x1 - 0.17, x1 + 0.17, top - 0.9, top, z)
        state = int(s.rng.integers(3))
        lamp = s.add(LIGHT, ("lamp_red", "lamp_amber", "lamp_green")[state], z)
        s.blob(lamp, x1, top - 0.17 - 0.28 * state, z, 0.1, 0.1)
        s.lights.append((lamp, *s.pt(x1, top - 0.17 - 0.28 * state, z), 0.12 * s.px(z), lamp))
    elif kind == "lamp":
        x1 = x - side * 1.6
        s.limb(pole, [(x, top), (x1, top + 0.2)], z, 0.1)
        head = s.add(POLE, "lamp_white", z)
        s.blob(head, x1, top + 0.1, z, 0.35, 0.1)
        s.lights.append((head, *s.pt(x1, top, z), 0.5 * s.px(z), head))


def _tree(s: _Scene, x: float, z: float, size: float = 1.0) -> None:
    trunk_h, crown = s.rng.uniform(1.8, 3.2) * size, s.rng.uniform(1.4, 2.6) * size
    s.rect(s.add(VEG, "trunk", z), x - 0.15 * size, x + 0.15 * size, 0, trunk_h + crown * .5, z)
    u = s.rng.random(3)
    for _ in range(int(s.rng.integers(3, 7))):  # overlapping crowns, each with its own shade
        pid = s.add(VEG, "foliage", z, u, s.rng.uniform(0.75, 1.15))
        s.blob(pid, x + s.rng.normal(0, crown * 0.45), trunk_h + crown * s.rng.uniform(0.6, 1.3),
               z, crown * s.rng.uniform(0.5, 0.8), crown * s.rng.uniform(0.45, 0.7))


def _building(s: _Scene, xb: float, z0: float, z1: float, side: int, open_front: bool) -> None:
    hgt, u, lit = s.rng.uniform(5, 28), s.rng.random(3), s.rng.random()
    shade = 0.9 + 0.1 * side  # one side of the street is in the sun
    s.facade(s.add(BUILDING, "building", abs(xb), u, shade, _FACADE), xb, z0, z1, 0, hgt)
    if open_front:  # the end wall facing the camera shows after a gap
        s.rect(s.add(BUILDING, "building", z0, u, 1.05), xb, xb + side * 12, 0, hgt, z0)
    win = s.add(BUILDING, "window", abs(xb), (s.rng.random(), s.rng.random(), lit), shade, _FACADE)
    fl, step, ww = s.rng.uniform(2.8, 3.8), s.rng.uniform(2.2, 4.0), s.rng.uniform(0.8, 1.6)
    zz = np.arange(max(z0, s.f * abs(xb) / (2 * s.w)) + step / 2, z1 - ww, step)
    zz = zz[s.f * ww / zz >= 1.0]  # windows under a pixel wide are left to the wall colour
    yy = np.arange(fl * 0.9 if s.rng.random() < 0.6 else 0.6, hgt - 1.6, fl)
    if len(zz) and len(yy):
        zg, yg = (a.ravel() for a in np.meshgrid(zz, yy))
        s.quads(win, xb, zg, zg + ww, yg, yg + min(fl * 0.55, 1.8))


def _skyline(s: _Scene, z: float) -> None:
    """Far buildings and tree lines closing the view."""
    x, end = -1.4 * z * s.w / s.f, 1.4 * z * s.w / s.f
    while x < end:
        wd = s.rng.uniform(0.05, 0.2) * z
        if s.rng.random() < 0.25:
            ry = s.rng.uniform(.03, .09) * z
            s.blob(s.add(VEG, "foliage", z), x + wd / 2, ry * 0.8, z, wd * 0.6, ry)
        else:
            s.rect(s.add(BUILDING, "building", z, shade=0.9), x, x + wd, 0,
                   s.rng.uniform(0.02, 0.18) * z, z)
        x += wd


Draw = tuple[float, Callable[[], None]]  # (depth, what paints the object): painted far to near


def _layout(seed: int, size: tuple[int, int], shift: float) -> _Scene:
    """The scene's geometry; every random draw here comes from the seed alone."""
    s = _Scene(size, np.random.default_rng(seed), shift)
    rng = s.rng
    lanes = int(rng.integers(2, 5)) + int(round(2 * shift))  # label_shift: wider roads
    lw = rng.uniform(2.8, 3.6) + shift * 0.5
    ego = lanes - 1 - int(rng.integers(0, max(1, lanes // 2)))
    oncoming = lanes // 2 if rng.random() < 0.7 else 0  # 0: a one-way street
    park = [rng.random() < 0.5, rng.random() < 0.5]  # parking strips at the left / right curb
    left = -(ego + 0.5) * lw - 2.2 * park[0]
    right = (lanes - ego - 0.5) * lw + 2.2 * park[1]
    road = (left + 2.2 * park[0], left + 2.2 * park[0] + lanes * lw)  # the driving lanes
    s.ground(s.add(TERRAIN, "terrain", mode=_PLANE), -500, 500, 0.6, 300)
    s.ground(s.add(ROAD, "road", mode=_PLANE), left, right, 0.6, 300)
    _markings(s, lanes, lw, road[0], oncoming)
    objs: list[Draw] = [(300, lambda: _skyline(s, rng.uniform(120, 220)))]
    crossing = rng.uniform(15, 45) if rng.random() < 0.35 + 0.3 * shift else None
    for side, edge in ((-1, left), (1, right)):
        objs += _side(s, side, edge, shift, crossing)
    objs += _traffic(s, lanes, lw, road, park, ego, oncoming, shift, crossing)
    for _, draw in sorted(objs, key=lambda o: -o[0]):  # painter's order: far first
        draw()
    if rng.random() < 0.12:  # the ego vehicle's bonnet, ignored as in Cityscapes
        cv2.ellipse(s.index, ((s.w / 2, s.h * 1.08), (s.w * 1.6, s.h * 0.3), 0),
                    s.add(IGNORE, "body", 1.0), -1)
    return s


def _markings(s: _Scene, lanes: int, lw: float, x0: float, oncoming: int) -> None:
    paint = s.add(ROAD, "marking", mode=_PLANE)  # lane markings are labelled road
    dash, gap = s.rng.uniform(2, 4), s.rng.uniform(4, 9)
    for i in range(1, lanes):
        x = x0 + i * lw
        if i == oncoming:  # solid line between the two directions
            s.ground(paint, x - 0.12, x + 0.12, 1.0, 300)
            continue
        for z in np.arange(s.rng.uniform(1, gap), 120, dash + gap):
            s.ground(paint, x - 0.07, x + 0.07, z, z + dash)
    for x in (x0 + 0.3, x0 + lanes * lw - 0.3):
        if s.rng.random() < 0.6:
            s.ground(paint, x - 0.08, x + 0.08, 1.0, 300)


def _side(s: _Scene, side: int, edge: float, shift: float, crossing) -> list[Draw]:
    """Sidewalk, buildings or greenery, poles, trees and pedestrians on one side of the road."""
    rng = s.rng
    objs: list[Draw] = []
    walk = rng.uniform(1.5, 5.0)
    out = edge + side * walk
    s.ground(s.add(SIDEWALK, "sidewalk", mode=_PLANE), edge, out + side * 40 * (rng.random() < .4),
             0.6, 300)
    if rng.random() < 0.3:  # grass strip between curb and footpath
        s.ground(s.add(TERRAIN, "terrain", mode=_PLANE), edge + side * 0.4, edge + side * 1.4, 2, 200)
    urban, z, prev_gap = rng.random() < 0.75 - 0.4 * shift, rng.uniform(0.6, 12), True
    while z < 160:
        length = rng.uniform(8, 35)
        if rng.random() < (0.2 if urban else 0.8):  # gap: wall, fence, hedge or trees
            objs += _gap(s, side, out, z, length)
            prev_gap = True
        else:
            xb = out + side * (rng.uniform(0, 3) if urban else rng.uniform(6, 30))
            objs.append((z + length, partial(_building, s, xb, z, z + length, side, prev_gap)))
            prev_gap = False
        z += length
    for z in np.arange(rng.uniform(3, 15), 90, rng.uniform(10, 25)):
        kind = rng.choice(["sign", "light", "lamp", "pole", "tree"], p=[.3, .12, .2, .13, .25])
        kind = "light" if crossing is not None and abs(z - crossing) < 8 else kind
        x = edge + side * rng.uniform(0.4, 0.9)
        objs.append((z, partial(_tree, s, x + side, z) if kind == "tree" else
                     partial(_pole_thing, s, x, z, kind, side)))
    for _ in range(rng.poisson(2 * (1 + 2 * shift))):  # label_shift: more pedestrians
        x, z = edge + side * rng.uniform(0.5, walk), rng.uniform(3, 60)
        objs.append((z, partial(_person, s, x, z)))
    if rng.random() < 0.3:  # parked two-wheelers
        x, z, k = out - side * 0.6, rng.uniform(4, 30), BIKE if rng.random() < 0.6 else MOTO
        objs.append((z, lambda: _cycle(s, x, z, k, False)))
    return objs


def _gap(s: _Scene, side: int, out: float, z: float, length: float) -> list[Draw]:
    rng, kind = s.rng, s.rng.choice(["wall", "fence", "hedge", "trees", "open"])
    objs: list[Draw] = []

    def tree(x: float, zz: float) -> None:
        _tree(s, x, zz, rng.uniform(1, 1.8))  # its size drawn when painted, in the painter's order

    if kind in ("wall", "fence", "hedge"):
        cls, mat = {"wall": (WALL, "wall"), "fence": (FENCE, "fence"), "hedge": (VEG, "foliage")}[kind]
        h, x = rng.uniform(1.0, 3.0), out + side * rng.uniform(0, 1.5)
        objs.append((z + length, lambda: s.facade(s.add(cls, mat, abs(x), mode=_FACADE),
                                                   x, z, z + length, 0, h)))
    for zz in np.arange(z + rng.uniform(1, 6), z + length, rng.uniform(4, 9)):
        if kind in ("trees", "hedge", "wall") or rng.random() < 0.3:
            x = out + side * rng.uniform(2, 9)
            objs.append((zz + 1, partial(tree, x, zz)))
    return objs


def _traffic(s: _Scene, lanes: int, lw: float, road: tuple, park: list, ego: int, oncoming: int,
             shift: float, crossing) -> list[Draw]:
    """Vehicles in the lanes and parked at the curbs, riders, a tram, people on a crosswalk."""
    rng = s.rng
    objs: list[Draw] = []
    taken: list[tuple[int, float, float]] = []  # (lane, z0, z1) of each vehicle placed

    def free(lane: int, z0: float, z1: float) -> bool:
        ok = all(n != lane or z1 < a - 1 or z0 > b + 1 for n, a, b in taken)
        taken.append((lane, z0, z1)) if ok else None
        return ok
    if rng.random() < 0.05 + 0.1 * shift:  # a tram with its rails
        lane = int(rng.integers(lanes))
        x, z = road[0] + (lane + 0.5) * lw, rng.uniform(10, 50)
        rail = s.add(ROAD, "metal", mode=_PLANE, shade=0.6)
        for dx in (-0.72, 0.72):
            s.ground(rail, x + dx - 0.04, x + dx + 0.04, 1, 300)
        if free(lane, z, z + 30):
            objs.append((z, lambda: _car(s, x, z, TRAIN, lane < oncoming)))
    cands = [(int(rng.integers(lanes)), 5 + 85 * rng.random() ** 1.5)
             for _ in range(rng.poisson(4 * (1 + 1.5 * shift)))]  # label_shift: denser traffic
    for side in (0, 1):  # rows of parked cars (and some two-wheelers) at the curbs
        if park[side]:
            cands += [(lanes if side else -1, z) for z in np.arange(rng.uniform(3, 8), 70, 6.5)
                      if rng.random() < 0.7]
    for lane, z in cands:
        kind = rng.choice([CAR, TRUCK, BUS, MOTO, BIKE], p=[.7, .08, .06, .09, .07])
        parked = lane in (-1, lanes)  # lanes -1 and `lanes` are the parking strips
        if (lane == ego and z < 9) or not free(lane, z, z + 6):
            continue
        x = road[0] + (lane + 0.5) * lw + rng.normal(0, 0.2)
        x = road[0] - 1.1 if lane < 0 else road[1] + 1.1 if parked else x
        if kind in (MOTO, BIKE):
            objs.append((z, partial(_cycle, s, x, z, kind, not parked)))
        else:
            objs.append((z, partial(_car, s, x, z, kind, 0 <= lane < oncoming)))
    if crossing is not None:  # a crosswalk with people and riders on it
        zebra = s.add(ROAD, "marking", mode=_PLANE)
        for x in np.arange(road[0] + 0.3, road[1], 1.0):
            s.ground(zebra, x, x + 0.5, crossing, crossing + 3)
        for _ in range(rng.poisson(2 + 3 * shift)):
            x, z = rng.uniform(*road), crossing + rng.uniform(0, 3)
            objs.append((z, partial(_person, s, x, z) if rng.random() < 0.8 else partial(_cycle, s, x, z, BIKE, True)))
    return objs
