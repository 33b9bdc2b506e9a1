"""The verdict on a round: every check it had to pass, with the value it scored and the limit it
was held to, so that `adapt --json`, report.json, `versions` and the runtime's events can say which
signals decided it.

Three kinds of check, in the order they are applied:
- health: the signals adaptation minimises (health.py) must not get worse by more than the
  tolerance; they catch a round that diverged;
- gate: signals no method optimises (gate.py): the share of the serving model's confident pixels
  that kept their label, and the source path's agreement with the source model;
- labels: with sentinel frames (a few labelled frames of the robot's own camera), the candidate's
  mIoU on them must beat the serving model's by a margin. A decision that used them says so. With
  them the fitted gate is held to its own, looser threshold: both were chosen together on the
  tuning half of the gate corpus (tools/gate_fit.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import RoundConfig
from .health import SIGNALS


@dataclass(frozen=True)
class Check:
    signal: str
    kind: str  # health | gate | labels
    value: float
    limit: float
    passed: bool
    message: str  # why it failed, in words ("" when it passed)

    def to_dict(self) -> dict:
        return asdict(self)


def health_checks(before: dict, after: dict, tolerance: float) -> list[Check]:
    """Each health signal (lower is better) against its value before, `tolerance` relative."""
    out = []
    for name in SIGNALS:
        b, a = before[name], after[name]
        limit = b * (1 + tolerance) + 1e-6
        ok = math.isfinite(a) and a <= limit
        why = "" if ok else (f"{name} is not finite after adaptation" if not math.isfinite(a)
                             else f"{name} got worse: {b:.4f} -> {a:.4f}")
        out.append(Check(name, "health", a, limit, ok, why))
    return out


def gate_checks(gate_after: dict, rcfg: RoundConfig) -> list[Check]:
    """`retained` and `source` (higher is better) against their floors."""
    r, s = gate_after["retained"], gate_after["source"]
    return [Check("retained", "gate", r, rcfg.retained_floor, r >= rcfg.retained_floor,
                  "" if r >= rcfg.retained_floor else
                  f"only {r:.0%} of the confident pixels kept their label (floor {rcfg.retained_floor:.0%})"),
            Check("source", "gate", s, rcfg.source_floor, s >= rcfg.source_floor,
                  "" if s >= rcfg.source_floor else
                  f"the source path changed: {s:.1%} pixel agreement (floor {rcfg.source_floor:.0%})")]


def sentinel_check(serving_miou: float, new_miou: float, margin: float, frames: int) -> Check:
    """The candidate's mIoU on the sentinel frames against the serving model's plus `margin` points."""
    limit = serving_miou + margin
    ok = math.isfinite(new_miou) and new_miou >= limit
    return Check("sentinel_miou", "labels", new_miou, limit, ok,
                 "" if ok else f"not better enough on the {frames} sentinel frames: mIoU {serving_miou:.1f} -> "
                               f"{new_miou:.1f} (must gain {margin:g})")


def verdict(checks: list[Check]) -> tuple[bool, str]:
    """Accepted when every check passed; else the first failure, in the order health, gate, labels."""
    failed = next((c for c in checks if not c.passed), None)
    if failed is not None:
        return False, failed.message
    kinds = {c.kind for c in checks}
    return True, "health signals and gate held" + (", and the sentinel frames" if "labels" in kinds else "")


class Sentinel:
    """A few labelled frames of the robot's own camera (a folder: images/ + labels/ in the model's
    label set), scored with each candidate. The only labels a round ever reads."""

    def __init__(self, folder: str | Path, net):
        from .data import open_dataset
        self.folder = str(folder)
        self.data = open_dataset(folder, size=tuple(net.config.input_size), label_set=net.labels)
        if len(self.data) == 0:
            from .errors import UserError
            raise UserError(f"the sentinel folder {folder} has no labelled frames")

    def __len__(self) -> int:
        return len(self.data)

    def miou(self, net) -> float:
        from .evaluate import evaluate
        value = evaluate(net, self.data)["miou"]
        return float("nan") if value is None else float(value)


def describe(checks: list[Check]) -> list[dict]:
    return [c.to_dict() for c in checks]


def summary(checks: list[dict]) -> str:
    """What decided a round, in one short line: the check that failed, or the gate's and the
    labels' figures against their limits ("retained 0.62>=0.30, source 1.00>=0.97")."""
    failed = [c for c in checks if not c["passed"]]
    shown = failed[:1] or [c for c in checks if c["kind"] != "health"]
    return ", ".join(f"{c['signal']} {c['value']:.2f}{'<' if c['kind'] != 'health' else '>'}{c['limit']:.2f}"
                     if not c["passed"] else f"{c['signal']} {c['value']:.2f}>={c['limit']:.2f}" for c in shown)




# --- a gate fitted on a corpus of rounds with known outcomes (tools/gate_fit.py), stored as data

SHIPPED_RULE = Path(__file__).resolve().parent / "gate_rule.json"


def rule_path(name: str) -> Path:
    """RoundConfig.gate_rule -> its file ("shipped": the packaged one)."""
    return SHIPPED_RULE if name == "shipped" else Path(name)


def features(report: dict) -> dict[str, float | None]:
    """The inputs of a fitted rule, from a round's report (or a corpus record): each health
    signal's relative change, the gate signals, consistency's change, and signals.py's values."""
    hb, ha = report.get("health_before") or {}, report.get("health_after") or {}
    gb, ga = report.get("gate_before") or {}, report.get("gate_after") or {}
    out: dict[str, float | None] = {
        f"{k}_change": (ha[k] - hb[k]) / max(abs(hb[k]), 1e-6) if k in ha and k in hb else None for k in SIGNALS}
    out["retained"], out["source"] = ga.get("retained"), ga.get("source")
    out["consistency_delta"] = ga["consistency"] - gb["consistency"] if "consistency" in ga and "consistency" in gb \
        else None
    out.update(report.get("signals") or {})
    return {k: (v if v is None or math.isfinite(v) else None) for k, v in out.items()}


@dataclass(frozen=True)
class GateRule:
    """P(harmful) = sigmoid(bias + Σ w_i (x_i - mean_i) / std_i); a round passes when it is below
    `threshold`, or below `sentinel_threshold` when sentinel frames must also vouch for it (by
    `sentinel_margin` mIoU points). An input a round could not compute takes its mean (a neutral value)."""

    inputs: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float
    sentinel_threshold: float | None = None
    sentinel_margin: float = 0.0
    note: str = ""

    def harm(self, x: dict[str, float | None]) -> float:
        z = self.bias
        for k, m, s, w in zip(self.inputs, self.mean, self.std, self.weights):
            v = x.get(k)
            z += w * ((m if v is None else float(v)) - m) / s
        return float(1 / (1 + math.exp(-max(-60.0, min(60.0, z)))))

    def check(self, report: dict, sentinel: bool = False) -> Check:
        p = self.harm(features(report))
        limit = self.sentinel_threshold if sentinel and self.sentinel_threshold is not None else self.threshold
        ok = p < limit
        return Check("fitted_gate", "gate", p, limit, ok,
                     "" if ok else f"the fitted gate puts its chance of harm at {p:.0%} (limit {limit:.0%})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> GateRule:
        import json

        from .errors import UserError
        try:
            d = json.loads(Path(path).read_text())
            return cls(**{**d, **{k: tuple(d[k]) for k in ("inputs", "mean", "std", "weights")}})
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"cannot read the gate rule {path}: {e}") from None
