"""One adaptation round on a bundle: hold out the newest frames, adapt on the rest (MAS3 or a
baseline), judge the result on the held-out frames, and write it as a new, unserved version.
Never reads a label.

The judgement has two parts. The health signals (health.py) are the quantities adaptation
minimises, so they catch a round that diverged but can be gamed by one that drifts; the gate
signals (gate.py) are ones no method optimises: augmentation consistency, agreement with the
serving model on its confident pixels, and the source path's agreement with the source model.
A round is accepted only when both hold."""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import adapt, bundle as bundles, gate, health
from .baselines import run_baseline
from .config import AdaptConfig
from .errors import UserError
from .frames import load_frames
from .prototypes import load as load_prototypes

log = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.2  # of the frames, the newest, held out for the health check
MIN_FRAMES = 5  # fewer: nothing is held out, and the health check scores the adaptation frames


@dataclass
class RoundResult:
    accepted: bool
    reason: str
    version_dir: Path | None
    report: dict = field(repr=False)


def split_holdout(frames: np.ndarray, fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray, str]:
    """-> (frames to adapt on, held-out frames, what was held out). The held-out frames are one
    contiguous block, the last `fraction` in time: a buffer is a video, and a frame taken from
    between its neighbours is nearly a copy of them, so it would test nothing the round did not
    see. Below MIN_FRAMES nothing is held out ("none"), and a warning says so."""
    n = len(frames)
    if n < MIN_FRAMES:
        log.warning("only %d frames: none held out, the health check scores the adaptation frames "
                    "themselves (give the round at least %d)", n, MIN_FRAMES)
        return frames, frames, "none"
    held = max(1, round(n * fraction))
    return frames[:-held], frames[-held:], f"the last {held} of {n} frames in time (one contiguous block)"


def run_round(bundle, frames, cfg: AdaptConfig, version: str | None = None, guard: bool = True,
              limit: int | None = None, progress=None, device: str = "cpu") -> RoundResult:
    """Adapt a bundle version on unlabeled frames (a folder or an array) and write the result.

    The new version is written (not served) only when the unsupervised health signals on the
    held-out frames did not get worse, or `guard` is off."""
    base = bundles.load_version(bundle, version)
    proto = load_prototypes(base.prototypes_path, base.meta)
    if not isinstance(frames, np.ndarray):
        frames = load_frames(frames, base.net.config.input_size, limit)
    train, held, holdout = split_holdout(frames)
    serving = base.net.to(device)
    before = health.signals(serving, proto, held)
    consistency_before = gate.consistency(serving, held)
    net = bundles.load_version(bundle, base.id).net.to(device)  # a fresh copy to adapt
    chosen, steps = _adapt(net, proto, train, held, cfg, progress)
    finite = all(torch.isfinite(p).all() for p in net.state_dict().values() if p.is_floating_point())
    after = health.signals(net, proto, held) if finite else {k: float("nan") for k in before}
    gate_after = gate.gate_signals(serving, net, _source(bundle, base).to(device), held) if finite else {}
    ok, reason = judge(before, after, gate_after) if finite else (
        False, "weights are not finite after adaptation")
    report = {"parent": base.id, "config": cfg.to_dict(), "frames": {"adapt": len(train), "holdout": len(held)},
              "holdout": holdout, "set": chosen, "health_before": before, "health_after": after,
              "gate_before": {"consistency": consistency_before}, "gate_after": gate_after,
              "accepted": ok or not guard, "reason": reason, "warnings": _warnings(holdout, steps), **steps}
    vdir = None
    if ok or not guard:
        vdir = bundles.save_version(bundle, net.cpu(), parent=base, serve=False,
                                    info={"kind": "adapted", "method": cfg.method, "health": after,
                                          "health_parent": before, "reason": reason},
                                    files={"report.json": json.dumps(report, indent=2).encode()})
    return RoundResult(ok or not guard, reason, vdir, report)


def judge(before: dict, after: dict, gate_after: dict) -> tuple[bool, str]:
    ok, reason = health.accept(before, after)
    if not ok:
        return ok, reason
    return gate.gate_accept(gate_after)


def _source(bundle, base: bundles.Version):
    """The lineage's source model (the root of the parent chain), or `base` when it is not in the bundle."""
    vid, seen = base.id, set()
    while vid not in seen:
        seen.add(vid)
        try:
            parent = bundles.read_meta(bundles.resolve(bundle, vid)).get("parent")
        except UserError:  # a missing or unreadable ancestor: the oldest one found is the best we have
            break
        if not parent:
            return base.net if vid == base.id else bundles.load_version(bundle, vid).net
        vid = parent
    return base.net


def _adapt(net, proto, train: np.ndarray, held: np.ndarray, cfg: AdaptConfig, progress) -> tuple[str, dict]:
    """Adapt `net` in place with cfg.method -> (the normalisation set it adapted, the method's log)."""
    chosen = adapt.select_set(net, train, cfg.max_sets) if cfg.keep_source else "one set"
    if cfg.keep_source and chosen != "new":
        # a set seen before: its statistics pool this chunk with its past chunks, so a camera that
        # moves along a street builds one set of the whole street, not of its last stretch; its
        # steps start again from the source's affine parameters: steps compounded round after
        # round over-align (on four tuning targets three rounds of one domain lost 1.1-4.5 mIoU)
        if not cfg.compound:
            adapt.source_affine_to_working(net)
        if cfg.bn == "adapt":
            cfg = replace(cfg, bn_mix=cfg.refine_mix)
    elif cfg.bn == "adapt" and cfg.bn_mix < 1:  # mix with the SOURCE statistics: round after round
        adapt.source_stats_to_running(net)  # cannot walk away from the source
    if cfg.method not in ("mas3", "mas3-paper"):
        return chosen, run_baseline(net, train, cfg)
    if not cfg.choose or cfg.steps == 0 or cfg.bn != "adapt":
        return chosen, adapt.adapt(net, proto, train, cfg, progress)
    return chosen, _steps_or_statistics(net, proto, train, held, cfg, progress)


def _steps_or_statistics(net, proto, train: np.ndarray, held: np.ndarray, cfg: AdaptConfig, progress) -> dict:
    """The SWD steps must earn their place in every round: adapt two candidates, the statistics
    alone (zero steps) and the statistics plus the steps, and keep the steps only when their
    predictions on the held-out frames are more consistent under augmentation by at least
    cfg.choice_margin, a signal neither candidate optimised."""
    stats_only = copy.deepcopy(net)
    adapt.adapt(stats_only, proto, train, replace(cfg, steps=0))
    log = adapt.adapt(net, proto, train, cfg, progress)
    c_stats, c_steps = gate.consistency(stats_only, held), gate.consistency(net, held)
    keep_steps = c_steps >= c_stats + cfg.choice_margin
    if not keep_steps:
        net.load_state_dict(stats_only.state_dict())
    return {**log, "choice": {"kept": "steps" if keep_steps else "statistics only",
                              "consistency_steps": c_steps, "consistency_statistics": c_stats}}


def _warnings(holdout: str, steps: dict) -> list[str]:
    """What the report's reader must know about how far to trust the health check."""
    out = []
    if holdout == "none":
        out.append("no frame held out: the health signals were taken on the adaptation frames")
    if steps.get("all_pixel_steps"):
        out.append(f"{steps['all_pixel_steps']} steps had fewer than {adapt.MIN_CLASS_PIXELS} confident "
                   f"target pixels and matched all pixels instead")
    return out
