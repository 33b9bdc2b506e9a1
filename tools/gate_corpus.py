"""A corpus of adaptation rounds with known outcomes, to measure and fit the round's gate.

Each round is a real `rounds.run_round` (guard off) on unlabeled frames of one target; it records
every signal the round computed (health, gate, checks, signals.py's), and its true effect, scored
afterwards on labelled frames no round saw: the change of target mIoU on the target's held-out
split and of source mIoU on the source's. Labels only score a round; no signal reads them. Each
round also scores 8 labelled frames of its own target that it did not adapt on (the sentinel
frames a team could label), before and after, so a sentinel rule can be fitted offline.

What varies: the target (every tuning family and severity, or the report half's), the method row
(the default, statistics only, steps always, Tent at three learning rates, self-training,
mas3-paper, AdaBN with one set, CoTTA), steps (10-300), frames (20-192) and the starting version
(the source, or one adapted once or twice on other frames of the same target).

Looped-video rounds: a camera panning along wide scenes and back (tools/looped_video.py), so a
round's frames are consecutive near-copies, as a robot's buffer holds them. Its sentinel frames are
spread over the video; its effect is scored on a pan of other scenes of the same look.

The two halves: the rule is chosen on `tuning` rounds and judged once on `report` rounds, whose
targets no choice of the project has seen (bench_quality's report and report2 splits).

    python tools/gate_corpus.py --half tuning --rounds 120 --out docs/results/gate_corpus.json
    python tools/gate_corpus.py --half report --rounds 110 --out docs/results/gate_corpus.json
    python tools/bench_quality.py --split report3d --methods "" --save-source r3d_source
    python tools/gate_corpus.py --half report3d --rounds 60 --source r3d_source --out docs/results/gate_corpus.json
    python tools/gate_corpus.py --half tuningloop --rounds 40 --out docs/results/gate_corpus.json
    python tools/gate_corpus.py --half reportloop --rounds 40 --out docs/results/gate_corpus.json

The JSON is a cache: a run skips the rounds already in it, and the gate is fitted from it without
running a round again (tools/gate_fit.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
import looped_video as lv  # noqa: E402

from mas3_edge import bundle, prototypes, rounds, signals  # noqa: E402
from mas3_edge.bundle import atomic_write_json  # noqa: E402
from mas3_edge.config import AdaptConfig  # noqa: E402
from mas3_edge.errors import UserError  # noqa: E402
from mas3_edge.evaluate import evaluate  # noqa: E402

# Written down before either half was run: the tuning targets of bench_quality (the synthetic
# domains, noise and blur) with the other severity of each tuning family, and the targets of its
# report and report2 splits. The 3-D looks have a source model of their own (trained on r3d-source,
# --source): their tuning and report halves are bench_quality's, dusk tuning and the rest report;
# their rounds join the tuning and report halves of the fit.
HALVES = {"tuning": ["realistic", "night", "fog", "rain", "label-shift", "realistic+gaussian_noise@5",
                     "realistic+motion_blur@3", "realistic+gaussian_noise@3", "realistic+motion_blur@5"],
          "report": ["realistic+camera", "realistic+snow@3", "realistic+frost@3", "realistic+contrast@4",
                     "realistic+pixelate@5", "realistic+elastic_transform@5", "realistic+jpeg_compression@5",
                     "realistic+brightness@5", "realistic+impulse_noise@3", "realistic+zoom_blur@3"],
          "tuning3d": bq.SPLITS["tuning"].split(",")[-1:],
          "report3d": bq.SPLITS["report3d"].split(","),
          # the looped video's own scenes and look for tuning; other scenes, under report shifts, for report
          "tuningloop": ["loop:realistic", "loop:realistic+gaussian_noise@3"],
          "reportloop": ["loop:realistic+snow@3", "loop:realistic+contrast@4"]}
LOOP_SCENES = {"tuning": (11, 12, 13), "report": (21, 22, 23)}  # the val pan: the same seeds + 100
PAN_STEP = 16  # pixels per frame: 288 frames per video at the small preset's 128 x 256
ROWS = {"mas3": {}, "statistics only": {"steps": 0}, "steps always": {"choose": False},
        "tent 1e-4": {"method": "tent", "lr": 1e-4}, "tent 1e-3": {"method": "tent", "lr": 1e-3},
        "tent 3e-3": {"method": "tent", "lr": 3e-3}, "pseudo": {"method": "pseudo"},
        "mas3-paper": {"method": "mas3-paper"}, "bn (one set)": {"method": "bn"}, "cotta": {"method": "cotta"}}
# The 3-D halves hold rounds that keep the source set only: a round that loses it is caught by the
# source signal alone (every one of the 2-D report half's), so the hard case is the bank's. Tent
# joins them inside the bank, the strongest step objective measured there.
BANK_ROWS = {**{k: ROWS[k] for k in ("mas3", "statistics only", "steps always")},
             "tent 1e-3 (bank)": {"method": "tent", "lr": 1e-3, "keep_source": True},
             "tent 3e-3 (bank)": {"method": "tent", "lr": 3e-3, "keep_source": True}}
STEPS, FRAMES, STARTS = (10, 30, 100, 300), (20, 50, 100, 192), ("source", "once", "twice")
STEP_ODDS = (0.3, 0.3, 0.3, 0.1)  # 300 steps is the runtime's rare long round (and the corpus's slowest)
SENTINEL = 8  # the first adapt frames of each target: labelled, never adapted on
PRE = {"once": slice(8, 100), "twice": slice(100, 192)}  # the frames the starting versions were adapted on


def specs(half: str, n: int, seed: int = 0) -> list[dict]:
    """n round specifications, the same for the same half and seed: targets and rows in turn, the
    rest drawn."""
    rng = np.random.default_rng(seed + (0 if half == "tuning" else 1000))
    targets, rows = HALVES[half], list(ROWS if half in ("tuning", "report") else BANK_ROWS)
    out = []
    for i in range(n):
        spec = {"half": half_of(half), "target": targets[i % len(targets)], "row": rows[(i // len(targets)) % len(rows)],
                "steps": int(rng.choice(STEPS, p=STEP_ODDS)), "frames": int(rng.choice(FRAMES)), "start": str(rng.choice(STARTS)),
                "offset": int(rng.integers(0, 1000))}
        spec["key"] = f"{half}/{i}"
        out.append(spec)
    return out


def half_of(name: str) -> str:
    return "tuning" if name.startswith("tuning") else "report"


def loop_data(target: str, scenes: tuple[int, ...], size: tuple[int, int]) -> dict[str, bq.Pairs]:
    """{target}-adapt: the panning video of `scenes`, SENTINEL frames spread over it first, then
    the rest in order; {target}-val: every 4th frame of a pan of other scenes; both under the
    target's shift ("loop:realistic+snow@3")."""
    def video(seeds: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [lv.pan(s, size, PAN_STEP) for s in seeds]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x, y = video(scenes)
    spread = np.linspace(0, len(x) - 1, SENTINEL).round().astype(int)
    order = np.r_[spread, np.setdiff1d(np.arange(len(x)), spread)]
    vx, vy = video(tuple(s + 100 for s in scenes))
    out = {"adapt": bq.Pairs(list(zip(x[order], y[order]))), "val": bq.Pairs(list(zip(vx[::4], vy[::4])))}
    shift = target.removeprefix("loop:")
    if bq.parse_target(shift)[1]:
        with bq.Pool(2) as pool:
            out = {part: bq.shift_pairs(shift, pairs, seed, pool) for (part, pairs), seed in zip(out.items(), (3, 4))}
    return {f"{target}-{part}": pairs for part, pairs in out.items()}


class Corpus:
    """The rounds of one Setup: starting versions made once per target, scores cached per version."""

    def __init__(self, s: bq.Setup):
        self.s, self.scores, self.starts = s, {}, {}

    def score(self, vid: str, target: str) -> dict:
        if (vid, target) not in self.scores:
            net = bundle.load_version(self.s.root, vid).net
            sentinel = bq.Pairs([self.s.data[f"{target}-adapt"][i] for i in range(SENTINEL)])
            self.scores[vid, target] = {"target": self.s.score(net, f"{target}-val"),
                                        "source": self.s.score(net, "source-val"),
                                        "sentinel": evaluate(net, sentinel)["miou"],
                                        # each frame's own, for a paired test of the sentinel frames
                                        "sentinel_frames": [evaluate(net, bq.Pairs([sentinel[i]]))["miou"]
                                                            for i in range(len(sentinel))]}
        return self.scores[vid, target]

    def start(self, target: str, start: str) -> str:
        """The version a round starts from: the source, or the default adapted once or twice on
        other frames of the target (always kept, whatever its gate said: a robot's history)."""
        if start == "source":
            return self.s.src.id
        if (target, start) not in self.starts:
            parent = self.start(target, "once" if start == "twice" else "source")
            frames = self.s.data[f"{target}-adapt"].x[PRE[start]]
            r = rounds.run_round(self.s.root, frames, AdaptConfig(steps=30), parent, rounds.UNGUARDED)
            self.starts[target, start] = r.version_dir.name
        return self.starts[target, start]

    def run(self, spec: dict) -> dict:
        t, parent = spec["target"], self.start(spec["target"], spec["start"])
        pool = self.s.data[f"{t}-adapt"].x[SENTINEL:]
        first = spec["offset"] % max(1, len(pool) - spec["frames"] + 1)
        frames = pool[first:first + spec["frames"]]
        cfg = AdaptConfig(**{"steps": spec["steps"], **{**ROWS, **BANK_ROWS}[spec["row"]]})
        t0 = time.perf_counter()
        try:
            r = rounds.run_round(self.s.root, frames, cfg, parent, rounds.UNGUARDED)
        except UserError as e:  # the runtime counts it a failed round and keeps the model
            return {**spec, "parent": parent, "failed": str(e)}
        before, after = self.score(parent, t), self.score(r.version_dir.name, t)
        rep = r.report
        out = {**spec, "parent": parent, "seconds": time.perf_counter() - t0,
               "effect": {k: after[k] - before[k] for k in ("target", "source", "sentinel")}, "before": before, "after": after,
               **{k: rep.get(k) for k in ("set", "choice", "health_before", "health_after", "gate_before",
                                         "gate_after", "checks", "signals", "accepted", "reason", "warnings")}}
        if r.version_dir.name not in self.starts.values():
            shutil.rmtree(r.version_dir)
            self.scores.pop((r.version_dir.name, t), None)
        return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--half", choices=sorted(HALVES), required=True)
    ap.add_argument("--rounds", type=int, default=120)
    ap.add_argument("--preset", choices=sorted(bq.PRESETS), default="small")
    ap.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent / "mas3_edge" /
                    "default_bundle", help="A source bundle trained by the small preset's recipe (default: the packaged one).")
    ap.add_argument("--keys", help="Run only these rounds of the half, by index (\"4,8,20\"): to score chosen "
                    "rounds again into another --out.")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    try:
        keys = {f"{args.half}/{int(k)}" for k in args.keys.split(",")} if args.keys else None
    except ValueError:
        ap.error(f"--keys takes round indices like 4,8,20, got {args.keys!r}")
    if args.half.endswith("3d") and args.source == ap.get_default("source"):
        ap.error(f"--half {args.half} needs --source: a bundle trained on r3d-source (bench_quality --save-source)")
    corpus = json.loads(args.out.read_text()) if args.out.exists() else {"rounds": []}
    done = {r["key"] for r in corpus["rounds"]}
    n = max(int(k.split("/")[1]) + 1 for k in keys) if keys else args.rounds
    todo = [sp for sp in specs(args.half, n) if sp["key"] not in done and (keys is None or sp["key"] in keys)]
    print(f"{len(todo)} rounds to run ({len(done)} cached)", flush=True)
    if not todo:
        return corpus
    loops = args.half.endswith("loop")
    domain = bq.source_of(HALVES[args.half][0].removeprefix("loop:"))
    s = bq.Setup(args.preset, targets=[] if loops else HALVES[args.half], source=args.source, source_domain=domain,
                 source_train=False,
                 log=lambda m: print(m, flush=True))
    try:
        for t in HALVES[args.half] if loops else ():
            s.data.update(loop_data(t, LOOP_SCENES[half_of(args.half)], tuple(s.src.net.config.input_size)))
        if s.proto.atc_threshold is None:  # fitted at the factory, on labelled source frames
            s.proto.meta["atc_threshold"] = signals.fit_atc(s.src.net, s.data["source-val"])
            prototypes.save(s.proto, s.src.prototypes_path, s.src.meta["source_sha256"], f"synth:{domain}")
        corpus.setdefault("setup", {"preset": args.preset, "source": str(args.source),
                                    "atc_threshold": s.proto.atc_threshold, "halves": HALVES})
        corpus.setdefault("sources", {})[args.half] = {"source": str(args.source), "atc_threshold": s.proto.atc_threshold}
        c = Corpus(s)
        for i, spec in enumerate(todo):
            rec = c.run(spec)
            corpus["rounds"].append(rec)
            atomic_write_json(args.out, corpus)
            eff = rec.get("effect") or {}
            print(f"[{i + 1}/{len(todo)}] {spec['key']} {spec['target']} {spec['row']} {spec['steps']} steps "
                  f"{spec['frames']} frames from {spec['start']}: "
                  + (f"target {eff['target']:+.2f} source {eff['source']:+.2f} ({rec['seconds']:.0f} s)" if eff
                     else f"failed: {rec['failed']}"), flush=True)
    finally:
        s.close()
    return corpus


if __name__ == "__main__":
    main()
