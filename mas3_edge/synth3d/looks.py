"""Looks: how one laid-out world is lit, dressed, seen and filmed.

The source look is a clear midday street through a standard camera with clean materials. Every
target look changes what real shifts change and keeps the rest of the source look:
- r3d-dusk: a low orange sun, long shadows, a dim sky, lamps and headlights on (light);
- r3d-night: no sun, a dark sky, street lamps, headlights, lit windows and tail lights, a noisier
  sensor (light);
- r3d-fog: an overcast sky and haze that thickens with distance, t = exp(-beta * d) towards the
  airlight (Koschmieder), from the renderer's per-pixel depth (weather);
- r3d-texture: another city's materials: brick, paving and patched asphalt textures, glossy car
  paint, autumn foliage and dry grass (materials and textures);
- r3d-lowcam: a small robot's camera: mounted at 0.6 m instead of 1.5, a wider lens, tilted up
  (camera: the image and the labels change).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Look:
    sun_elevation: tuple[float, float] | None = (45.0, 70.0)  # degrees, drawn per scene; None: no sun
    sun_rgb: tuple[float, float, float] = (1.0, 0.96, 0.9)
    sun_power: float = 3.2  # irradiance
    zenith: tuple[float, float, float] = (0.2, 0.38, 0.85)  # sky radiance straight up
    horizon: tuple[float, float, float] = (0.72, 0.8, 0.92)  # sky radiance at the horizon
    sky_power: float = 1.0
    lamps: float = 0.0  # intensity of the street lamps (spot lights under their heads); 0: off
    headlights: float = 0.0  # intensity of oncoming headlights and the ego vehicle's
    glow: float = 0.0  # radiance of tail lights, headlights, lit windows and signals; 0: unlit
    fog: tuple[float, float] = (0.0, 0.0)  # extinction coefficient beta (1/m), drawn per scene
    airlight: tuple[float, float, float] = (0.78, 0.8, 0.82)
    palette: str = "clean"  # the materials: clean (flat colours) or worn (textured, another city)
    cam_h: float | None = None  # camera height in metres; None: the world's own (about 1.5)
    hfov: float = 62.0  # horizontal field of view, degrees
    pitch: float = 0.0  # degrees added to the world's camera pitch (> 0: up)
    exposure: float = 1.0
    noise: float = 0.008  # sensor noise std (0..1 scale)
    spp: int = 12  # samples per pixel of the colour pass (fixed: the render is deterministic)
    light_samples: int = 1  # emitter samples per pixel sample: more where many spot lights share the scene


LOOKS: dict[str, Look] = {
    "r3d-source": Look(),
    "r3d-dusk": Look(sun_elevation=(2.0, 8.0), sun_rgb=(1.0, 0.52, 0.25), sun_power=2.2,
                     zenith=(0.05, 0.07, 0.2), horizon=(0.55, 0.3, 0.22), sky_power=0.6,
                     lamps=6.0, headlights=12.0, glow=2.0, exposure=1.6, noise=0.015, light_samples=4),
    "r3d-night": Look(sun_elevation=None, zenith=(0.001, 0.0015, 0.004), horizon=(0.008, 0.007, 0.008),
                      lamps=10.0, headlights=15.0, glow=3.0, exposure=2.2, noise=0.03, spp=16, light_samples=4),
    "r3d-fog": Look(sun_elevation=None, zenith=(0.7, 0.72, 0.75), horizon=(0.8, 0.81, 0.82), sky_power=1.2,
                    fog=(0.025, 0.06), airlight=(0.8, 0.81, 0.83), exposure=1.1),
    "r3d-texture": Look(palette="worn"),
    "r3d-lowcam": Look(cam_h=0.6, hfov=84.0, pitch=4.0),
}
SOURCE = "r3d-source"
CAMERA_LOOKS = ("r3d-lowcam",)  # looks that move the camera: their labels differ from the source's

# Material -> (hue0, hue1, sat0, sat1, val0, val1) per palette; a prim's colour key picks its point in
# the range. Hue ranges are wide where the world's are (cars, clothes, facades) and narrow where
# they are not (vegetation, sky, asphalt): the model must learn shape and context, as on real data.
_CLEAN = {
    "road": (0.0, 1.0, 0.0, 0.06, 0.16, 0.3), "marking": (0.1, 0.15, 0.0, 0.12, 0.75, 0.9),
    "sidewalk": (0.05, 0.12, 0.0, 0.2, 0.4, 0.65), "grass": (0.18, 0.3, 0.4, 0.7, 0.25, 0.45),
    "terrain": (0.14, 0.28, 0.35, 0.65, 0.25, 0.45), "building": (0.0, 1.0, 0.05, 0.35, 0.45, 0.85),
    "facade": (0.0, 1.0, 0.05, 0.35, 0.45, 0.85), "awning": (0.0, 1.0, 0.4, 0.8, 0.35, 0.8),
    "hedge": (0.22, 0.36, 0.45, 0.8, 0.12, 0.3), "foliage": (0.2, 0.36, 0.45, 0.85, 0.12, 0.35),
    "trunk": (0.05, 0.1, 0.3, 0.6, 0.12, 0.25), "metal": (0.0, 1.0, 0.0, 0.08, 0.3, 0.55),
    "lamp": (0.1, 0.14, 0.0, 0.1, 0.7, 0.85), "sign": (0.0, 1.0, 0.65, 0.9, 0.55, 0.85),
    "housing": (0.12, 0.16, 0.0, 0.8, 0.05, 0.25), "signal_red": (0.99, 1.0, 0.8, 0.9, 0.25, 0.35),
    "signal_amber": (0.09, 0.11, 0.8, 0.9, 0.25, 0.35), "signal_green": (0.38, 0.42, 0.8, 0.9, 0.25, 0.35),
    "cloth": (0.0, 1.0, 0.0, 0.7, 0.08, 0.65), "skin": (0.03, 0.1, 0.25, 0.6, 0.3, 0.85),
    "paint": (0.0, 1.0, 0.0, 0.8, 0.08, 0.85), "bus": (0.0, 1.0, 0.4, 0.8, 0.4, 0.8),
    "cargo": (0.0, 1.0, 0.0, 0.15, 0.6, 0.9), "glass": (0.55, 0.62, 0.2, 0.4, 0.04, 0.12),
    "tyre": (0.0, 1.0, 0.0, 0.05, 0.03, 0.06), "taillight": (0.98, 1.0, 0.8, 0.95, 0.35, 0.5),
    "headlight": (0.1, 0.15, 0.0, 0.15, 0.7, 0.85),
}
# Another city: brick and stone instead of plaster, red-brown paving, autumn trees, dry grass,
# darker asphalt, duller car colours. The textures themselves are in textures.py.
_WORN = {**_CLEAN,
         "road": (0.0, 1.0, 0.0, 0.05, 0.1, 0.22), "sidewalk": (0.0, 0.08, 0.2, 0.5, 0.3, 0.55),
         "grass": (0.1, 0.16, 0.3, 0.55, 0.35, 0.55), "terrain": (0.07, 0.13, 0.3, 0.55, 0.25, 0.45),
         "building": (0.0, 0.08, 0.35, 0.7, 0.25, 0.6), "facade": (0.0, 0.08, 0.35, 0.7, 0.3, 0.65),
         "hedge": (0.12, 0.25, 0.4, 0.75, 0.12, 0.3), "foliage": (0.02, 0.15, 0.6, 0.95, 0.25, 0.6),
         "paint": (0.0, 1.0, 0.0, 0.45, 0.1, 0.6), "metal": (0.05, 0.1, 0.1, 0.3, 0.15, 0.35)}
PALETTES = {"clean": _CLEAN, "worn": _WORN}
# Materials a palette renders with a texture (textures.py) instead of a flat colour, and the glossy ones.
TEXTURED = {"clean": (), "worn": ("road", "sidewalk", "building", "facade", "grass", "terrain", "foliage", "hedge")}
GLOSSY = {"clean": ("glass",), "worn": ("glass", "paint", "bus")}
GLOW_RGB = {"tail": (1.0, 0.05, 0.02), "head": (1.0, 0.95, 0.8), "lamp": (1.0, 0.8, 0.5),
            "window": (1.0, 0.75, 0.45), "signal": (1.0, 1.0, 1.0)}
