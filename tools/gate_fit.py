"""Fit the round's gate on the tuning half of a corpus of rounds (tools/gate_corpus.py) and judge it
once on the report half: every signal's AUROC for "harmful", the rules' error rates, the floors.

A round is harmful when it cost target mIoU (<= -0.5) or source mIoU (<= -1), good when it gained
target mIoU (>= +0.5) with the source within a point; the rest are neutral. A rule's two error
rates: the share of harmful rounds it accepts and the share of good rounds it rejects.

The rules, each chosen on the tuning half only:
- floors: today's checks (health signals within their tolerance, retained and source floors);
- fitted: a small logistic model of P(harmful) on the label-free features that separate harmful
  rounds on the tuning half (|AUROC - 0.5| >= 0.1) and whose scale is not the model's, at the
  operating point where at most 5 % of the tuning half's harmful rounds pass;
- floors + fitted: both must pass;
- + sentinel: the candidate also must gain a margin of mIoU on 8 labelled frames of the camera,
  and with them the fitted rule is held to a looser threshold of its own: the margin and that
  threshold are chosen together on the tuning half, the pair with which floors + fitted +
  sentinel lets no harmful tuning round through and rejects the fewest good ones (ties: the
  stricter pair).

    python tools/gate_fit.py --corpus docs/results/gate_corpus.json --out docs/results/gate_fit.json \\
        --rule mas3_edge/gate_rule.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from mas3_edge.bundle import atomic_write_json
from mas3_edge.decide import GateRule, features

HARM_TARGET, HARM_SOURCE, GOOD_TARGET = -0.5, -1.0, 0.5
MAX_HARM_ACCEPTED, MAX_GOOD_REJECTED, MAX_GOOD_REJECTED_SENTINEL = 0.05, 0.30, 0.20
SENTINEL_MARGINS = (-0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)  # mIoU points the candidate must gain
SENTINEL_THRESHOLDS = 41  # the fitted rule's thresholds tried with sentinel frames: quantiles of its tuning scores
SEPARATES = 0.1  # |AUROC - 0.5| on the tuning half for a feature to enter the fitted rule
# The shipped rule judges every model's rounds: a feature whose scale is the model's (a log-likelihood
# in D dimensions under its own prototypes) would place another model's rounds anywhere; the rest are
# shares, relative changes and differences of shares.
MODEL_SCALED = ("gmm_loglik_new", "gmm_loglik_delta")


def outcome(rec: dict) -> str:
    t, s = rec["effect"]["target"], rec["effect"]["source"]
    if t <= HARM_TARGET or s <= HARM_SOURCE:
        return "harmful"
    return "good" if t >= GOOD_TARGET and s >= HARM_SOURCE else "neutral"


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def matrix(recs: list[dict], names: list[str], fill: dict[str, float]) -> np.ndarray:
    rows = [features(r) for r in recs]
    return np.array([[fill[n] if row.get(n) is None else float(row[n]) for n in names] for row in rows])  # type: ignore[arg-type]


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1.0, iters: int = 50) -> tuple[np.ndarray, float]:
    """Ridge logistic regression by Newton's method on standardised inputs -> (weights, bias)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    reg = np.eye(len(w)) * ridge
    reg[-1, -1] = 0  # the bias is not shrunk
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(xb @ w, -60, 60)))
        grad = xb.T @ (p - y) + reg @ w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + reg
        w -= np.linalg.solve(hess, grad)
    return w[:-1], float(w[-1])


def rates(accept: np.ndarray, kinds: np.ndarray) -> dict:
    harm, good = kinds == "harmful", kinds == "good"
    return {"harmful_accepted": float(accept[harm].mean()) if harm.any() else float("nan"),
            "good_rejected": float((~accept[good]).mean()) if good.any() else float("nan"),
            "harmful": int(harm.sum()), "good": int(good.sum()), "neutral": int((kinds == "neutral").sum()),
            "accepted": int(accept.sum()), "rounds": int(len(accept))}


def floors_pass(rec: dict) -> bool:
    return bool(rec.get("checks")) and all(c["passed"] for c in rec["checks"] if c["kind"] in ("health", "gate"))


def sentinel_delta(rec: dict) -> float:
    return rec["after"]["sentinel"] - rec["before"]["sentinel"]


def fit(tuning: list[dict]) -> tuple[GateRule, dict]:
    """The fitted rule, chosen on the tuning half alone, and each feature's AUROC there."""
    names = sorted({k for r in tuning for k, v in features(r).items() if v is not None})
    kinds = np.array([outcome(r) for r in tuning])
    harm = kinds == "harmful"
    raw = {n: np.array([features(r).get(n) for r in tuning], dtype=object) for n in names}
    fill = {n: float(np.mean([v for v in raw[n] if v is not None])) for n in names}
    x = matrix(tuning, names, fill)
    aucs = {n: auroc(x[:, i], harm) for i, n in enumerate(names)}
    keep = [n for n in names if abs(aucs[n] - 0.5) >= SEPARATES and np.mean([v is not None for v in raw[n]]) >= 0.5
            and n not in MODEL_SCALED]
    cols = [names.index(n) for n in keep]
    mean, std = x[:, cols].mean(0), x[:, cols].std(0) + 1e-9
    w, b = fit_logistic((x[:, cols] - mean) / std, harm.astype(float))
    rule = GateRule(tuple(keep), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                    tuple(float(v) for v in w), b, 1.0)
    p = np.array([rule.harm(features(r)) for r in tuning])
    ph = np.sort(p[harm])
    k = int(np.floor(MAX_HARM_ACCEPTED * len(ph)))  # at most k harmful rounds may score below the threshold
    threshold = float(ph[k]) if len(ph) else 0.5
    return GateRule(rule.inputs, rule.mean, rule.std, rule.weights, rule.bias, threshold), aucs


def decisions(recs: list[dict], rule: GateRule) -> dict[str, np.ndarray]:
    floors = np.array([floors_pass(r) for r in recs])
    harm = np.array([rule.harm(features(r)) for r in recs])
    fitted = harm < rule.threshold
    out = {"floors": floors, "fitted": fitted, "floors + fitted": floors & fitted}
    if rule.sentinel_threshold is not None:
        sent = np.array([sentinel_delta(r) >= rule.sentinel_margin for r in recs])
        out.update({"floors + sentinel": floors & sent,
                    "floors + fitted + sentinel": floors & (harm < rule.sentinel_threshold) & sent})
    return out


def choose_sentinel(tuning: list[dict], rule: GateRule) -> GateRule:
    """`rule` with the sentinel margin and threshold chosen on the tuning half: no harmful round
    through floors + fitted + sentinel, then the fewest good rounds rejected, then the stricter pair
    (the larger margin, the lower threshold). The labels vouch for a round, so the fitted rule may
    let more through: on the tuning half a fixed threshold with a 0-point margin rejected 57 % of
    the good rounds."""
    harm = np.array([rule.harm(features(r)) for r in tuning])
    thresholds = sorted({*np.quantile(harm, np.linspace(0, 1, SENTINEL_THRESHOLDS)), rule.threshold})
    best = best_pair(tuning, rule, np.array([floors_pass(r) for r in tuning]), SENTINEL_MARGINS, thresholds)
    _, margin, t = best or (1.0, SENTINEL_MARGINS[-1], rule.threshold)  # none keeps every harmful round out: the strictest
    return replace(rule, sentinel_threshold=t, sentinel_margin=margin)


def best_pair(recs: list[dict], rule: GateRule, floors: np.ndarray, margins, thresholds) -> tuple[float, float, float] | None:
    """(good rejected, margin, threshold) of the pair with which floors + fitted + sentinel lets no
    harmful round of `recs` through and rejects the fewest good ones (ties: the larger margin, the
    lower threshold); None if no pair keeps every harmful round out."""
    kinds = np.array([outcome(r) for r in recs])
    harm = np.array([rule.harm(features(r)) for r in recs])
    delta = np.array([sentinel_delta(r) for r in recs])
    scored = []
    for margin in margins:
        for t in thresholds:
            acc = floors & (harm < t) & (delta >= margin)
            if not acc[kinds == "harmful"].any():
                scored.append((float((~acc[kinds == "good"]).mean()) if (kinds == "good").any() else 0.0, -margin, t))
    if not scored:
        return None
    rejected, neg_margin, t = min(scored)
    return rejected, float(-neg_margin), float(t)


def sentinel_bound(recs: list[dict], rule: GateRule) -> dict:
    """The fewest good rounds any sentinel rule of this family could reject on `recs` with no harmful
    round through, its margin, threshold and floors chosen with `recs`' own labels: an oracle's bound,
    not a result. The floors: all of them, the source floor alone, or none."""
    checks = {"all floors": floors_pass,
              "the source floor": lambda r: all(c["passed"] for c in r.get("checks", []) if c.get("signal") == "source"),
              "no floor": lambda r: True}
    harm = np.array([rule.harm(features(r)) for r in recs])
    thresholds = [*np.quantile(harm, np.linspace(0, 1, 81)), np.inf]
    out = {}
    for name, check in checks.items():
        best = best_pair(recs, rule, np.array([check(r) for r in recs]), np.arange(-1.0, 10.01, 0.25), thresholds)
        out[name] = None if best is None else dict(zip(("good_rejected", "margin", "threshold"), best))
    return out


def lost_gain(recs: list[dict], accept: np.ndarray) -> dict:
    """What the good rounds a rule rejects were worth: their share of all good rounds' target gain,
    and how many of them gained under 2 points."""
    good = np.array([outcome(r) == "good" for r in recs])
    gain = np.array([r["effect"]["target"] for r in recs])
    lost = good & ~accept
    return {"share_of_gain": float(gain[lost].sum() / gain[good].sum()) if good.any() else float("nan"),
            "rejected": int(lost.sum()), "rejected_under_2_points": int((lost & (gain < 2)).sum())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rule", type=Path, help="Write the fitted rule here (the file the runtime loads).")
    ap.add_argument("--paired", action="store_true", help="The corpus's rounds were scored frame by frame "
                    "(gate_corpus.py --keys): print each one's sentinel frames as a paired sample; fit nothing.")
    args = ap.parse_args(argv)
    recs = [r for r in json.loads(args.corpus.read_text())["rounds"] if "effect" in r]
    if args.paired:
        rows = paired(recs)
        atomic_write_json(args.out, {"corpus": str(args.corpus), "rounds": rows})
        return {"rounds": rows}
    halves = {h: [r for r in recs if r["half"] == h] for h in ("tuning", "report")}
    if len(halves["tuning"]) < 10:
        ap.error(f"{args.corpus} has {len(halves['tuning'])} scored tuning rounds; run tools/gate_corpus.py first")
    rule, aucs = fit(halves["tuning"])
    rule = choose_sentinel(halves["tuning"], rule)
    result: dict = {"corpus": str(args.corpus), "rule": rule.to_dict(),
                    "outcomes": {h: {k: sum(outcome(r) == k for r in rs) for k in ("harmful", "good", "neutral")}
                                 for h, rs in halves.items()},
                    "auroc": {}, "rules": {}, "roc": {}}
    for h, rs in halves.items():
        if not rs:
            continue
        kinds = np.array([outcome(r) for r in rs])
        fill = dict(zip(rule.inputs, rule.mean))
        names = sorted(aucs)
        x = matrix(rs, names, {n: fill.get(n, 0.0) for n in names})
        result["auroc"][h] = {n: auroc(x[:, i], kinds == "harmful") for i, n in enumerate(names)}
        result["auroc"][h]["fitted"] = auroc(np.array([rule.harm(features(r)) for r in rs]), kinds == "harmful")
        decided = decisions(rs, rule)
        result["rules"][h] = {name: rates(acc, kinds) for name, acc in decided.items()}
        for part, keep in SUBSETS.items():
            sub = np.array([keep(r) for r in rs])
            if sub.any():
                result["rules"][f"{h}, {part}"] = {name: rates(acc[sub], kinds[sub])
                                                   for name, acc in decided.items()}
        result["roc"][h] = roc(np.array([rule.harm(features(r)) for r in rs]), kinds)
        result.setdefault("sentinel_bound", {})[h] = sentinel_bound(rs, rule)
        result.setdefault("sentinel_lost_gain", {})[h] = lost_gain(rs, decided["floors + fitted + sentinel"])
    result["floors"] = {**floor_checks(result["rules"].get("report", {})),
                        **{f"{k} (bank rounds)": v for k, v in floor_checks(result["rules"].get("report, bank rounds", {})).items()}}
    report(result)
    atomic_write_json(args.out, result)
    if args.rule:
        note = f"fitted by tools/gate_fit.py on the tuning half of {args.corpus.name} ({len(halves['tuning'])} rounds)"
        atomic_write_json(args.rule, {**rule.to_dict(), "note": note})
    return result


def paired(recs: list[dict]) -> list[dict]:
    """Each round's sentinel frames as a paired sample (printed as a table): the mean of the frames'
    mIoU changes, its t statistic (mean over standard error) and how many frames improved."""
    rows = []
    for r in recs:
        d = np.array(r["after"]["sentinel_frames"]) - np.array(r["before"]["sentinel_frames"])
        se = float(d.std(ddof=1) / np.sqrt(len(d)))
        rows.append({"key": r["key"], "outcome": outcome(r), **{k: r["effect"][k] for k in ("target", "source", "sentinel")},
                     "frames_mean": float(d.mean()), "t": float(d.mean()) / se if se > 0 else float("nan"),
                     "improved": int((d > 0).sum()), "frames": len(d)})
    sys.stdout.write("| round | outcome | target | source | sentinel mIoU | frames' mean change | t | frames improved |\n"
                     "|---|---|---:|---:|---:|---:|---:|---:|\n")
    for w in sorted(rows, key=lambda w: (w["outcome"], -w["t"])):
        sys.stdout.write(f"| {w['key']} | {w['outcome']} | {w['target']:+.2f} | {w['source']:+.2f} | {w['sentinel']:+.2f} | "
                         f"{w['frames_mean']:+.2f} | {w['t']:+.2f} | {w['improved']} of {w['frames']} |\n")
    return rows


# the hard cases: rounds that kept the source set (a one-set round that loses the source is caught by
# the source floor alone); the 3-D looks (a source model that is partly right after the shift); the
# looped video (consecutive near-copies of frames)
SUBSETS = {"bank rounds": lambda r: r.get("set") != "one set",
           "3-D rounds": lambda r: r.get("target", "").startswith("r3d-"),
           "looped-video rounds": lambda r: r.get("target", "").startswith("loop:")}


def roc(harm: np.ndarray, kinds: np.ndarray, points: int = 11) -> list[dict]:
    """The fitted rule's error rates as its threshold moves: (threshold, harmful accepted, good rejected)."""
    out = []
    for t in np.quantile(harm, np.linspace(0, 1, points)):
        acc = harm < t
        r = rates(acc, kinds)
        out.append({"threshold": float(t), "harmful_accepted": r["harmful_accepted"], "good_rejected": r["good_rejected"]})
    return out


def floor_checks(report_rules: dict) -> dict:
    fitted, sent = report_rules.get("floors + fitted"), report_rules.get("floors + fitted + sentinel")
    if not fitted or not sent:
        return {}
    return {"fitted: harmful accepted <= 5%": fitted["harmful_accepted"] <= MAX_HARM_ACCEPTED,
            "fitted: good rejected <= 30%": fitted["good_rejected"] <= MAX_GOOD_REJECTED,
            "sentinel: no harmful accepted": sent["harmful_accepted"] == 0,
            "sentinel: good rejected <= 20%": sent["good_rejected"] <= MAX_GOOD_REJECTED_SENTINEL}


def report(result: dict) -> None:
    out = sys.stdout
    for h, counts in result["outcomes"].items():
        out.write(f"{h}: {counts}\n")
    out.write("\n| signal | AUROC tuning | AUROC report | in the fitted rule |\n|---|---|---|---|\n")
    inputs = set(result["rule"]["inputs"])
    for n in sorted(result["auroc"].get("tuning", {})):
        rep = result["auroc"].get("report", {}).get(n, float("nan"))
        out.write(f"| {n} | {result['auroc']['tuning'][n]:.2f} | {rep:.2f} | {'yes' if n in inputs else ''} |\n")
    out.write("\n| rule | half | harmful accepted | good rejected | accepted / rounds |\n|---|---|---|---|---|\n")
    for h, rules in result["rules"].items():
        for name, r in rules.items():
            out.write(f"| {name} | {h} | {r['harmful_accepted']:.0%} of {r['harmful']} | "
                      f"{r['good_rejected']:.0%} of {r['good']} | {r['accepted']} / {r['rounds']} |\n")
    for h, points in result["roc"].items():
        out.write(f"\nthe fitted rule's ROC on the {h} half (threshold: harmful accepted / good rejected): "
                  + ", ".join(f"{p['threshold']:.2f}: {p['harmful_accepted']:.0%}/{p['good_rejected']:.0%}" for p in points)
                  + f"; the rule's threshold is {result['rule']['threshold']:.2f}\n")
    r = result["rule"]
    out.write(f"\nwith sentinel frames (chosen on tuning): the candidate gains >= {r['sentinel_margin']:g} mIoU points "
              f"on them and the fitted rule's threshold is {r['sentinel_threshold']:.3f}\n")
    for h, lost in result.get("sentinel_lost_gain", {}).items():
        out.write(f"{h} half, floors + fitted + sentinel: the {lost['rejected']} good rounds rejected were "
                  f"{lost['share_of_gain']:.0%} of the good rounds' target gain; {lost['rejected_under_2_points']} "
                  f"of them gained under 2 points\n")
    for h, bound in result.get("sentinel_bound", {}).items():
        out.write(f"{h} half, an oracle's bound (margin, threshold and floors chosen with this half's labels), "
                  "good rejected with no harmful round through: " + ", ".join(
                      f"{name} {b['good_rejected']:.0%} (margin {b['margin']:g}, threshold {b['threshold']:.3f})"
                      if b else f"{name}: none" for name, b in bound.items()) + "\n")
    for name, ok in result["floors"].items():
        out.write(f"floor {name}: {'pass' if ok else 'FAIL'}\n")
    out.flush()


if __name__ == "__main__":
    main()
