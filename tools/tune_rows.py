"""Target mIoU of bench_quality rows, for tuning a method's settings on a busy CPU.

Each round is the one tools/bench_quality.py runs for the row (the same frames, the same held-out
blocks, the same set, candidates and choice: rounds.split_holdout, pick_set, candidates, choose),
scored on the target's held-out val split as bench_quality scores it; what is left out is what a
setting does not change: the round's judgement (health signals, gate), the written version and the
source-domain score (a round inside the bank leaves the source set bit-identical). Prints the
markdown table of target gains over source-only and writes JSON after every row. Choices are made
here on the tuning split; the report splits are bench_quality's.

    python tools/tune_rows.py --split tuning --source-bundle mas3_edge/default_bundle \\
        --methods "mas3 (zero steps),mas3-st (steps always)" --out tune.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import bench_quality as bq
from mas3_edge import bundle, rounds
from mas3_edge.config import AdaptConfig
from mas3_edge.errors import UserError
from mas3_edge.fsutil import atomic_write


def round_net(s: bq.Setup, cfg: AdaptConfig, target: str):
    """The network bench_quality's round for `target` would write, and its choice record."""
    train, chooser, _held, _ = rounds.split_holdout(s.data[f"{target}-adapt"].x, rounds.UNGUARDED)
    net = bundle.load_version(s.root, s.src.id).net.to(s.device)
    _, cfg = rounds.pick_set(net, train, cfg)
    winner, choice = rounds.choose(rounds.candidates(net, s.proto, train, cfg), chooser, cfg, rounds.UNGUARDED)
    return winner.net, choice


def row(s: bq.Setup, cfg: AdaptConfig, targets: list[str]) -> dict:
    out = {}
    for t in targets:
        t0 = time.perf_counter()
        net, choice = round_net(s, cfg, t)
        out[t] = {"target": s.score(net, f"{t}-val"), "seconds": time.perf_counter() - t0, "choice": choice}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=sorted(bq.SPLITS), default="tuning")
    ap.add_argument("--source-bundle", type=Path, help="the source model's bundle (serving version)")
    ap.add_argument("--methods", default="", help="comma list of bench_quality rows")
    ap.add_argument("--steps", type=int, default=100, help="adaptation steps per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("tune_rows.json"))
    ap.add_argument("--show", type=Path, nargs="+", help="join these runs (a later run's row replaces an earlier "
                    "one of the same name) into --out and print the table; no adaptation")
    args = ap.parse_args(argv)
    if args.show:
        return print(table(join(args.show, args.out)["results"]))
    if not args.source_bundle or not args.methods:
        ap.error("give --source-bundle and --methods (or --show)")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in bq.METHODS]:
        ap.error(f"unknown rows {unknown}; choose from {list(bq.METHODS)}")
    # one source model per run: the split's first target's (the tuning split's 3-D look needs a run of its own)
    domain = bq.source_of(bq.resolve_targets(bq.SPLITS[args.split])[0])
    targets = [t for t in bq.resolve_targets(bq.SPLITS[args.split]) if bq.source_of(t) == domain]
    t0 = time.perf_counter()
    s = bq.Setup("small", args.device, targets=targets, source=args.source_bundle, source_domain=domain,
                 source_train=False)
    report = {"split": args.split, "targets": targets, "adapt_steps": args.steps, "source_bundle": str(args.source_bundle),
              "results": {"source-only": {t: {"target": s.score(s.src.net, f"{t}-val")} for t in targets}}}
    try:
        for name in methods:
            report["results"][name] = row(s, AdaptConfig(**{"steps": args.steps, **bq.METHODS[name]}), targets)
            report["seconds"] = time.perf_counter() - t0
            atomic_write(args.out, json.dumps(report, indent=1).encode())
            print(f"{name} done ({report['seconds']:.0f} s)", file=sys.stderr)
    finally:
        s.close()
    print(table(report["results"]))


def join(paths: list[Path], out: Path) -> dict:
    """Runs on the same targets and source model as one report, each row with the run it came from."""
    try:
        runs = [json.loads(p.read_text()) for p in paths]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the runs to join: {e}") from e
    base = runs[0]["results"]["source-only"]
    for p, r in zip(paths, runs):
        if r["targets"] != runs[0]["targets"] or any(abs(r["results"]["source-only"][t]["target"] - base[t]["target"])
                                                     > 0.01 for t in base):
            raise UserError(f"{p} holds other targets or another source model than {paths[0]}")
    joined = {**runs[0], "runs": [str(p) for p in paths], "results": {"source-only": base}, "row_run": {}}
    for p, r in zip(paths, runs):
        rows = {n: row for n, row in r["results"].items() if n != "source-only"}
        joined["results"].update(rows)
        joined["row_run"].update(dict.fromkeys(rows, p.name))
    atomic_write(out, json.dumps(joined, indent=1).encode())
    return joined


def table(results: dict) -> str:
    base = results["source-only"]
    targets = list(base)
    lines = ["| row | " + " | ".join(targets) + " | mean gain |", "|" + "---|" * (len(targets) + 2),
             "| source-only (mIoU) | " + " | ".join(f"{base[t]['target']:.1f}" for t in targets) + " | |"]
    for name, r in results.items():
        if name != "source-only":
            g = [r[t]["target"] - base[t]["target"] for t in targets]
            lines.append(f"| {name} | " + " | ".join(f"{x:+.2f}" for x in g) + f" | {sum(g) / len(g):+.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
