"""Bring your own model: `import` turns a trained state dict into a bundle's first version."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from .core import NewBundleOpt, JsonOpt, note, print_json

ArchOpt = Annotated[str, typer.Option(
    "--arch", help="tiny | edge (built in), torchvision:NAME, smp:ARCH:ENCODER or python:package.module:factory.")]
LabelsOpt = Annotated[Optional[Path], typer.Option(
    "--labels", help="Labels file (docs/labels/cityscapes19.json format); default: Cityscapes-19.")]
SizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", help="HxW the runtime resizes frames to, e.g. 256x512 (default: the architecture's).")]


def parse_size(text: Optional[str]) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--input-size {text!r}: write it as HxW, e.g. 256x512") from None
    return h, w


def import_cmd(
    arch: ArchOpt,
    weights: Annotated[Path, typer.Option("--weights", help="The trained state dict: .safetensors, or .pt/.pth "
                                                            "(read with torch.load(weights_only=True), never unpickled).")],
    labels: LabelsOpt = None,
    bundle: NewBundleOpt = Path("bundle"),
    input_size: SizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make an already trained model the first version of a new bundle, without training."""
    from .. import arch as archs, bundle as bundles, labels as label_sets
    if bundles.version_ids(bundle):
        raise UserError(f"bundle {bundle} already has versions; import into a new --bundle directory")
    label_set = label_sets.load_labels(labels)
    cfg = archs.model_config(arch, label_set, parse_size(input_size))
    net = archs.build(cfg, label_set)
    archs.import_weights(net, archs.read_weights(weights), str(weights))
    info = {"kind": "imported", "weights": str(weights), "weights_sha256": bundles.sha256_file(weights)}
    vdir = bundles.save_version(bundle, net.eval(), info=info)
    if as_json:
        print_json({"version": vdir.name, "path": str(vdir), "arch": arch, "label_set": label_set.id,
                    "classes": label_set.num_classes, "embed_dim": cfg.embed_dim})
    note(f"wrote {vdir} (serving): {arch}, {label_set.num_classes} classes ({label_set.id}), D = {cfg.embed_dim}; "
         f"next: mas3-edge prototypes --bundle {bundle} --data SOURCE_DATA", as_json)


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
