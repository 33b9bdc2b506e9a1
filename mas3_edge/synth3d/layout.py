"""Street-scene layout: the world as primitives in metres (x right, y up, z ahead of the camera),
each with a Cityscapes train id, a material key and a colour key, drawn from the seed alone.

Nothing here is appearance: a look (looks.py) maps every (material, colour key) to a BSDF and
chooses the light, weather and camera. So one seed is one world in every look.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..labels import CLASS_ID as _ID

ROAD, SIDEWALK, BUILDING, POLE = _ID["road"], _ID["sidewalk"], _ID["building"], _ID["pole"]
LIGHT, SIGN, VEG, TERRAIN, SKY = _ID["traffic light"], _ID["traffic sign"], _ID["vegetation"], _ID["terrain"], _ID["sky"]
PERSON, RIDER, CAR, TRUCK, BUS, BIKE = (_ID[n] for n in ("person", "rider", "car", "truck", "bus", "bicycle"))


@dataclass(frozen=True)
class Prim:
    """One shape. kind: cube (size = half extents), sphere (size = radii), cylinder (upright,
    size = (radius, half height, 0); axis "x" lays it sideways, as a wheel), disk (a flat plate
    facing the camera, size = radii (x, y, 0)), rect (a ground patch facing up, size = (half width,
    0, half length)) or facade (a wall facing the road, size = (0, half height, half length)).
    Spheres are round (Mitsuba's sphere takes no non-uniform scale): size = (r, r, r)."""

    kind: str
    cls: int
    mat: str
    pos: tuple[float, float, float]
    size: tuple[float, float, float]
    u: tuple[float, float, float] = (0.5, 0.5, 0.5)  # colour key: where in the material's range
    axis: str = "y"
    glow: str = ""  # what it emits when a look turns the lights on (tail, head, window, signal)


@dataclass
class World:
    """Everything one seed lays out; the camera fields are the default mounting (looks may change it)."""

    prims: list[Prim] = field(default_factory=list)
    lamps: list[tuple[float, float, float]] = field(default_factory=list)  # street-lamp heads
    heads: list[tuple[float, float, float, float]] = field(default_factory=list)  # headlights: x, y, z, direction
    cam_x: float = 0.0
    cam_h: float = 1.5
    pitch: float = 0.0  # degrees, > 0 looks up
    yaw: float = 0.0  # degrees, > 0 looks right
    road: tuple[float, float] = (-5.0, 5.0)


def _v3(v) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])


class _Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.w = rng, World()

    def add(self, kind: str, cls: int, mat: str, pos, size, u=None, **kw) -> None:
        u = self.rng.random(3) if u is None else u
        self.w.prims.append(Prim(kind, cls, mat, _v3(pos), _v3(size), _v3(u), **kw))

    def box(self, cls: int, mat: str, x0: float, x1: float, y0: float, y1: float, z0: float, z1: float,
            u=None, **kw) -> None:
        self.add("cube", cls, mat, ((x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2),
                 (abs(x1 - x0) / 2, abs(y1 - y0) / 2, abs(z1 - z0) / 2), u, **kw)

    def ground(self, cls: int, mat: str, x0: float, x1: float, z0: float, z1: float, y: float, u=None) -> None:
        self.add("rect", cls, mat, ((x0 + x1) / 2, y, (z0 + z1) / 2), (abs(x1 - x0) / 2, 0, abs(z1 - z0) / 2), u)


FAR = 160.0  # metres of street laid out ahead


def layout(seed: int) -> World:
    """The world of scene `seed`: a straight street with lanes, sidewalks, buildings or greenery,
    poles, signs, lights, trees, vehicles and people."""
    b = _Builder(np.random.default_rng([int(seed), 3]))
    rng, w = b.rng, b.w
    lanes, lw = int(rng.choice([2, 3, 4], p=[0.4, 0.35, 0.25])), rng.uniform(3.0, 3.6)
    left, right = -lanes * lw / 2, lanes * lw / 2
    oncoming = lanes // 2 if rng.random() < 0.8 else 0  # lanes 0..oncoming-1 drive towards the camera
    ego = int(rng.integers(oncoming, lanes)) if oncoming < lanes else lanes - 1
    w.cam_x, w.road = left + (ego + 0.5) * lw + rng.normal(0, 0.2), (left, right)
    w.cam_h, w.pitch, w.yaw = rng.uniform(1.35, 1.65), rng.normal(-1.0, 1.0), rng.normal(0, 2.0)
    b.ground(TERRAIN, "terrain", -400, 400, -10, 600, -0.02)  # fields beyond everything
    b.ground(ROAD, "road", left, right, -10, FAR + 60, 0.0)
    _markings(b, lanes, lw, left, oncoming)
    crossing = rng.uniform(18, 45) if rng.random() < 0.4 else None
    for side, edge in ((-1, left), (1, right)):
        _side(b, side, edge, crossing)
    _traffic(b, lanes, lw, left, ego, oncoming, crossing)
    return w


def _markings(b: _Builder, lanes: int, lw: float, x0: float, oncoming: int) -> None:
    rng, dash, gap = b.rng, b.rng.uniform(2.5, 4.0), b.rng.uniform(4.0, 8.0)
    for k in range(1, lanes):
        x = x0 + k * lw
        if k == oncoming:  # a solid (often double) line between the directions
            for dx in ((-0.12, 0.12) if rng.random() < 0.5 else (0.0,)):
                b.ground(ROAD, "marking", x + dx - 0.06, x + dx + 0.06, -5, FAR, 0.004)
            continue
        for z in np.arange(rng.uniform(-3, 3), FAR, dash + gap):
            b.ground(ROAD, "marking", x - 0.07, x + 0.07, z, z + dash, 0.004)
    for x in (x0 + 0.3, x0 + lanes * lw - 0.3):
        b.ground(ROAD, "marking", x - 0.07, x + 0.07, -5, FAR, 0.004)


def _side(b: _Builder, side: int, edge: float, crossing: float | None) -> None:
    """Curb, sidewalk, verge, buildings or greenery, poles, signs and people on one side."""
    rng = b.rng
    verge = rng.uniform(1.0, 2.5) if rng.random() < 0.3 else 0.0
    walk = rng.uniform(2.0, 5.0)
    inner, outer = edge + side * verge, edge + side * (verge + walk)
    if verge:
        b.box(TERRAIN, "grass", edge, inner, -0.02, 0.12, -10, FAR + 40)
    b.box(SIDEWALK, "sidewalk", inner, outer, -0.02, 0.15, -10, FAR + 40)
    urban = rng.random() < 0.75
    z = rng.uniform(-8, 0)
    while z < FAR:
        length = rng.uniform(8, 28)
        if rng.random() < (0.15 if urban else 0.6):
            _green(b, side, outer, z, z + length)
        else:
            _building(b, side, outer + side * (rng.uniform(0, 1.0) if urban else rng.uniform(3, 15)), z, z + length)
        z += length + (rng.uniform(0, 1.5) if urban else rng.uniform(1, 8))
    for z in np.arange(rng.uniform(3, 10), FAR * 0.7, rng.uniform(8, 16)):
        kind = rng.choice(["lamp", "sign", "tree", "pole", "light"], p=[0.3, 0.3, 0.2, 0.1, 0.1])
        if crossing is not None and abs(z - crossing) < 6:
            kind = "light"
        x = inner + side * rng.uniform(0.4, 0.8)
        if kind == "tree":
            _tree(b, x + side * 0.3, z)
        else:
            _pole(b, x, z, str(kind), side)
    for _ in range(rng.poisson(4)):
        _person(b, inner + side * rng.uniform(0.4, walk - 0.4), rng.uniform(3, 35))


def _building(b: _Builder, side: int, front: float, z0: float, z1: float) -> None:
    rng = b.rng
    h, depth = rng.uniform(6, 28) * (rng.random() < 0.9) + rng.uniform(3, 6), rng.uniform(8, 20)
    b.box(BUILDING, "building", front, front + side * depth, 0, h, z0, z1, u := rng.random(3))
    b.add("facade", BUILDING, "facade", (front - side * 0.02, h / 2, (z0 + z1) / 2), (0, h / 2, (z1 - z0) / 2),
          u, axis="x" if side < 0 else "-x", glow="window")
    if rng.random() < 0.3:  # a ground-floor awning or shop front
        b.box(BUILDING, "awning", front, front - side * rng.uniform(0.8, 1.6), 2.6, 3.0, z0 + 1, z1 - 1)


def _green(b: _Builder, side: int, outer: float, z0: float, z1: float) -> None:
    """A park, hedge or row of trees where no building stands."""
    rng = b.rng
    if rng.random() < 0.5:
        hh = rng.uniform(0.8, 2.2)
        b.box(VEG, "hedge", outer + side * 0.2, outer + side * rng.uniform(1.0, 2.0), 0, hh, z0, z1)
    for z in np.arange(z0 + rng.uniform(0, 4), z1, rng.uniform(4, 8)):
        _tree(b, outer + side * rng.uniform(2, 10), z)


def _tree(b: _Builder, x: float, z: float) -> None:
    rng = b.rng
    h, r = rng.uniform(2.0, 4.0), rng.uniform(1.5, 3.2)
    b.add("cylinder", VEG, "trunk", (x, h / 2, z), (rng.uniform(0.12, 0.25), h / 2, 0))
    u = rng.random(3)
    for _ in range(int(rng.integers(1, 4))):
        dx, dy, dz = rng.normal(0, r * 0.3, 3)
        rr = r * rng.uniform(0.7, 1.0)
        b.add("sphere", VEG, "foliage", (x + dx, h + rr * 0.8 + dy, z + dz), (rr, rr, rr), u + rng.normal(0, 0.05, 3))


def _pole(b: _Builder, x: float, z: float, kind: str, side: int) -> None:
    """A bare pole, a street lamp (arm and head over the road), a sign or a traffic light on its pole."""
    rng = b.rng
    h = {"lamp": rng.uniform(6, 9), "pole": rng.uniform(3, 8), "sign": rng.uniform(2.4, 3.4),
         "light": rng.uniform(3.2, 4.5)}[kind]
    r = rng.uniform(0.12, 0.18) if kind in ("lamp", "pole") else 0.09
    b.add("cylinder", POLE, "metal", (x, h / 2, z), (r, h / 2, 0))
    if kind == "lamp":
        reach = rng.uniform(1.2, 2.5)
        b.box(POLE, "metal", x, x - side * reach, h - 0.1, h + 0.05, z - 0.08, z + 0.08)
        b.box(POLE, "lamp", x - side * (reach - 0.5), x - side * (reach + 0.1), h - 0.3, h, z - 0.2, z + 0.2, glow="lamp")
        b.w.lamps.append((x - side * reach, h - 0.35, z))
    elif kind == "sign":
        s = rng.uniform(0.4, 0.6)
        if rng.random() < 0.5:  # round or square
            b.add("disk", SIGN, "sign", (x, h + s * 0.9, z - 0.1), (s, s, 0))
        else:
            b.box(SIGN, "sign", x - s, x + s, h, h + 2 * s, z - 0.13, z - 0.07)
        if rng.random() < 0.3:  # a second plate below
            b.box(SIGN, "sign", x - s * 0.8, x + s * 0.8, h - 0.55, h - 0.05, z - 0.13, z - 0.07)
    elif kind == "light":
        reach = rng.uniform(0, 3.5) if rng.random() < 0.5 else 0.0
        if reach:
            b.box(POLE, "metal", x, x - side * reach, h - 0.08, h + 0.08, z - 0.07, z + 0.07)
        hx = x - side * reach
        b.box(LIGHT, "housing", hx - 0.17, hx + 0.17, h, h + 0.95, z - 0.3, z - 0.05)
        lit = int(rng.integers(0, 3))
        for k, colour in enumerate(("signal_red", "signal_amber", "signal_green")):
            y = h + 0.78 - k * 0.3
            b.add("disk", LIGHT, colour, (hx, y, z - 0.31), (0.1, 0.1, 0), glow="signal" if k == lit else "")


def _person(b: _Builder, x: float, z: float, cls: int = PERSON, seated: float = 0.0) -> None:
    """Legs, torso, arms, head; `seated` lifts a rider onto its bicycle and hides the legs' stride."""
    rng = b.rng
    h = rng.uniform(1.55, 1.9)
    top, skin = rng.random(3), (rng.random(), rng.random(), rng.random())
    y0 = seated
    if not seated:
        stride = rng.uniform(-0.15, 0.15)
        for dx, dz in ((-0.1, stride), (0.1, -stride)):
            b.box(cls, "cloth", x + dx - 0.07, x + dx + 0.07, 0, 0.47 * h, z + dz - 0.08, z + dz + 0.08)
    else:
        b.box(cls, "cloth", x - 0.17, x + 0.17, y0 - 0.35, y0 + 0.05, z - 0.1, z + 0.1)
    t0, t1 = y0 + (0.47 * h if not seated else 0.0), y0 + (0.82 * h if not seated else 0.36 * h)
    b.box(cls, "cloth", x - 0.2, x + 0.2, t0, t1, z - 0.12, z + 0.12, top)
    for dx in (-0.25, 0.25):
        b.box(cls, "cloth", x + dx - 0.05, x + dx + 0.05, t0 + 0.05, t1, z - 0.05, z + 0.05, top)
    b.add("sphere", cls, "skin", (x, t1 + 0.11, z), (0.11, 0.11, 0.11), skin)


def _traffic(b: _Builder, lanes: int, lw: float, x0: float, ego: int, oncoming: int, crossing: float | None) -> None:
    """Vehicles in the lanes and parked at the curbs; cyclists at the right edge; a crosswalk."""
    rng = b.rng
    taken: list[tuple[int, float, float]] = []  # (lane, z0, z1) of each vehicle placed
    for _ in range(rng.poisson(6)):
        lane = int(rng.integers(-1, lanes + 1))  # -1 and lanes: parked at the curbs
        z = rng.uniform(6, 90) if lane != ego else rng.uniform(10, 90)
        kind = rng.choice([CAR, TRUCK, BUS], p=[0.75, 0.13, 0.12])
        length = {CAR: 4.5, TRUCK: 9.0, BUS: 12.0}[kind]
        if any(n == lane and z < b1 + 2 and z + length > a1 - 2 for n, a1, b1 in taken):
            continue
        taken.append((lane, z, z + length))
        x = x0 - 1.2 if lane < 0 else x0 + lanes * lw + 1.2 if lane == lanes else x0 + (lane + 0.5) * lw
        _vehicle(b, int(kind), x + rng.normal(0, 0.15), z, towards=0 <= lane < oncoming,
                 moving=0 <= lane < lanes)
    for _ in range(rng.poisson(1.5)):  # cyclists near the right curb
        z = rng.uniform(6, 50)
        if not any(n == lanes - 1 and z < b1 + 1 and z + 2 > a1 - 1 for n, a1, b1 in taken):
            _cyclist(b, x0 + lanes * lw - rng.uniform(0.7, 1.2), z)
    if crossing is not None:
        for x in np.arange(x0 + 0.4, x0 + lanes * lw - 0.4, 1.0):
            b.ground(ROAD, "marking", x, x + 0.5, crossing, crossing + 3.5, 0.005)
        for _ in range(rng.poisson(3)):
            _person(b, rng.uniform(x0, x0 + lanes * lw), crossing + rng.uniform(0.3, 3.2))


def _vehicle(b: _Builder, kind: int, x: float, z: float, towards: bool, moving: bool) -> None:
    """A car (body, cabin, wheels, lights), a truck (cab and box) or a bus, its rear at z (front if towards)."""
    rng = b.rng
    dims = {CAR: (rng.uniform(1.7, 1.95), rng.uniform(3.9, 4.8), rng.uniform(1.35, 1.6)),
            TRUCK: (rng.uniform(2.3, 2.5), rng.uniform(7, 10), rng.uniform(3.0, 3.8)),
            BUS: (rng.uniform(2.45, 2.55), rng.uniform(10.5, 12.5), rng.uniform(2.9, 3.2))}
    wd, ln, ht = dims[kind]
    z0, z1, paint = z, z + ln, rng.random(3)
    body = {CAR: "paint", TRUCK: "paint", BUS: "bus"}[kind]
    if kind == CAR:
        b.box(CAR, body, x - wd / 2, x + wd / 2, 0.3, 0.55 * ht + 0.15, z0, z1, paint)
        c0, c1 = (z0 + 0.25 * ln, z1 - 0.35 * ln) if not towards else (z0 + 0.35 * ln, z1 - 0.25 * ln)
        b.box(CAR, "glass", x - wd * 0.43, x + wd * 0.43, 0.55 * ht + 0.15, ht, c0, c1)
    elif kind == TRUCK:
        cab = 2.2
        cz0, cz1 = (z0, z0 + cab) if towards else (z1 - cab, z1)
        b.box(TRUCK, body, x - wd / 2, x + wd / 2, 0.45, 2.7, cz0, cz1, paint)
        b.box(TRUCK, "glass", x - wd * 0.46, x + wd * 0.46, 1.6, 2.5, cz0 - 0.02, cz1 + 0.02)
        bz0, bz1 = (cz1 + 0.2, z1) if towards else (z0, cz0 - 0.2)
        b.box(TRUCK, "cargo", x - wd / 2, x + wd / 2, 0.9, ht, bz0, bz1)
    else:
        b.box(BUS, body, x - wd / 2, x + wd / 2, 0.35, ht, z0, z1, paint)
        b.box(BUS, "glass", x - wd / 2 - 0.02, x + wd / 2 + 0.02, 1.3, ht - 0.35, z0 + 0.6, z1 - 0.6)
    r = {CAR: 0.32, TRUCK: 0.48, BUS: 0.5}[kind]
    for wz in (z0 + 0.18 * ln, z1 - 0.18 * ln):
        for wx in (x - wd / 2 + 0.05, x + wd / 2 - 0.05):
            b.add("cylinder", kind, "tyre", (wx, r, wz), (r, 0.12, 0), axis="x")
    back, front = (z1, z0) if towards else (z0, z1)
    sgn = 1 if towards else -1  # the rear faces -z when driving away
    for dx in (-wd * 0.38, wd * 0.38):
        b.box(kind, "taillight", x + dx - 0.12, x + dx + 0.12, 0.75, 0.9, back + sgn * 0.01, back - sgn * 0.03,
              glow="tail")
        b.box(kind, "headlight", x + dx - 0.14, x + dx + 0.14, 0.6, 0.75, front - sgn * 0.01, front + sgn * 0.03,
              glow="head")
        if towards and moving:
            b.w.heads.append((x + dx, 0.68, front - 0.1, -1.0))


def _cyclist(b: _Builder, x: float, z: float) -> None:
    """A bicycle (two wheels and a frame) with its rider."""
    for wz in (z, z + 1.1):
        b.add("cylinder", BIKE, "tyre", (x, 0.34, wz), (0.34, 0.025, 0), axis="x")
    b.box(BIKE, "metal", x - 0.03, x + 0.03, 0.35, 0.8, z + 0.1, z + 1.0)
    _person(b, x, z + 0.45, RIDER, seated=0.95)
