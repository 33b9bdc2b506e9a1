"""`mas3-edge data`: generate synthetic domains and corrupted copies of datasets.

The heavy modules (numpy, cv2, imagecorruptions) are imported inside the commands so that
`mas3-edge --help` stays fast.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError

app = typer.Typer(help="Generate and transform datasets.", no_args_is_help=True)

_DOMAINS = ("synthetic", "realistic", "night", "fog", "rain")  # = synth.DOMAINS, kept import-free


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write images/ (+ labels/) into.")],
    domain: Annotated[str, typer.Option(help=f"One of: {', '.join(_DOMAINS)}.")] = "synthetic",
    n: Annotated[int, typer.Option(help="Number of scenes.", min=1)] = 100,
    seed: Annotated[int, typer.Option(help="Stream seed; the same seed gives the same scenes.",
                                      min=0)] = 0,
    height: Annotated[int, typer.Option(help="Image height in pixels.", min=16)] = 128,
    width: Annotated[int, typer.Option(help="Image width in pixels.", min=16)] = 256,
    label_shift: Annotated[float, typer.Option(help="0..1: tilt the camera, widen roads, add "
                                               "traffic and people.", min=0.0, max=1.0)] = 0.0,
    labels: Annotated[bool, typer.Option("--labels/--no-labels",
                                         help="Also write labels/ (train ids).")] = True,
) -> None:
    """Render procedural driving scenes of one domain; a seed gives the same labels in every domain."""
    from .. import synth as gen

    t0 = time.perf_counter()
    gen.write_folder(out, domain, n, seed, (height, width), label_shift, labels)
    dt = time.perf_counter() - t0
    typer.echo(f"wrote {n} {domain} scenes ({height}x{width}, seed {seed}, label shift "
               f"{label_shift:g}{'' if labels else ', no labels'}) to {out} in {dt:.1f} s")


@app.command()
def corrupt(
    src: Annotated[Path, typer.Option(help="Folder of images (images/ + optional labels/).")],
    out: Annotated[Path, typer.Option(help="Output folder; with --all, one subfolder per run.")],
    corruption: Annotated[str, typer.Option(help="Corruption name (see --all).")] = "fog",
    severity: Annotated[list[int] | None, typer.Option(
        help="Severity 1..5; repeat for several. [default: 3]")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Write all 15 corruptions, each to "
                                       "OUT/NAME-SEVERITY.")] = False,
) -> None:
    """Apply ImageNet-C style corruptions (imagecorruptions) to a folder; labels are copied."""
    from ..data import CORRUPTIONS, corrupt_folder

    severity = severity or [3]
    names = CORRUPTIONS if all_ else (corruption,)
    if names[0] not in CORRUPTIONS:
        raise UserError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
    if any(not 1 <= s <= 5 for s in severity):  # checked up front: no half-written runs
        raise UserError(f"severity must be 1..5, got {severity}")
    runs = [(c, s) for c in names for s in severity]
    t0, total = time.perf_counter(), 0
    for name, sev in runs:
        dst = out / f"{name}-{sev}" if all_ or len(runs) > 1 else out
        total += corrupt_folder(src, dst, name, sev)
    typer.echo(f"wrote {total} images ({len(runs)} corruption/severity runs) to {out} "
               f"in {time.perf_counter() - t0:.1f} s")
