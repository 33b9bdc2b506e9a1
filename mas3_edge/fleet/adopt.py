"""A pulled set on trial: add it to the serving version's bank and judge the result with the same
round judgement the robot's own rounds face (rounds.judge_round: health, gate, the fitted rule and
the sentinel frames when configured), on the robot's own newest buffered frames. Accepted, it is
written as a new version (unserved: the caller exports it and moves the pointer).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import objects


def round_set(bundle: Path, version: str) -> dict[str, np.ndarray]:
    """The set a round adapted (its version's working set), by layer name."""
    from .. import bank, bundle as bundles
    net = bundles.load_version(bundle, version).net
    return {name: t.numpy() for name, t in bank.export_set(net).items()}


def round_figures(report: dict) -> dict:
    """What of a round's outcome travels with its set: the health and gate figures and the verdict."""
    keys = ("health_before", "health_after", "gate_after", "reason", "method")
    return {k: report[k] for k in keys if report.get(k) is not None}


def adopt_set(bundle: str | Path, frames: str | Path, version: str, object_path: str, entry: dict, adapt: dict, limit: int,
              threads: int = 1) -> dict:
    """Judge the set in `object_path` (verified by the caller) on `version`; a JSON-able outcome like a
    round's ("accepted" with the new version, or "rejected" with the reason)."""
    import torch
    torch.set_num_threads(threads)
    from .. import bank, bundle as bundles
    from ..config import round_configs
    from ..frames import load_frames
    from ..prototypes import load as load_prototypes
    from ..rounds import _source, judge_round, split_holdout
    from ..steps import freeze
    gpu = torch.cuda.is_available()
    cfg, rcfg, _ = round_configs(adapt, cpu=not gpu)
    data = Path(object_path).read_bytes()
    header, rows = objects.decode_set(data)
    bundle = Path(bundle)
    base = bundles.load_version(bundle, version)
    net = bundles.load_version(bundle, base.id).net
    try:
        bank.import_set(net, {k: torch.from_numpy(v.copy()) for k, v in rows.items()}, cfg.max_sets)
    except UserError as e:
        return {"outcome": "rejected", "reason": f"the set does not fit this network: {e}"}
    freeze(net)
    held = split_holdout(load_frames(Path(frames), base.net.config.input_size, limit), rcfg)[2]
    proto = load_prototypes(base.prototypes_path, base.meta)
    verdict = judge_round(base.net, net, _source(bundle, base), proto, held, rcfg)
    out = {"outcome": "accepted" if verdict["accepted"] else "rejected", "reason": verdict["reason"],
           **{k: verdict.get(k) for k in ("health_before", "health_after", "gate_after", "checks")}}
    if not verdict["accepted"]:
        return out
    origin = {"object": entry["object"], "robot": entry["robot"], "camera_id": header.get("camera_id")}
    report = {"parent": base.id, "method": "fleet", "fleet": origin, "frames": {"holdout": len(held)}, **verdict}
    vdir = bundles.save_version(bundle, net.cpu(), parent=base, serve=False,
                                info={"kind": "fleet", "fleet": origin, "health": verdict["health_after"],
                                      "health_parent": verdict["health_before"], "reason": verdict["reason"]},
                                files={"report.json": json.dumps(report, indent=2, default=str).encode()})
    return {**out, "version": vdir.name}
