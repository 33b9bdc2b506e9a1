"""Rebuild the default bundle shipped in the package (mas3_edge/default_bundle), from nothing.

    python tools/build_default_bundle.py

Fixed seeds throughout: the synthetic source split (seed 1, 600 scenes at 128x256), the tiny
model trained by our own trainer (seed 0, 1000 steps, the same as `mas3-edge demo`), prototypes at
tau 0.97 with the ATC threshold the device's accuracy estimate needs (fitted on 64 held-out source
scenes, seed 2), and the ONNX export with its parity check. The result replaces the packaged bundle.

    python tools/build_default_bundle.py --atc-only   # refit only the ATC threshold of the packaged bundle
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from mas3_edge import bundle, prototypes, synth, train
from mas3_edge.config import preset
from mas3_edge.data import open_dataset
from mas3_edge.signals import fit_atc

DEST = Path(__file__).resolve().parent.parent / "mas3_edge" / "default_bundle"


def add_atc(ver: bundle.Version, work: Path) -> float:
    """Store the ATC threshold with the prototypes, fitted on held-out source scenes: on the
    training scenes the accuracy, and so the threshold, is optimistic."""
    synth.write_folder(work / "heldout", "synthetic", 64, seed=2, size=ver.net.config.input_size)
    proto = prototypes.load(ver.prototypes_path, ver.meta)
    proto.meta["atc_threshold"] = fit_atc(ver.net, open_dataset(work / "heldout", size=ver.net.config.input_size))
    prototypes.save(proto, ver.prototypes_path, ver.meta["source_sha256"], proto.meta.get("source", "synth:synthetic"),
                    ver.net.labels)
    return proto.atc_threshold


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mas3-default-"))
    if sys.argv[1:] == ["--atc-only"]:
        print(f"ATC threshold {add_atc(bundle.load_version(DEST), work):.4f}", file=sys.stderr)
        shutil.rmtree(work)
        return
    cfg = preset("tiny")
    synth.write_folder(work / "source", "synthetic", 600, seed=1, size=cfg.input_size)
    ds = open_dataset(work / "source", size=cfg.input_size)
    train.train(ds, cfg, train.TrainConfig(steps=1000, seed=0), work / "bundle", work / "ckpt",
                source_name="synth:synthetic")
    ver = bundle.load_version(work / "bundle")
    proto = prototypes.fit(ver.net, ds)
    prototypes.save(proto, ver.prototypes_path, ver.meta["source_sha256"], "synth:synthetic")
    add_atc(ver, work)
    from mas3_edge.export.onnx import export_onnx
    export_onnx(work / "bundle")
    tmp = DEST.with_name(".default_bundle.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "versions").mkdir(parents=True)
    shutil.copytree(ver.path, tmp / "versions" / ver.id)
    (tmp / "SERVING").write_text(ver.id + "\n")
    shutil.rmtree(DEST, ignore_errors=True)
    tmp.rename(DEST)
    shutil.rmtree(work)
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"wrote {DEST} ({size / 1e6:.2f} MB): {', '.join(sorted(p.name for p in (DEST / 'versions' / ver.id).iterdir()))}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
