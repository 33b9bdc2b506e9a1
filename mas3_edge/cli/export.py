"""`mas3-edge export`: a thin wrapper over export.onnx and export.tensorrt (imported in the command)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from .core import JsonOpt, VerboseOpt, VersionOpt, note, print_json, set_verbose
from .options import PrecisionOpt, check_precision

ENGINES = ("onnx", "tensorrt", "all")


def export_cmd(
    bundle: Annotated[Optional[Path], typer.Option(
        "--bundle", "-b", help="Bundle directory (or a version directory); default: the packaged one.")] = None,
    version: VersionOpt = None,
    engine: Annotated[str, typer.Option("--engine", "-e", help="onnx, tensorrt, or all (every engine this machine can build).")] = "onnx",
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="TensorRT precision (--precision overrides it).")] = True,
    precision: PrecisionOpt = None,
    frames: Annotated[Optional[Path], typer.Option(
        help="With --precision int8: calibrate on the newest images of this folder or bag (e.g. the run's "
             "buffer); default: the synthetic check images.")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="TensorRT optimisation profiles, e.g. 1,8.")] = "1,8",
    force: Annotated[bool, typer.Option("--force", help="Re-export even if model.onnx is up to date.")] = False,
    as_json: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Export a version to ONNX with a parity check against PyTorch, and build TensorRT engines.

    Nothing is replaced unless the new artifact passes its check; the numbers go to export.json and to the engine's sidecar in engines/.
    """
    set_verbose(verbose)
    check_precision(precision)
    fp16 = fp16 if precision is None else precision != "fp32"  # int8: TensorRT engines stay fp16
    if frames is not None and not frames.exists():
        raise UserError(f"--frames {frames}: no such folder or bag")
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    sizes = _batch_sizes(batch_sizes)
    from mas3_edge.export import tensorrt as trt
    trt_ok, why = trt.tensorrt_status()
    if engine == "tensorrt" and not trt_ok:
        raise UserError(f"cannot build a TensorRT engine: {why}")  # before any work, so nothing changes
    from mas3_edge.export.onnx import export_onnx
    from mas3_edge.bundle import resolve, user_bundle
    vdir = resolve(user_bundle(bundle), version)
    from rich.console import Console
    console = Console(stderr=True)
    with console.status(f"exporting {vdir} to ONNX and checking it against PyTorch"):
        res = export_onnx(vdir, force=force)
    rows = [_onnx_row(res)]
    notes = [f"onnx: {res.path} (graph: {res.report['onnx']['graph']})"]
    int8 = _int8(vdir, frames, console) if precision == "int8" else None
    if int8 is not None:
        rows.append(_int8_row(int8))
        notes.append(f"int8: calibrated on {int8['calibration']['source']}; " + (
            "served with --precision int8" if int8["passed"] else f"not served (fp32 is): {int8['reason']}"))
    if engine != "onnx":
        if trt_ok:
            with console.status("building the TensorRT engine (minutes on small devices) and checking it"):
                path, info = trt.ensure_engine(vdir, "fp16" if fp16 else "fp32", sizes)
            rows.append(_engine_row(path, info))
            notes.append(f"tensorrt: {path} (GPU: {info.get('spec', {}).get('gpu', '?')})")
        else:
            rows.append(["tensorrt", "fp16" if fp16 else "fp32", "", "", "", "", "skipped"])
            notes.append(f"tensorrt skipped: {why}")
    if as_json:
        cols = ("engine", "precision", "classes_agree", "logit_diff", "conf_diff", "size", "status")
        print_json({"version": res.report["version"], "engines": [dict(zip(cols, r)) for r in rows],
                    "onnx": str(res.path), "parity": res.report["parity"], "int8": int8, "notes": notes})
    else:
        _print_table(f"export of {res.report['version']}", rows)
    for line in notes:
        note(line, as_json)


def _int8(vdir: Path, frames: Optional[Path], console) -> dict:
    """Calibrate and check the version's INT8 graphs on `frames` (or the check images)."""
    from mas3_edge.bundle import read_meta
    from mas3_edge.export import quantize
    size = tuple(read_meta(vdir)["input_size"])
    with console.status("calibrating the INT8 graphs and checking them against fp32"):
        if frames is not None:
            return quantize.quantize_buffer(vdir, frames)
        from mas3_edge.export.parity import check_images
        images, source = check_images(size, n_random=0, n_frames=16)
        return quantize.quantize_version(vdir, images, source=f"16 {source} check images")


def _int8_row(entry: dict) -> list[str]:
    main = entry["graphs"][0]
    status = "written" if entry["passed"] else "failed parity: fp32 is served"
    return ["onnx int8", "int8", f"{main['parity']['agreement']:.4%}", "", "", f"{main['bytes'] / 1e6:.2f} MB", status]


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers like 1,8; got {text!r}")
    return sizes


def _fmt(check: dict | None) -> list[str]:
    if not check:
        return ["not checked", "", ""]
    logit = check.get("max_logit_diff")
    return [f"{check['class_agreement']:.4%}", "" if logit is None else f"{logit:.1e}", f"{check['max_conf_diff']:.1e}"]


def _onnx_row(res) -> list[str]:
    onnx = res.report["onnx"]
    check = res.report["parity"]["onnxruntime-cpu"]
    status = "reused" if res.reused else "written"
    return ["onnx", "fp32", *_fmt(check), f"{onnx['bytes'] / 1e6:.2f} MB", status]


def _engine_row(path: Path, info: dict) -> list[str]:
    spec = info.get("spec", {})
    return ["tensorrt", spec.get("precision", "?"), *_fmt(info.get("parity")),
            f"{path.stat().st_size / 1e6:.2f} MB", "ready"]


def _print_table(title: str, rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in ("engine", "precision", "classes agree", "logit diff", "conf diff", "size", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
