"""Continual stream: adapt again and again on realistic → fog → night → rain, and watch for slow collapse.

Each chunk of labelled frames is first predicted by the current model (prequential mIoU: the labels
are used for scoring only), then adapted on with `rounds.run_round` as the runtime
does it: an accepted round becomes the current model, a rejected or failed one keeps it. After every
round the current model is scored on the source and on each domain's held-out split. Every adapting
row is compared with source-only on the same chunks; "mas3 (reset every round)" starts each round
from the source version. Floors (issue 3), checked for every row and printed for the default mas3:

  (a) no round's mean prequential mIoU is more than 1 point below source-only's,
  (b) the last round is not below the first: its gain over source-only (same chunks, so harder scenes
      in one round are not mistaken for collapse) is at least round 1's,
  (c) source mIoU after the whole stream is at most 2 points below the source model's.

    python tools/bench_continual.py --preset small --out bench_continual.json --plot bench_continual.png
    python tools/bench_continual.py --preset full --device cuda --out c.json --plot c.png
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from mas3_edge import bundle, health, rounds
from mas3_edge.config import AdaptConfig
from mas3_edge.errors import UserError
from mas3_edge.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script, or loaded by path from the tests
import bench_quality as bq

SPLITS = {"tuning": ("realistic", "fog", "night", "rain"),  # the stream every default was chosen on
          # shift families no choice has seen (bench_quality.SPLITS["report"] less one)
          "report": (bq.CAMERA, "realistic+snow@3", "realistic+frost@3", "realistic+contrast@4")}
DOMAINS = SPLITS["tuning"]
STREAM_SEED = 100  # chunk k renders scenes of seed 100 + k: disjoint from the Setup's splits (seeds 1–4)
DEFAULTS = {"small": dict(chunk=40, steps=50), "full": dict(chunk=100, steps=100), "smoke": dict(chunk=2, steps=1)}
RESET = {"mas3 (reset every round)": "mas3"}  # row -> the row it runs, from the source version every round
ROWS = {"source-only": dict(method="none"),
        **{k: bq.METHODS[k] for k in ("bn", "tent", "pseudo", "mas3-paper", "mas3 (gentle steps)",
                                      "mas3 (steps compound)", "mas3")},
        **{k: bq.METHODS[v] for k, v in RESET.items()},
        "mas3 (one adapted set)": dict(method="mas3", max_sets=1)}  # as before the bank: the bank's worth
MAX_ROUND_GAP, MAX_SOURCE_DROP = 1.0, 2.0  # floors (a) and (c), in mIoU points
Stream = list[tuple[int, str, bq.Pairs]]  # (round, domain, labelled chunk) in stream order


def make_stream(rounds: int, chunk: int, workers: int, domains: tuple[str, ...] = DOMAINS) -> Stream:
    """Every chunk rendered up front (all rows see the same frames); chunk k uses scene seed STREAM_SEED + k;
    a shifted target (camera, corruption) is its base domain's scenes with the shift applied."""
    order = [(r, d) for r in range(1, rounds + 1) for d in domains]
    stream = []
    with Pool(workers) as pool:
        for k, (r, d) in enumerate(order):
            base = bq.parse_target(d)[0]
            pairs = bq.Pairs(pool.map(bq._render, [(base, STREAM_SEED + k, i, 0.0) for i in range(chunk)]))
            stream.append((r, d, bq.shift_pairs(d, pairs, STREAM_SEED + k, pool) if base != d else pairs))
    return stream


def _switch(s: bq.Setup, old: str, new: str) -> str:
    """Make `new` the current version; delete `old` to save disk (never the source version)."""
    if old not in (new, s.src.id):
        shutil.rmtree(bundle.resolve(s.root, old))
    return new


def _adapt(s: bq.Setup, name: str, images: np.ndarray, current: str, steps: int, device: str,
           domain: str) -> tuple[str, bool | None, str, dict]:
    """One round on a chunk's images (never its labels) -> (current version, accepted, reason, audit).
    The candidate is always written and scored (the audit: its effect on the chunk's domain and on
    the source, and what the health signals alone and health + gate decided); it becomes the
    current model only when health + gate accept it, as in the runtime."""
    if ROWS[name]["method"] == "none":
        return current, None, "source-only: no adaptation", {}
    try:
        r = rounds.run_round(s.root, images, AdaptConfig(**{"steps": steps, **ROWS[name]}), current,
                             rounds.UNGUARDED, device=device, pick=bq.PICKS.get(name))
    except UserError as e:  # the runtime's scheduler counts this a failed round and keeps the model
        return current, False, f"failed: {e}", {}
    rep = r.report
    ok, why = rounds.judge(rep["health_before"], rep["health_after"], rep["gate_after"])
    old, new = (bundle.load_version(s.root, v).net.to(device) for v in (current, r.version_dir.name))
    audit = {"target_gain": s.score(new, f"{domain}-val") - s.score(old, f"{domain}-val"),
             "source_change": s.score(new, "source-val") - s.score(old, "source-val"),
             "by_health": health.accept(rep["health_before"], rep["health_after"])[0], "by_gate": ok,
             "gate_after": rep["gate_after"], "set": rep["set"], "choice": (rep.get("choice") or {}).get("kept")}
    if ok:
        return _switch(s, current, r.version_dir.name), True, why, audit
    shutil.rmtree(r.version_dir)
    return current, False, why, audit


def _round_scores(s: bq.Setup, r: int, version: str) -> dict:
    net = bundle.load_version(s.root, version).net
    return {"round": r, "version": version, "source": s.score(net, "source-val"),
            "val": {d: s.score(net, f"{d}-val") for d in DOMAINS}}


def run_row(s: bq.Setup, name: str, stream: Stream, steps: int, device: str, log=lambda msg: None) -> dict:
    """One row over the whole stream: per chunk the prequential mIoU and the round's outcome, per round
    the held-out scores of the model the round ended with."""
    current, chunks, rounds = s.src.id, [], []
    for r, d, pairs in stream:
        if name in RESET and d == DOMAINS[0]:
            current = _switch(s, current, s.src.id)
        net = bundle.load_version(s.root, current).net.to(device)
        chunk = {"round": r, "domain": d, "version": current, "miou": evaluate(net, pairs)["miou"]}
        current, chunk["accepted"], chunk["reason"], chunk["audit"] = _adapt(s, name, pairs.x, current, steps,
                                                                             device, d)
        chunks.append(chunk)
        if d == DOMAINS[-1]:
            rounds.append(_round_scores(s, r, current))
            done = chunks[-len(DOMAINS):]
            log(f"{name} round {r}: prequential {np.mean([c['miou'] for c in done]):.1f}, source "
                f"{rounds[-1]['source']:.1f}, accepted {sum(c['accepted'] is True for c in done)}/{len(done)}")
    _switch(s, current, s.src.id)
    return {"chunks": chunks, "rounds": rounds}


def floors(round_miou: list[float], base_round_miou: list[float], source_after: float,
           source_model: float) -> dict[str, bool]:
    """The three floors of issue 3 from per-round mean prequential mIoU (the row's and source-only's)."""
    gaps = [m - b for m, b in zip(round_miou, base_round_miou)]
    return {"a_no_round_below_source_only": min(gaps) >= -MAX_ROUND_GAP,
            "b_last_round_not_below_first": gaps[-1] >= gaps[0],
            "c_source_kept": source_after >= source_model - MAX_SOURCE_DROP}


def summarize(row: dict, base: dict, source_model: float) -> dict:
    """Add gaps to source-only (same chunks), per-round prequential means, a summary and the floors."""
    for c, b in zip(row["chunks"], base["chunks"]):
        c["gap"] = c["miou"] - b["miou"]
    for rd in row["rounds"]:
        own = [c for c in row["chunks"] if c["round"] == rd["round"]]
        rd["prequential"] = {c["domain"]: c["miou"] for c in own}
        rd["miou"], rd["gap"] = float(np.mean([c["miou"] for c in own])), float(np.mean([c["gap"] for c in own]))
    miou = [rd["miou"] for rd in row["rounds"]]
    outcomes = [c["accepted"] for c in row["chunks"]]
    row["summary"] = {"first_round": miou[0], "last_round": miou[-1], "first_round_gap": row["rounds"][0]["gap"],
                      "last_round_gap": row["rounds"][-1]["gap"],
                      "worst_round_gap": min(rd["gap"] for rd in row["rounds"]),
                      "source_after": row["rounds"][-1]["source"], "source_model": source_model,
                      # do later rounds add? the domains' held-out mIoU after round 1 and after the last
                      "held_out_first": float(np.mean(list(row["rounds"][0]["val"].values()))),
                      "held_out_last": float(np.mean(list(row["rounds"][-1]["val"].values()))),
                      "accepted": outcomes.count(True), "rejected": outcomes.count(False), **gate_audit(row["chunks"])}
    # source-only is summarized first (against itself), so its rounds carry their means by now
    row["floors"] = floors(miou, [rd["miou"] for rd in base["rounds"]], row["summary"]["source_after"], source_model)
    return row


def gate_audit(chunks: list[dict]) -> dict:
    """How the health signals alone and health + gate judged the rounds whose effect is known:
    good (the chunk's domain gained > 0.5 mIoU on its held-out split), source-damaging (the source
    domain lost > 1 point)."""
    audits = [c["audit"] for c in chunks if c.get("audit")]
    good = [a for a in audits if a["target_gain"] > 0.5]
    damaging = [a for a in audits if a["source_change"] < -1.0]
    return {"good_rounds": len(good), "source_damaging_rounds": len(damaging),
            "good_rejected_by_health": sum(not a["by_health"] for a in good),
            "good_rejected_by_gate": sum(not a["by_gate"] for a in good),
            "damaging_rejected_by_health": sum(not a["by_health"] for a in damaging),
            "damaging_rejected_by_gate": sum(not a["by_gate"] for a in damaging),
            "new_sets": sum(a["set"] == "new" for a in audits)}


def table(report: dict) -> str:
    head = (f"| method | round 1 mIoU (vs source-only) | round {report['rounds']} | worst round vs source-only | "
            f"source mIoU after (model {report['source_model']['source-val']:.1f}) | held-out after round 1 → "
            f"{report['rounds']} | accepted / rejected | (a) | (b) | (c) |")
    rows = [head, "|" + "---|" * 10]
    for name, row in report["results"].items():
        s, ok = row["summary"], ["pass" if v else "FAIL" for v in row["floors"].values()]
        counts = "–" if name == "source-only" else f"{s['accepted']} / {s['rejected']}"
        rows.append(f"| {name} | {s['first_round']:.1f} ({s['first_round_gap']:+.1f}) | {s['last_round']:.1f} "
                    f"({s['last_round_gap']:+.1f}) | {s['worst_round_gap']:+.1f} | "
                    f"{s['source_after']:.1f} | {s['held_out_first']:.1f} → {s['held_out_last']:.1f} | {counts} | "
                    + " | ".join(ok) + " |")
    return "\n".join(rows) + (f"\n\nmIoU: mean prequential over a round's chunks. (a) no round more than "
                              f"{MAX_ROUND_GAP:g} point below source-only; held-out: the mean over the domains of their held-out "
                              f"mIoU after round 1 and after the last round; (b) the last round's gain over source-only "
                              f"not below round 1's; (c) source mIoU at most {MAX_SOURCE_DROP:g} points below the "
                              "source model's.")


def plot(report: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110)
    for name, row in report["results"].items():
        if name != "source-only":  # chunk k at round + its domain's quarter: round r spans [r, r + 1)
            top.plot([c["round"] + DOMAINS.index(c["domain"]) / len(DOMAINS) for c in row["chunks"]],
                     [c["gap"] for c in row["chunks"]], lw=1.3, label=name)
            bottom.plot([rd["round"] for rd in row["rounds"]], [rd["source"] for rd in row["rounds"]],
                        marker="o", ms=3, lw=1.3, label=name)
    top.axhline(0, color="k", lw=1, label="source-only")
    for r in range(2, report["rounds"] + 1):
        top.axvline(r, color="grey", ls=":", lw=0.8)
    top.set(xlabel=f"round (chunks {' → '.join(DOMAINS)} in each; dotted: round boundaries)",
            ylabel="prequential mIoU − source-only", title="continual stream: predict each chunk, then adapt on it")
    bottom.axhline(report["source_model"]["source-val"], color="k", ls="--", lw=1, label="source model")
    bottom.set(xlabel="round", ylabel="source-val mIoU after the round")
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(bq.PRESETS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=10, help="passes over the four domains")
    ap.add_argument("--chunk", type=int, default=None, help="frames per chunk (default: by preset, small 40)")
    ap.add_argument("--steps", type=int, default=None, help="adaptation steps per round (default: by preset, small 50)")
    ap.add_argument("--methods", default=",".join(ROWS), help="comma list of rows; source-only always runs")
    ap.add_argument("--split", choices=sorted(SPLITS), default="tuning", help="the stream's domains (SPLITS)")
    ap.add_argument("--domains", help="comma list of targets (as bench_quality's) instead of --split's, e.g. "
                    "night: every round on one domain, each on a fresh chunk")
    ap.add_argument("--source-bundle", type=Path, help="start from this bundle (as bench_quality --source-bundle)")
    ap.add_argument("--out", type=Path, default=Path("bench_continual.json"))
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the stream (default: --out with .png)")
    args = ap.parse_args(argv)
    args.methods = list(dict.fromkeys(["source-only", *args.methods.split(",")]))
    unknown = [m for m in args.methods if m not in ROWS]
    if unknown or args.rounds < 1:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}" if unknown else "--rounds must be >= 1")
    try:
        args.domains = tuple(bq.resolve_targets(args.domains)) if args.domains else SPLITS[args.split]
    except UserError as e:
        ap.error(str(e))
    default = DEFAULTS.get(args.preset, DEFAULTS["small"])
    args.chunk, args.steps = args.chunk or default["chunk"], args.steps if args.steps is not None else default["steps"]
    args.plot = args.plot or args.out.with_suffix(".png")
    return args


def main(argv: list[str] | None = None) -> dict:
    global DOMAINS  # every function of the stream reads the split's domains from here
    args, t0 = _parse(argv), time.perf_counter()
    DOMAINS = args.domains

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:.0f} s] {msg}", file=sys.stderr, flush=True)

    s = bq.Setup(args.preset, args.device, log=log, targets=DOMAINS,  # the -val splits of the stream's domains
                 source=args.source_bundle)
    try:
        stream = make_stream(args.rounds, args.chunk, s.p["workers"], DOMAINS)
        split = args.split if args.domains == SPLITS[args.split] else None  # None: --domains
        report = {"preset": args.preset, "split": split, "device": bq._device_name(args.device), "rounds": args.rounds,
                  "chunk": args.chunk, "adapt_steps": args.steps, "domains": list(DOMAINS), "stream_seed": STREAM_SEED,
                  "source_model": {k: s.score(s.src.net, k) for k in ["source-val", *(f"{d}-val" for d in DOMAINS)]},
                  "results": {}}
        for name in args.methods:
            row = run_row(s, name, stream, args.steps, args.device, log)
            base = report["results"].get("source-only", row)
            report["results"][name] = summarize(row, base, report["source_model"]["source-val"])
            report["seconds"] = time.perf_counter() - t0
            args.out.write_text(json.dumps(report, indent=1))  # after every row: a stopped run keeps its rows
    finally:
        s.close()
    plot(report, args.plot)
    print(table(report))
    if "mas3" in report["results"]:
        print("floors for mas3: " + ", ".join(f"{k} {'pass' if v else 'FAIL'}"
                                               for k, v in report["results"]["mas3"]["floors"].items()))
    return report


if __name__ == "__main__":
    main()
