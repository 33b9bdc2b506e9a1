#!/usr/bin/env python
"""What the service's colour overlay costs per frame: the shipped drawing (OpenCV's table lookup and
saturating blend, then the JPEG) against the same overlay blended in float with numpy.

    python tools/bench_overlay.py --out docs/results/bench_overlay_cpu.json

Synthetic frames with their label maps at three sizes; both ways are timed in alternating rounds of
single frames (machine noise falls on both alike). `jpeg` is the JPEG encode alone, part of both.
The service draws one overlay per message unless `run --overlay-fps` thins them out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mas3_edge import synth  # noqa: E402
from mas3_edge.labels import PALETTE, colorize  # noqa: E402
from mas3_edge.runtime import wire  # noqa: E402


def float_blend(image: np.ndarray, classes: np.ndarray, quality: int, alpha: float = 0.5) -> bytes:
    """The overlay blended in float32 with numpy, then the same JPEG: the reference."""
    colour = colorize(classes.astype(np.int64), PALETTE).astype(np.float32)  # numpy's indexing
    blended = (image.astype(np.float32) * (1 - alpha) + colour * alpha).round().astype(np.uint8)
    return cv2.imencode(".jpg", cv2.cvtColor(blended, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def jpeg_only(image: np.ndarray, classes: np.ndarray, quality: int) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def shipped(image: np.ndarray, classes: np.ndarray, quality: int) -> bytes:
    return wire.encode_overlay(image, classes, quality)


WAYS = {"float blend + JPEG": float_blend, "shipped": shipped, "jpeg": jpeg_only}


def bench(size: tuple[int, int], rounds: int, quality: int) -> dict:
    frames = list(synth.generate("synthetic", 4, seed=7, size=size))
    times: dict[str, list[float]] = {k: [] for k in WAYS}
    for r in range(rounds):
        for name, way in WAYS.items():
            for image, classes in frames:
                t = time.perf_counter()
                way(image, classes, quality)
                if r:  # the first round warms caches and OpenCV's pools
                    times[name].append((time.perf_counter() - t) * 1e3)
    decode = [cv2.imdecode(np.frombuffer(way(*frames[0], 100), np.uint8), cv2.IMREAD_COLOR)
              for way in (float_blend, shipped)]  # quality 100: the blends' difference, not JPEG's
    return {"size": f"{size[0]}x{size[1]}", **{f"{k} p50 ms": float(np.median(v)) for k, v in times.items()},
            "ratio": float(np.median(times["shipped"]) / np.median(times["float blend + JPEG"])),
            "max abs difference (quality 100)": int(np.abs(decode[0].astype(int) - decode[1]).max())}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="128x256,256x512,512x1024")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quality", type=int, default=80, help="JPEG quality (the service's default)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    rows = [bench(tuple(int(v) for v in s.split("x")), a.rounds, a.quality) for s in a.sizes.split(",")]  # type: ignore[misc]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if a.out:
        a.out.write_text(json.dumps({"threads": cv2.getNumThreads(), "opencv": cv2.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
