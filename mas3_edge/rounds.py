"""One adaptation round on a bundle, the pipeline that `mas3-edge adapt` and the runtime's rounds
both run. Never reads a label.

    1. pick the set     the bank's set of this chunk's domain, or a new one (or the one set)
    2. candidates       the method's statistics, and its gradient steps on a copy
    3. choose           the steps only if they beat the statistics alone on held-out consistency
    4. judge            the health signals and the gate (and the sentinel frames, when the robot
                        has some), on another held-out block, the newest
    5. write            a new, unserved version with the round's report

A method is a composition of these parts: its step objective (STEPS) and its row of settings
(config.METHOD_DEFAULTS). mas3 re-estimates the statistics, steps on a copy with the class-conditional
SWD and chooses between the two; mas3-paper keeps the statistics and steps with the pooled SWD.

The judgement (decide.py) holds the round to every check, each recorded with its value and limit:
the health signals (health.py), which adaptation minimises, so they catch a round that diverged but
can be gamed by one that drifts; the gate signals (gate.py), which no method optimises; a fitted
gate when one is given; and the robot's sentinel frames when it has some."""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import adapt, bank, baselines, bundle as bundles, decide, gate, gmmhead, health, signals, stats
from .config import AdaptConfig, RoundConfig
from .cotta import cotta_steps
from .decide import Sentinel
from .errors import UserError
from .frames import load_frames
from .model import SegModel
from .parts import Parts
from .prototypes import Prototypes, load as load_prototypes
from .selftrain import selftrain
from .steps import freeze, gradient_steps

log = logging.getLogger(__name__)

UNGUARDED = RoundConfig(guard=False)  # benchmarks: write every round, judge it afterwards

Steps = Callable[[SegModel, Prototypes, np.ndarray, AdaptConfig, object], dict]
STEPS: dict[str, Steps | None] = {  # each method's step objective (None: statistics alone)
    "mas3": adapt.adapt,
    "mas3-paper": adapt.adapt,
    "tent": lambda net, _p, frames, cfg, progress: gradient_steps(net, frames, cfg, baselines.entropy, progress),
    "pseudo": lambda net, _p, frames, cfg, progress: gradient_steps(
        net, frames, cfg, baselines.self_training(cfg.pseudo_threshold), progress),
    "cotta": lambda net, _p, frames, cfg, progress: cotta_steps(net, frames, cfg, progress),
    "mas3-st": selftrain,
    "bn": None,
    "none": None,
}


@dataclass
class Candidate:
    name: str
    net: SegModel
    log: dict


@dataclass
class RoundResult:
    accepted: bool
    reason: str
    version_dir: Path | None
    report: dict = field(repr=False)


def run_round(bundle, frames, cfg: AdaptConfig, version: str | None = None, rcfg: RoundConfig = RoundConfig(), *,
              limit: int | None = None, progress=None, device: str = "cpu",
              pick: Callable[..., tuple[str, AdaptConfig]] | None = None, parts: Parts | None = None) -> RoundResult:
    """Adapt a bundle version on unlabeled frames (a folder or an array) and write the result as a
    new, unserved version when the round is accepted (or `rcfg.guard` is off). `pick` replaces
    step 1 (the benchmarks' ablations). The report's `parts` has each part's time and peak RSS."""
    parts = parts or Parts()
    with parts("load"):
        base = bundles.load_version(bundle, version)
        proto = load_prototypes(base.prototypes_path, base.meta)
        if not isinstance(frames, np.ndarray):
            frames = load_frames(frames, base.net.config.input_size, limit)
        sentinel = Sentinel(rcfg.sentinel, base.net) if rcfg.sentinel else None
        train, chooser, held, holdout = split_holdout(frames, rcfg)
        serving = base.net.to(device)
        net = bundles.load_version(bundle, base.id).net.to(device)  # a fresh copy to adapt
    with parts("adapt"):
        chosen, cfg = (pick or pick_set)(net, train, cfg)                       # 1
        cands = candidates(net, proto, train, cfg, progress)                   # 2
    with parts("judge"):
        winner, choice = choose(cands, chooser, cfg, rcfg)                     # 3
        verdict = judge_round(serving, winner.net, _source(bundle, base).to(device), proto, held, rcfg, sentinel,
                              plain=cands[0].net if winner is not cands[0] else None)               # 4
    accepted = verdict["accepted"] or not rcfg.guard
    report = {"parent": base.id, "method": cfg.method, "config": cfg.to_dict(), "round": rcfg.to_dict(),
              "frames": {"adapt": len(train), "choice": len(chooser), "holdout": len(held)}, "holdout": holdout,
              "set": chosen, **verdict, "accepted": accepted, "warnings": _warnings(holdout, cands[-1].log, cfg),
              **cands[-1].log, **({"choice": choice} if choice else {})}
    del cands, serving, net  # the loser's weights and its optimiser state go before the write
    with parts("write"):
        vdir = write(bundle, base, winner.net, {**report, "parts": parts.rows}) if accepted else None  # 5
    report["parts"] = parts.rows
    return RoundResult(accepted, report["reason"], vdir, report)


def split_holdout(frames: np.ndarray, rcfg: RoundConfig = RoundConfig()
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """-> (frames to adapt on, frames to choose on, frames to judge on, what was held out). Each
    held-out block is contiguous in time: the judged one the newest, the choice's the one before it
    (a buffer is a video: a frame taken from between its neighbours is nearly a copy of them).
    Below rcfg.min_frames nothing is held out ("none")."""
    n = len(frames)
    if n < rcfg.min_frames:
        log.warning("only %d frames: none held out, the health check scores the adaptation frames "
                    "themselves (give the round at least %d)", n, rcfg.min_frames)
        return frames, frames, frames, "none"
    held, pick = max(1, round(n * rcfg.holdout)), max(1, round(n * rcfg.choice_holdout))
    return (frames[:-held - pick], frames[-held - pick:-held], frames[-held:],
            f"the last {held} of {n} frames in time judge the round, the {pick} before them choose its candidate")


def pick_set(net: SegModel, frames: np.ndarray, cfg: AdaptConfig) -> tuple[str, AdaptConfig]:
    """Step 1: the normalisation set the round adapts -> (which, the config for the rest)."""
    if not cfg.keep_source:
        if cfg.bn == "adapt" and cfg.bn_mix < 1:  # mix with the SOURCE statistics: round after round
            bank.reset_statistics(net)  # cannot walk away from the source
        return "one set", cfg
    chosen = bank.select(net, frames, cfg.max_sets, cfg.same_domain)
    if chosen == "new":
        return chosen, cfg
    # a set seen before: its statistics pool this chunk with its past chunks, so a camera that moves
    # along a street builds one set of the whole street, not of its last stretch; its steps start
    # again from the source's affine parameters, since steps compounded round after round
    # over-align (on four tuning targets three rounds of one domain lost 1.1-4.5 mIoU)
    bank.reset_affine(net)
    return chosen, replace(cfg, bn_mix=cfg.refine_mix) if cfg.bn == "adapt" else cfg


def candidates(net: SegModel, proto: Prototypes, frames: np.ndarray, cfg: AdaptConfig, progress=None) -> list[Candidate]:
    """Step 2: the statistics (re-estimated when cfg.bn is "adapt"), then the method's steps, on a
    copy when the round chooses between the two. Each candidate ends frozen, in eval mode."""
    start = stats.snapshot(net)
    if cfg.bn == "adapt":
        stats.reestimate(net, frames, cfg.bn_mix)
    plain = Candidate("statistics only" if cfg.bn == "adapt" else "unchanged", net, {"steps": []})
    step = STEPS[cfg.method]
    out = [plain]
    if step is not None and cfg.steps > 0:
        stepped = copy.deepcopy(net) if cfg.choose else net
        try:
            log_ = step(stepped, proto, frames, cfg, progress)
        except adapt.TooFewSamples as e:  # raised before any step: a classifier rarely that sure of the GMM
            log.warning("%s: the round keeps the statistics alone", e)
            plain.log = {"steps": [], "fallback": f"{e}: the round kept the statistics alone"}
            out = [plain]
        else:
            if cfg.bn == "adapt":
                stats.settle(stepped, frames, start, cfg.bn_mix)
            out = ([plain] if cfg.choose else []) + [Candidate("steps", stepped, log_)]
    for c in out:
        gmmhead.install(c.net, proto, cfg.gmm_weight)
        if c.net.gmm is not None:  # before mark_source: a one-set model's only set carries the means
            c.log.update(gmmhead.adapt_means(c.net, frames, cfg))
        if not cfg.keep_source:  # one set, no per-frame routing: the baselines as published
            bank.mark_source(c.net)
        freeze(c.net)
    return out


def choose(cands: list[Candidate], held: np.ndarray, cfg: AdaptConfig,
           rcfg: RoundConfig = RoundConfig()) -> tuple[Candidate, dict | None]:
    """Step 3: the steps must earn their place in every round: kept only when their predictions on
    the held-out frames are more consistent under augmentation by at least cfg.choice_margin, a
    signal neither candidate optimised."""
    if len(cands) == 1:
        return cands[0], None
    plain, stepped = cands
    c_plain = gate.consistency(plain.net, held, rcfg.consistency_frames)
    c_steps = gate.consistency(stepped.net, held, rcfg.consistency_frames)
    winner = stepped if c_steps >= c_plain + cfg.choice_margin else plain
    return winner, {"kept": winner.name, "consistency_steps": c_steps, "consistency_statistics": c_plain}


def judge_round(serving: SegModel, net: SegModel, source: SegModel, proto: Prototypes, held: np.ndarray,
                rcfg: RoundConfig = RoundConfig(), sentinel: Sentinel | None = None,
                plain: SegModel | None = None) -> dict:
    """Step 4: the health signals before and after, the gate signals, the sentinel frames' mIoU
    when there are some, and the verdict with every check that made it. The label-free signals of
    signals.py are recorded beside them (`plain`: the candidate the choice did not keep)."""
    before = health.signals(serving, proto, held)
    out = {"health_before": before, "gate_before": {"consistency": gate.consistency(serving, held, rcfg.consistency_frames)},
           "used_labels": sentinel is not None}
    if not all(torch.isfinite(p).all() for p in net.state_dict().values() if p.is_floating_point()):
        return {**out, "health_after": {k: float("nan") for k in before}, "gate_after": {}, "checks": [],
                "accepted": False, "reason": "weights are not finite after adaptation"}
    after = health.signals(net, proto, held)
    gate_after = gate.gate_signals(serving, net, source, held, rcfg)
    checks = decide.health_checks(before, after, rcfg.health_tolerance) + decide.gate_checks(gate_after, rcfg)
    out.update(health_after=after, gate_after=gate_after, signals=signals.round_signals(serving, net, held, proto,
                                                                                       plain=plain))
    rule = decide.GateRule.load(decide.rule_path(rcfg.gate_rule)) if rcfg.gate_rule != "none" else None
    if rule is not None:
        checks.append(rule.check(out, sentinel=sentinel is not None))
    if sentinel is not None:
        scores = {"frames": len(sentinel), "serving_miou": sentinel.miou(serving), "new_miou": sentinel.miou(net)}
        margin = rcfg.sentinel_margin
        if margin is None:  # the rule's, chosen with its sentinel threshold
            margin = rule.sentinel_margin if rule else 0.0
        checks.append(decide.sentinel_check(scores["serving_miou"], scores["new_miou"], margin, len(sentinel)))
        out["sentinel"] = scores
    ok, reason = decide.verdict(checks)
    return {**out, "checks": decide.describe(checks), "accepted": ok, "reason": reason}


def judge(before: dict, after: dict, gate_after: dict, rcfg: RoundConfig = RoundConfig()) -> tuple[bool, str]:
    """The verdict on a round's figures: the health check, then the gate."""
    ok, reason = health.accept(before, after, rcfg.health_tolerance)
    if not ok:
        return ok, reason
    return gate.gate_accept(gate_after, rcfg)


def write(bundle, base: bundles.Version, net: SegModel, report: dict) -> Path:
    """Step 5: the adapted network as a new version of the bundle (not served), with its report."""
    return bundles.save_version(bundle, net.cpu(), parent=base, serve=False,
                                info={"kind": "adapted", "method": report["method"], "health": report["health_after"],
                                      "health_parent": report["health_before"], "reason": report["reason"],
                                      "decided_by": decide.summary(report.get("checks") or []),
                                      "used_labels": report.get("used_labels", False)},
                                files={"report.json": json.dumps(report, indent=2, default=str).encode()})


def _source(bundle, base: bundles.Version) -> SegModel:
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


def _warnings(holdout: str, steps: dict, cfg: AdaptConfig) -> list[str]:
    """What the report's reader must know about how far to trust the health check."""
    out = []
    if holdout == "none":
        out.append("no frame held out: the health signals were taken on the adaptation frames")
    if steps.get("fallback"):
        out.append(steps["fallback"])
    if steps.get("all_pixel_steps"):
        out.append(f"{steps['all_pixel_steps']} steps had fewer than {cfg.min_class_pixels} confident "
                   f"target pixels and matched all pixels instead")
    return out
