"""One world in one look, rendered by Mitsuba 3 (CPU, scalar_rgb): a colour pass and a label pass.

Colour: the `direct` integrator (sun, sky environment, spot lights, emissive parts; hard sun
shadows, sky occlusion) at the look's fixed sample count and a seed from the scene, then haze from
the depth, a tone curve and sensor noise. Labels: the same shapes as flat emitters of radiance
"train id + 1" under the `path` integrator at depth 1 and one sample per pixel (no lighting, no
antialiasing); a miss is sky. Depth (for haze, and to tell a miss from a back face) comes from the
`depth` integrator. Mitsuba puts world x to the image's left, so x is negated on the way in: in
layout.py x is to the right.
"""
from __future__ import annotations

import colorsys
import math
from functools import lru_cache

import numpy as np

from . import textures
from ..labels import IGNORE
from .layout import SKY, Prim, World
from .looks import GLOSSY, GLOW_RGB, PALETTES, TEXTURED, Look


@lru_cache(maxsize=1)
def _mi():
    """Mitsuba in its scalar CPU variant. Not llvm_ad_rgb: it compiles kernels with the system's
    LLVM, which can crash (LLVM 14/15 here) and costs start-up time for images this small."""
    import mitsuba as mi

    mi.set_variant("scalar_rgb")
    mi.set_log_level(mi.LogLevel.Error)
    return mi


def _f32(values) -> np.ndarray:
    return np.asarray(values, np.float32)


def _p(x: float, y: float, z: float) -> list[float]:
    return [-x, y, z]


def _rgb(pal: dict, prim: Prim) -> list[float]:
    h0, h1, s0, s1, v0, v1 = pal[prim.mat]
    u = np.clip(prim.u, 0, 1)
    rgb = colorsys.hsv_to_rgb((h0 + u[0] * (h1 - h0)) % 1.0, s0 + u[1] * (s1 - s0), v0 + u[2] * (v1 - v0))
    return [float(c) for c in rgb]  # plain floats: numpy scalars take Mitsuba's slow conversion path


def _transform(mi, prim: Prim):
    T = mi.ScalarTransform4f
    (x, y, z), (a, b, c) = prim.pos, prim.size
    if prim.kind == "cube":
        return T().translate(_p(x, y, z)).scale([a, b, c])
    if prim.kind == "disk":  # facing -z, towards the camera
        return T().translate(_p(x, y, z)).rotate([0, 1, 0], 180).scale([a, b, 1])
    if prim.kind == "rect":
        return T().translate(_p(x, y, z)).rotate([1, 0, 0], -90).scale([a, c, 1])
    if prim.kind == "facade":  # normal +x in layout coordinates is -x in Mitsuba's
        return T().translate(_p(x, y, z)).rotate([0, 1, 0], -90 if prim.axis == "x" else 90).scale([c, b, 1])
    raise ValueError(prim.kind)


def _shape(mi, prim: Prim) -> dict:
    (x, y, z), (a, b, _) = prim.pos, prim.size
    if prim.kind == "sphere":
        return {"type": "sphere", "center": _p(x, y, z), "radius": a}
    if prim.kind == "cylinder":
        d = (b, 0, 0) if prim.axis == "x" else (0, b, 0)
        return {"type": "cylinder", "radius": a, "p0": _p(x - d[0], y - d[1], z), "p1": _p(x + d[0], y + d[1], z)}
    kind = "rectangle" if prim.kind in ("rect", "facade") else prim.kind
    return {"type": kind, "to_world": _transform(mi, prim)}


def _uv_scale(prim: Prim, metres: float) -> tuple[float, float]:
    a, b, c = (2 * s for s in prim.size)
    if prim.kind == "rect":
        return a / metres, c / metres
    if prim.kind == "facade":
        return c / metres, b / metres
    if prim.kind == "sphere":
        return 4.0, 2.0
    return max(a, c) / metres, b / metres


class _Materials:
    """BSDF dicts per prim in a look's palette; the scene's texture tiles are made once."""

    def __init__(self, mi, look: Look, rng: np.random.Generator):
        self.mi, self.look, self.pal = mi, look, PALETTES[look.palette]
        self.tiles = textures.tiles_for(rng) if TEXTURED[look.palette] else {}
        self.mask_np = textures.window_mask(rng)
        self.mask = mi.Bitmap(self.mask_np)
        self.rng = rng

    def _bitmap(self, bm, scale: tuple[float, float], raw: bool = False) -> dict:
        return {"type": "bitmap", "bitmap": bm, "filter_type": "bilinear", "wrap_mode": "repeat", "raw": raw,
                "to_uv": self.mi.ScalarTransform3f().scale([scale[0], scale[1]])}

    def _base(self, prim: Prim) -> dict:
        rgb = _rgb(self.pal, prim)
        if prim.mat in self.tiles:  # the scene's tile times the prim's own colour
            tile = self.tiles[prim.mat] * _f32(rgb)
            scale = _uv_scale(prim, textures.TILE_METRES[prim.mat])
            return {"type": "diffuse", "reflectance": self._bitmap(self.mi.Bitmap(np.clip(tile, 0, 1)), scale)}
        if prim.mat in GLOSSY[self.look.palette]:
            # principled, not roughplastic: that one integrates a table per instance (~40 ms each)
            return {"type": "principled", "base_color": {"type": "rgb", "value": rgb}, "roughness": 0.25}
        return {"type": "diffuse", "reflectance": {"type": "rgb", "value": rgb}}

    def bsdf(self, prim: Prim) -> dict:
        base = self._base(prim)
        if prim.mat == "facade":  # windows: dark glass where the mask is 1
            glass = {"type": "principled", "roughness": 0.1, "base_color": {"type": "rgb", "value": [0.03, 0.04, 0.06]}}
            base = {"type": "blendbsdf", "bsdf_0": base, "bsdf_1": glass,
                    "weight": self._bitmap(self.mask, _window_scale(prim), raw=True)}
        return {"type": "twosided", "bsdf": base} if prim.kind in ("rect", "facade", "disk") else base

    def emitter(self, prim: Prim) -> dict | None:
        if not (prim.glow and self.look.glow > 0):
            return None
        if prim.glow == "window":
            rgb = textures.window_light(self.rng, self.mask_np, GLOW_RGB["window"]) * self.look.glow * 0.5
            return {"type": "area", "radiance": self._bitmap(self.mi.Bitmap(rgb), _window_scale(prim)),
                    "sampling_weight": 0.0}
        rgb = _f32(_rgb(self.pal, prim) if prim.glow == "signal" else GLOW_RGB[prim.glow])
        rgb = rgb / max(float(rgb.max()), 1e-3) * self.look.glow * (3.0 if prim.glow == "signal" else 1.0)
        # seen, not sampled: small bright emitters picked for direct light give fireflies, and the
        # light they cast is the spot lights' job
        return {"type": "area", "radiance": {"type": "rgb", "value": rgb.tolist()}, "sampling_weight": 0.0}


def _window_scale(prim: Prim) -> tuple[float, float]:
    n = textures.WINDOW_CELLS
    return 2 * prim.size[2] / (n * textures.BAY), 2 * prim.size[1] / (n * textures.FLOOR)


MAX_LAMPS, MAX_HEADS = 6, 4  # spot lights per scene: the nearest street lamps and oncoming headlights


def _sky(mi, look: Look) -> dict:
    """A lat-long environment: the zenith colour fading into the horizon's over the upper half."""
    h = 32
    elev = (0.5 - (np.arange(h) + 0.5) / h) * math.pi  # +pi/2 at the top row
    t = np.clip(np.sin(np.maximum(elev, 0)), 0, 1) ** 0.5
    col = _f32(look.horizon) * (1 - t[:, None]) + _f32(look.zenith) * t[:, None]
    col[elev < 0] *= 0.3  # below the horizon: the ground's dim bounce (mostly hidden by the ground itself)
    img = np.repeat(col[:, None, :], 2 * h, 1).astype(np.float32) * look.sky_power
    return {"type": "envmap", "bitmap": mi.Bitmap(img)}


def _camera(mi, world: World, look: Look, size: tuple[int, int]):
    h = world.cam_h if look.cam_h is None else look.cam_h
    pitch, yaw = math.radians(world.pitch + look.pitch), math.radians(world.yaw)
    d = (math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch))
    eye = (world.cam_x, h, 0.0)
    to = mi.ScalarTransform4f().look_at(origin=_p(*eye), target=_p(*(e + v for e, v in zip(eye, d))), up=[0, 1, 0])
    return {"type": "perspective", "fov": look.hfov, "fov_axis": "x", "near_clip": 0.05, "far_clip": 2000.0,
            "to_world": to, "film": {"type": "hdrfilm", "width": size[1], "height": size[0], "pixel_format": "rgb",
                                     "rfilter": {"type": "box"}},
            "sampler": {"type": "multijitter", "sample_count": look.spp}}  # stratified: less noise than independent


def _lights(mi, world: World, look: Look, rng: np.random.Generator) -> dict:
    T = mi.ScalarTransform4f
    out: dict[str, dict] = {}
    if look.sun_elevation is not None:
        el, az = math.radians(rng.uniform(*look.sun_elevation)), rng.uniform(0, 2 * math.pi)
        to_sun = (math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az))
        out["sun"] = {"type": "directional", "direction": _p(*(-v for v in to_sun)),
                      "irradiance": {"type": "rgb", "value": [c * look.sun_power for c in look.sun_rgb]}}
    if look.lamps > 0:  # the nearest lamps only: each spot light is a source of sampling noise
        for k, (x, y, z) in enumerate(sorted(world.lamps, key=lambda p: p[2])[:MAX_LAMPS]):
            out[f"lamp{k}"] = {"type": "spot", "cutoff_angle": 55.0, "beam_width": 30.0,
                               "to_world": T().look_at(origin=_p(x, y, z), target=_p(x, 0, z + 0.01), up=[0, 0, 1]),
                               "intensity": {"type": "rgb", "value": [look.lamps * c for c in GLOW_RGB["lamp"]]}}
    if look.headlights > 0:
        cam_h = world.cam_h if look.cam_h is None else look.cam_h
        ego = [(world.cam_x - 0.7, 0.7, 1.0, 1.0), (world.cam_x + 0.7, 0.7, 1.0, 1.0)]
        for k, (x, y, z, d) in enumerate(ego + sorted(world.heads, key=lambda p: p[2])[:MAX_HEADS]):
            y = min(y, cam_h - 0.05)
            out[f"head{k}"] = {"type": "spot", "cutoff_angle": 25.0, "beam_width": 12.0,
                               "to_world": T().look_at(origin=_p(x, y, z), target=_p(x, 0.0, z + d * 25), up=[0, 1, 0]),
                               "intensity": {"type": "rgb", "value": [look.headlights * c for c in GLOW_RGB["head"]]}}
    return out


def _shapes(mi, prim: Prim, k: int) -> dict[str, dict]:
    """The Mitsuba shapes of one prim, keyed "s{k:05d}" (and two caps for a wheel: a cylinder is open)."""
    out = {f"s{k:05d}": _shape(mi, prim)}
    if prim.kind == "cylinder" and prim.axis == "x":
        T, (x, y, z), (r, hw, _) = mi.ScalarTransform4f, prim.pos, prim.size
        for tag, dx, turn in (("a", hw, -90), ("b", -hw, 90)):
            out[f"s{k:05d}{tag}"] = {"type": "disk", "to_world": T().translate(_p(x + dx, y, z)).rotate(
                [0, 1, 0], turn).scale([r, r, 1])}
    return out


def scene_dict(world: World, look: Look, size: tuple[int, int], rng: np.random.Generator) -> dict:
    """The Mitsuba scene of `world` in `look`; a shape's key starts with "s{index of its prim:05d}"."""
    mi = _mi()
    mats = _Materials(mi, look, rng)
    lights = _lights(mi, world, look, rng)
    spots = sum(v["type"] == "spot" for v in lights.values())
    for key in ("sun", "sky"):  # Mitsuba picks an emitter by weight: without this, spots starve the sky and sun
        if key in (lights := {**lights, "sky": _sky(mi, look)}):
            lights[key]["sampling_weight"] = float(max(1, spots))
    # Where parts glow, no BSDF samples: they would hit those small emitters (weight 0 below) and
    # give fireflies; every light is then reached by emitter sampling, and a camera ray still sees
    # what glows. In daylight, BSDF samples (MIS) keep the sky's light smooth.
    bsdf_samples = 0 if look.glow > 0 else 1
    d = {"type": "scene", "integrator": {"type": "direct", "emitter_samples": look.light_samples,
                                         "bsdf_samples": bsdf_samples},
         "sensor": _camera(mi, world, look, size), **lights}
    for k, prim in enumerate(world.prims):
        bsdf, em = mats.bsdf(prim), mats.emitter(prim)
        for key, shape in _shapes(mi, prim, k).items():
            d[key] = {**shape, "bsdf": bsdf, **({"emitter": em} if em is not None else {})}
    return d


def label_dict(world: World, look: Look, size: tuple[int, int]) -> dict:
    """The same shapes as flat emitters of radiance train id + 1 and no other light: the `path`
    integrator at depth 1 returns exactly that id (+1) at one sample per pixel, 0 on a miss."""
    mi = _mi()
    black = {"type": "diffuse", "reflectance": 0.0}
    d = {"type": "scene", "integrator": {"type": "path", "max_depth": 1}, "sensor": _camera(mi, world, look, size)}
    for k, prim in enumerate(world.prims):
        em = {"type": "area", "radiance": float(prim.cls + 1)}
        d.update({key: {**shape, "bsdf": black, "emitter": em} for key, shape in _shapes(mi, prim, k).items()})
    return d


def render(world: World, look: Look, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), train ids uint8 (H, W)) of `world` in `look`, deterministic in `seed`.
    Mitsuba's `aov` integrator would give shape indices and depth in one pass, but in scalar_rgb it
    costs 40x the `path`/`depth` passes used here."""
    mi = _mi()
    rng = np.random.default_rng([int(seed), 11])
    flat = mi.load_dict(label_dict(world, look, size), optimize=False)
    ids = np.rint(np.array(mi.render(flat, spp=1, seed=1))[..., 0]).astype(np.int64)
    depth = np.array(mi.render(flat, integrator=mi.load_dict({"type": "depth"}), spp=1, seed=1))[..., 0]
    label = np.where(ids > 0, ids - 1, np.where(depth > 0, IGNORE, SKY)).astype(np.uint8)  # id 0 and a hit: a back face
    scene = mi.load_dict(scene_dict(world, look, size, rng), optimize=False)  # no merging: emitters stay per shape
    radiance = np.array(mi.render(scene, spp=look.spp, seed=int(seed) % (2 ** 31)), np.float32)[..., :3]
    return _film(radiance, depth, look, rng), label


def _film(radiance: np.ndarray, depth: np.ndarray, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Haze (Koschmieder), exposure, a filmic tone curve, sRGB gamma and sensor noise."""
    if look.fog[1] > 0:
        beta = rng.uniform(*look.fog)
        t = np.exp(-beta * np.where(depth > 0, depth, 1e4))[..., None]
        radiance = radiance * t + _f32(look.airlight) * (1 - t)
    x = np.maximum(radiance * look.exposure * rng.uniform(0.85, 1.15), 0)
    x = x * (2.51 * x + 0.03) / (x * (2.43 * x + 0.59) + 0.14)  # ACES fit (Narkowicz)
    img = np.clip(x, 0, 1) ** (1 / 2.2)
    img = img + rng.normal(0, look.noise, img.shape) * (0.5 + img)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
