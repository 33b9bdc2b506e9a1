"""The factory → device workflow: train, prototypes, adapt, eval, and the end-to-end demo."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import AdaptConfig, RoundConfig, round_configs
from ..errors import UserError
from .options import with_settings

BundleOpt = Annotated[Optional[Path], typer.Option(
    "--bundle", "-b", help="Bundle directory (versions + SERVING pointer); default: the packaged one.")]
NewBundleOpt = Annotated[Path, typer.Option("--bundle", "-b", help="Bundle directory to create or extend.")]
VersionOpt = Annotated[Optional[str], typer.Option("--version", help="Version id; default: the serving one.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts), not a table.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")]
DataKind = Annotated[str, typer.Option("--kind", help="Dataset layout: folder, cityscapes, gta5, synthia, acdc[-fog|-night|-rain|-snow] or dark-zurich[-twilight|-day].")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is usable; use --device cpu")
    return name


def _bundle(path: Optional[Path]) -> Path:
    from ..bundle import user_bundle
    return user_bundle(path)


def table(title: str, columns: list[str], rows: list[list]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r])
    # piped output has no terminal width: print whole cells rather than cut them to 80 columns
    Console(width=None if sys.stdout.isatty() else 1000).print(t)


def print_json(payload) -> None:
    """The one JSON document a `--json` command prints on stdout."""
    import json
    typer.echo(json.dumps(payload, indent=2, default=str))


def note(text: str, as_json: bool = False) -> None:
    """A human line: on stdout, or on stderr when stdout carries JSON."""
    typer.echo(text, err=as_json)


def set_verbose(verbose: bool) -> None:
    import logging
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def train_cmd(
    data: Annotated[Path, typer.Option("--data", help="Labelled source data (images/ + labels/).")],
    bundle: NewBundleOpt = Path("bundle"),
    kind: DataKind = "folder",
    arch: Annotated[str, typer.Option("--arch", help="tiny | edge (built in), torchvision:NAME, smp:ARCH:ENCODER "
                                                     "or python:package.module:factory.")] = "tiny",
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", help="Labels file (docs/labels/cityscapes19.json format); default: Cityscapes-19.")] = None,
    input_size: Annotated[Optional[str], typer.Option(
        "--input-size", help="HxW the model is trained and served at (default: the architecture's).")] = None,
    preset: Annotated[Optional[str], typer.Option(hidden=True, help="Old spelling of --arch tiny|edge.")] = None,
    steps: int = 1500, batch_size: int = 8, lr: float = 2e-3, seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train the source model (Eq. 1) and write the bundle's first version."""
    from .. import arch as archs, data as datasets, labels as label_sets, train
    from .models import parse_size
    label_set = label_sets.load_labels(labels)
    mcfg = archs.model_config(preset or arch, label_set, parse_size(input_size))
    ds = datasets.open_dataset(data, kind=kind, split="train", label_set=label_set)
    vdir = train.train(ds, mcfg, train.TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed),
                       bundle, bundle / "checkpoint", resume=resume, device=_device(device), source_name=str(data),
                       labels=label_set)
    if vdir is None:  # a torchrun rank other than 0: rank 0 wrote the version and reports it
        return
    typer.echo(f"wrote {vdir} (serving); next: mas3-edge prototypes --bundle {bundle} --data {data}")


def prototypes_cmd(
    data: Annotated[Path, typer.Option("--data", help="The labelled source data the model was trained on.")],
    bundle: BundleOpt = None, version: VersionOpt = None, kind: DataKind = "folder",
    tau: Annotated[float, typer.Option(help="Confidence threshold of the support sets (Eq. 3).")] = 0.97,
    min_count: Annotated[int, typer.Option(help="Pixels a class needs before τ is lowered for it.")] = 100,
    device: DeviceOpt = "auto",
    covariance: Annotated[str, typer.Option(help="How Σ is stored: auto (full for D ≤ 64, lowrank to "
                                                 "1024, diag beyond), full, lowrank or diag.")] = "auto",
) -> None:
    """Fit the class-prototype GMM in one pass over the source data and store it in the version."""
    bundle = _bundle(bundle)
    from .. import bundle as bundles, data as datasets, prototypes
    ver = bundles.load_version(bundle, version)
    labels = ver.net.labels
    ds = datasets.open_dataset(data, kind=kind, split="train", size=ver.net.config.input_size, label_set=labels)
    proto = prototypes.fit(ver.net, ds, tau=tau, min_count=min_count, device=_device(device),
                           covariance=covariance)
    from ..dist import is_main
    if not is_main():  # torchrun: every rank fitted the same GMM; rank 0 alone writes and reports it
        return
    from ..signals import fit_atc  # the device's accuracy estimate (ATC) needs this source threshold
    proto.meta["atc_threshold"] = fit_atc(ver.net, ds)
    prototypes.save(proto, ver.prototypes_path, ver.meta["source_sha256"], str(data), labels)
    handling = proto.meta["handling"]
    table(f"prototypes of {ver.id} (τ = {tau}, {proto.structure} covariance, label set {labels.id}, "
          f"ATC threshold {proto.atc_threshold:.4f})",
          ["class", "pixels", "α", "note"],
          [[c, int(proto.counts[j]), float(proto.alpha[j]), handling.get(c, "")] for j, c in enumerate(labels.names)])
    typer.echo(f"wrote {ver.prototypes_path} ({ver.prototypes_path.stat().st_size / 1024:.1f} KB)")


@with_settings(AdaptConfig, RoundConfig)
def adapt_cmd(
    buffer: Annotated[Path, typer.Option(
        "--buffer", help="Folder of unlabeled target frames, or a ROS bag (FOLDER, .bag, .mcap, .db3; "
                         "?topic=/NAME picks the image topic).")] = Path("frames"),
    bundle: BundleOpt = None, version: VersionOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the newest N frames.")] = None,
    serve: Annotated[bool, typer.Option(help="Serve the new version when accepted.")] = True,
    as_json: JsonOpt = False, verbose: VerboseOpt = False, settings: Optional[dict] = None,
) -> None:
    """Run one source-free adaptation round on unlabeled frames; write a new version.

    Exits 3 when the health check or the gate rejects the round (nothing is served then)."""
    set_verbose(verbose)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    cfg, rcfg, _ = round_configs(settings or {})
    bundle = _bundle(bundle)
    from .. import bundle as bundles, rounds
    res = rounds.run_round(bundle, buffer, cfg, version, rcfg, limit=limit)
    rep = res.report
    if res.accepted and serve:
        assert res.version_dir is not None, "an accepted round wrote its version"
        bundles.set_serving(bundle, res.version_dir.name)
    if as_json:
        print_json({"accepted": res.accepted, "reason": res.reason, "serving": bool(res.accepted and serve),
                    "version": res.version_dir.name if res.version_dir else None, **{
                        k: rep.get(k) for k in ("method", "set", "choice", "frames", "health_before", "health_after",
                                                "gate_before", "gate_after", "sentinel", "used_labels", "checks",
                                                "warnings")}})
    else:
        kept = f", kept: {rep['choice']['kept']}" if rep.get("choice") else ""
        table(f"adaptation round ({cfg.method}, {len(rep.get('steps', []))} steps{kept}, {rep['frames']['adapt']} "
              f"frames, {rep['frames']['choice']} to choose, {rep['frames']['holdout']} to judge, normalisation set: {rep['set']})",
              ["signal", "before", "after"],
              [[f"{k} (lower is better)", rep["health_before"][k], rep["health_after"][k]] for k in rep["health_before"]]
              + [[f"gate: {k}", rep["gate_before"].get(k, "-"), v] for k, v in rep["gate_after"].items()]
              + ([["sentinel mIoU (labels)", rep["sentinel"]["serving_miou"], rep["sentinel"]["new_miou"]]]
                 if rep.get("sentinel") else []))
    if not res.accepted:
        note(f"rejected: {res.reason}; the serving version is unchanged", as_json)
        from . import EXIT_REJECTED
        raise typer.Exit(EXIT_REJECTED)
    note(f"accepted: wrote {res.version_dir}{' (serving)' if serve else ''}; report in report.json", as_json)


def eval_cmd(
    data: Annotated[Path, typer.Option("--data", help="Labelled folder (images/ + labels/).")],
    bundle: BundleOpt = None, version: VersionOpt = None, kind: DataKind = "folder",
    split: str = "val",
    json_out: Annotated[Optional[Path], typer.Option("--out", help="Write the figures as a JSON file here.")] = None,
    overlays: Annotated[Optional[Path], typer.Option(help="Write colour overlays (image | truth | prediction).")] = None,
    subset: Annotated[Optional[str], typer.Option(
        help="Score a class subset only: synthia16 or synthia13 (SYNTHIA's usual protocols).")] = None,
    as_json: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Evaluate a version: per-class IoU, mIoU and pixel accuracy, by the names of its label set."""
    from ..labels import LABEL_SET_ID, SUBSETS
    if subset is not None and (subset not in SUBSETS or subset == LABEL_SET_ID):
        raise UserError(f"--subset must be synthia16 or synthia13, got {subset!r}")
    set_verbose(verbose)
    bundle = _bundle(bundle)
    from .. import bundle as bundles, data as datasets
    from ..bundle import atomic_write_json
    from ..evaluate import evaluate
    ver = bundles.load_version(bundle, version)
    labels = ver.net.labels
    if subset is not None and labels.id != LABEL_SET_ID:
        raise UserError(f"--subset {subset} scores Cityscapes-19 classes but {ver.id} predicts label set "
                        f"{labels.id!r} ({labels.num_classes} classes); drop --subset")
    classes = len(SUBSETS[subset]) if subset else None
    ds = datasets.open_dataset(data, kind=kind, split=split, classes=classes, label_set=labels)
    res = evaluate(ver.net, ds, overlays=overlays)
    figures = {"version": ver.id, "data": str(data), **res}
    if json_out:
        atomic_write_json(json_out, figures)
    if as_json:
        return print_json(figures)
    rows = [[c, v if v is not None else "-"] for c, v in res["per_class_iou"].items()]
    table(f"{ver.id} on {data} ({res['images']} images, label set {labels.id})", ["class", "IoU"],
          rows + [["mIoU", res["miou"]], ["pixel accuracy", res["pixel_accuracy"]]])


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Work folder for data, bundle and results.")] = Path("demo"),
    target: Annotated[str, typer.Option(help="Target domain: realistic, night, fog or rain.")] = "realistic",
    train_steps: int = 1000, n_train: int = 600, n_adapt: int = 300, n_val: int = 100, seed: int = 0,
    compare: Annotated[Optional[list[str]], typer.Option(help="Also run these methods (e.g. bn, tent).")] = None,
) -> None:
    """From nothing: generate data, train, fit prototypes, adapt to a target, evaluate on held-out frames."""
    from ..demo import DemoConfig, run
    from ..synth import DOMAINS
    if target not in DOMAINS or target == "synthetic":
        raise UserError(f"--target must be one of {[d for d in DOMAINS if d != 'synthetic']}, got {target!r}")
    methods = tuple(compare or ()) + ("mas3",)
    cfg = DemoConfig(target=target, n_train=n_train, n_val=n_val, n_adapt=n_adapt, train_steps=train_steps,
                     seed=seed, methods=methods)
    summary = run(out, cfg, log=typer.echo)
    res = summary["results"]
    base = res["source-only"]
    table(f"synthetic → {target}: mIoU on held-out splits ({summary['seconds']:.0f} s in all)",
          ["model", f"{target} mIoU", "gain", "source mIoU", "source change"],
          [[name, r["target_miou"], r["target_miou"] - base["target_miou"], r["source_miou"],
            r["source_miou"] - base["source_miou"]] for name, r in res.items()])
    typer.echo(f"wrote {out / 'demo.json'} and {out / 'demo_grid.png'} (image | truth | source-only | adapted)")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
    app.command("train")(train_cmd)
    app.command("prototypes")(prototypes_cmd)
    app.command("adapt")(adapt_cmd)
    app.command("eval")(eval_cmd)
