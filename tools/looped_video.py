#!/usr/bin/env python
"""One camera, looped: do the rounds keep to one normalisation set, and does the gate keep the
rounds that help and reject the ones that hurt?

A generated, labelled street video (a camera panning along wide `realistic` scenes and back,
so consecutive frames are near-copies, as in real footage) is looped through the runtime's rounds
as `mas3-edge run` schedules them: every `--every` buffered frames (one frame in `--stride`
buffered), a round on the newest `--every` buffered frames, starting from the serving version.
Each round's candidate is scored with the labels (never shown to the round) on a fixed set of the
video's frames, so each round is known to be good (gain > 0.5 mIoU), harmful (< -0.5) or neutral;
and the decisions of the health signals alone and of health + gate are both recorded. Serving
follows health + gate, as the runtime does.

    python tools/looped_video.py --out docs/results/looped_video.json
    python tools/looped_video.py --method tent --rounds 6 --out looped_tent.json

With `--video FILE` the rounds run on a real, unlabelled video read with OpenCV instead, as a robot
running `mas3-edge run` with the gate on would: serving follows the gate's verdict. With no labels
to score them, each round reports what the gate decided and why, the class shares of its candidate
and of the serving model, and the candidate's pixel agreement with the source model, on a fixed
probe of every 10th frame:

    python tools/looped_video.py --video street.mp4 --out docs/results/real_video.json

A few frames can be labelled the way a team labels sentinel frames, with boxes of the video's
pixels that hold one class in every frame (a camera fixed on a vehicle: sky above, road below; the
rest is ignored): `--label-boxes "sky:130,0,630,200+road:100,400,600,540"`. Those frames are held
out of the rounds; every candidate is scored on them, and `--decide-with-sentinel` lets the rounds'
decisions use them too.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mas3_edge import bundle, gate, health, rounds, synth  # noqa: E402
from mas3_edge.config import AdaptConfig, RoundConfig  # noqa: E402
from mas3_edge.decide import Sentinel  # noqa: E402
from mas3_edge.evaluate import evaluate, predict  # noqa: E402

SCENES = (11, 12, 13)


def pan(seed: int, size: tuple[int, int], step: int, width_factor: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A camera panning along one wide scene and back: frames (N, H, W, 3), labels (N, H, W)."""
    h, w = size
    img, lbl = synth.render("realistic", seed, (h, w * width_factor))
    xs = list(range(0, w * (width_factor - 1) + 1, step))
    xs = xs + xs[::-1][1:-1]
    return np.stack([img[:, x:x + w] for x in xs]), np.stack([lbl[:, x:x + w] for x in xs])


def video(size: tuple[int, int], step: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [pan(s, size, step) for s in SCENES]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_video(path: Path, frames: np.ndarray, fps: float = 15.0) -> None:
    import cv2
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (frames.shape[2], frames.shape[1]))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()


class Labelled:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def read_video(path: Path, size: tuple[int, int], every: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """Every `every`-th frame of a video file, RGB, fitted to `size` as the runtime's camera fits
    it, and the video's own (H, W)."""
    import cv2

    from mas3_edge.runtime.sources import fit
    cap, frames, i, shape = cv2.VideoCapture(str(path)), [], 0, (0, 0)
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        if i % every == 0:
            frames.append(fit(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size))
            shape = bgr.shape[:2]
        i += 1
    cap.release()
    if not frames:
        sys.exit(f"error: no frame could be read from {path} (is it a video OpenCV can decode?)")
    return np.stack(frames), shape


def parse_boxes(spec: str, names: list[str]) -> list[tuple[int, tuple[int, int, int, int]]]:
    """"sky:130,0,630,200+road:100,400,600,540" -> [(class id, (x0, y0, x1, y1)), ...]."""
    out = []
    for part in spec.split("+"):
        name, _, coords = part.partition(":")
        xy = coords.split(",")
        if name not in names or len(xy) != 4 or not all(v.strip().isdigit() for v in xy):
            sys.exit(f"error: --label-boxes part {part!r} must be CLASS:x0,y0,x1,y1 with a class of {names}")
        out.append((names.index(name), tuple(int(v) for v in xy)))
    return out  # type: ignore[return-value]


def box_labels(boxes: list, shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A label map of the video's frame (255 outside the boxes), cropped and resized as the frames are."""
    import cv2

    from mas3_edge.runtime.sources import crop_box
    lbl = np.full(shape, 255, np.uint8)
    for c, (x0, y0, x1, y1) in boxes:
        lbl[y0:y1, x0:x1] = c
    x, y, w, h = crop_box(shape, size)
    return cv2.resize(lbl[y:y + h, x:x + w], (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def write_sentinel(folder: Path, frames: np.ndarray, label: np.ndarray) -> Path:
    import cv2
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / "images" / f"{i:02d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "labels" / f"{i:02d}.png"), label)
    return folder


def shares(net, frames: np.ndarray, names: list[str], top: int = 4) -> dict[str, float]:
    """The `top` classes by share of all pixels `net` labels on `frames`."""
    counts = np.bincount(np.concatenate([predict(net, frames[i:i + 8]).ravel() for i in range(0, len(frames), 8)]),
                         minlength=len(names)).astype(float)
    order = np.argsort(-counts)[:top]
    return {names[c]: round(float(counts[c] / counts.sum()), 3) for c in order}


def run_real(args) -> dict:
    """Rounds on a real unlabelled video, the gate deciding what serves (see the module's docstring)."""
    work = Path(tempfile.mkdtemp(prefix="mas3-real-"))
    try:
        root = work / "bundle"
        shutil.copytree(bundle.PACKAGED, root)
        source = bundle.load_version(root)
        names, size = list(source.net.labels.names), tuple(source.net.config.input_size)
        frames, shape = read_video(args.video, size, args.stride)
        sentinel, rcfg = None, rounds.UNGUARDED
        if args.label_boxes:  # frames spread over the video, held out of the rounds
            held = np.linspace(0, len(frames) - 1, args.sentinel_frames + 2).astype(int)[1:-1]
            folder = write_sentinel(work / "sentinel", frames[held], box_labels(parse_boxes(args.label_boxes, names),
                                                                                shape, size))
            frames, sentinel = np.delete(frames, held, axis=0), Sentinel(folder, source.net)
            if args.decide_with_sentinel:
                rcfg = RoundConfig(guard=False, sentinel=str(folder))
        probe = frames[::10]
        stream = np.concatenate([frames] * (1 + args.rounds * args.every // len(frames)))
        out = {"video": args.video.name, "frames": len(frames), "stride": args.stride, "method": args.method,
               "label_boxes": args.label_boxes, "sentinel_frames": len(sentinel) if sentinel else 0,
               "decided_with_sentinel": rcfg.sentinel is not None,
               "source_shares": shares(source.net, probe, names), "rounds": []}
        for k in range(args.rounds):
            chunk = stream[k * args.every:(k + 1) * args.every]
            serving = bundle.load_version(root)
            r = rounds.run_round(root, chunk, AdaptConfig(method=args.method, steps=args.steps), serving.id, rcfg)
            out["rounds"].append(real_row(k + 1, r.report, serving.net, bundle.load_version(r.version_dir).net,
                                          source.net, probe, names, sentinel))
            if out["rounds"][-1]["accepted"]:
                bundle.set_serving(root, r.version_dir.name)
            print(describe(out["rounds"][-1]), file=sys.stderr)
        served = bundle.load_version(root).net
        out["served_shares"] = shares(served, probe, names)
        out["served_agreement_with_source"] = gate.agreement(source.net, served, probe)
        out["summary"] = {"accepted": sum(r["accepted"] for r in out["rounds"]), "rounds": len(out["rounds"])}
        if sentinel:
            out["summary"].update(source_sentinel_miou=sentinel.miou(source.net), served_sentinel_miou=sentinel.miou(served))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def real_row(k: int, rep: dict, serving, cand, source, probe: np.ndarray, names: list[str], sentinel) -> dict:
    """One round on real footage: the verdict and its checks, what the candidate labels, how far it
    agrees with the source and serving models, and (with labelled frames) its mIoU on them."""
    row = {"round": k, "set": rep["set"], "choice": (rep.get("choice") or {}).get("kept"),
           "accepted": bool(rep["checks"]) and all(c["passed"] for c in rep["checks"]), "reason": rep["reason"],
           "checks": {c["signal"]: [round(c["value"], 4), round(c["limit"], 4)] for c in rep["checks"]},
           "signals": rep.get("signals"), "candidate_shares": shares(cand, probe, names),
           "agreement_with_source": gate.agreement(source, cand, probe),
           "agreement_with_serving": gate.agreement(serving, cand, probe)}
    if sentinel is not None:
        before, after = sentinel.miou(serving), sentinel.miou(cand)
        row.update(sentinel_before=before, sentinel_after=after,
                   kind="good" if after - before > 0.5 else "harmful" if after - before < -0.5 else "neutral")
    return row


def describe(row: dict) -> str:
    top = ", ".join(f"{n} {v:.0%}" for n, v in row["candidate_shares"].items())
    labelled = (f"; labelled frames {row['sentinel_before']:.1f} -> {row['sentinel_after']:.1f} ({row['kind']})"
                if "kind" in row else "")
    return (f"round {row['round']}: set {row['set']}, {'accepted' if row['accepted'] else 'rejected'} "
            f"({row['reason']}); agrees with source {row['agreement_with_source']:.0%}; {top}{labelled}")


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mas3-looped-"))
    try:
        root = work / "bundle"
        shutil.copytree(bundle.PACKAGED, root)
        net = bundle.load_version(root).net
        frames, labels = video(tuple(net.config.input_size), args.pan_step)
        if args.write_video:
            write_video(args.write_video, frames)
        score_set = Labelled(frames[::10], labels[::10])
        miou = lambda n: evaluate(n, score_set)["miou"]  # noqa: E731
        stream = np.concatenate([frames] * (1 + args.rounds * args.every * args.stride // len(frames)))
        buffered = stream[::args.stride]
        cfg = AdaptConfig(method=args.method, steps=args.steps)
        out = {"frames_per_loop": len(frames), "method": args.method, "span": args.span, "source_miou": miou(net), "rounds": []}
        for k in range(args.rounds):
            end = (k + 1) * args.every
            window = buffered[max(0, end - max(args.span, args.every)):end]  # the newest `span` buffered frames
            chunk = window[np.linspace(0, len(window) - 1, min(args.every, len(window))).astype(int)]
            serving = bundle.load_version(root)
            t0 = time.perf_counter()
            r = rounds.run_round(root, chunk, cfg, serving.id, rounds.UNGUARDED)
            rep, cand = r.report, bundle.load_version(r.version_dir).net
            before, after = miou(serving.net), miou(cand)
            health_ok, _ = health.accept(rep["health_before"], rep["health_after"])
            row = {"round": k + 1, "set": rep["set"], "choice": (rep.get("choice") or {}).get("kept"),
                   "miou_before": before, "miou_after": after, "gain": after - before,
                   "kind": "good" if after - before > 0.5 else "harmful" if after - before < -0.5 else "neutral",
                   "accepted_by_health": health_ok,
                   "gate_after": rep["gate_after"], "gate_before": rep["gate_before"],
                   "seconds": time.perf_counter() - t0}
            ok, why = rounds.judge(rep["health_before"], rep["health_after"], rep["gate_after"])
            row["accepted"], row["reason"] = ok, why
            if ok:
                bundle.set_serving(root, r.version_dir.name)
            out["rounds"].append(row)
            print(f"round {k + 1}: set {row['set']}, {row['kind']} ({before:.1f} -> {after:.1f}), "
                  f"health {'accept' if health_ok else 'reject'}, gate+health {'accept' if ok else 'reject'}: {why}",
                  file=sys.stderr)
        out["summary"] = summary(out["rounds"])
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary(rows: list[dict]) -> dict:
    def count(kind, key):
        return sum(1 for r in rows if r["kind"] == kind and not r[key])
    return {"new_sets": sum(1 for r in rows if r["set"] == "new"),
            "good": sum(r["kind"] == "good" for r in rows), "harmful": sum(r["kind"] == "harmful" for r in rows),
            "harmful_rejected_by_health": count("harmful", "accepted_by_health"),
            "harmful_rejected_by_gate": count("harmful", "accepted"),
            "good_rejected_by_health": count("good", "accepted_by_health"),
            "good_rejected_by_gate": count("good", "accepted")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="mas3")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--every", type=int, default=60, help="buffered frames per round (and round size)")
    ap.add_argument("--stride", type=int, default=5, help="one video frame in N is buffered")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--span", type=int, default=0, help="a round samples its frames evenly from the newest SPAN "
                    "buffered frames (default: the newest --every, as the runtime does)")
    ap.add_argument("--pan-step", type=int, default=4, help="pixels the camera pans per frame")
    ap.add_argument("--write-video", type=Path, help="also write the generated video (MJPG) here")
    ap.add_argument("--video", type=Path, help="run the rounds on this real, unlabelled video file instead")
    ap.add_argument("--label-boxes", help="with --video: CLASS:x0,y0,x1,y1 boxes (joined by +) of the video's "
                    "pixels that hold that class in every frame; labels --sentinel-frames held-out frames")
    ap.add_argument("--sentinel-frames", type=int, default=8)
    ap.add_argument("--decide-with-sentinel", action="store_true", help="the rounds' decisions use the labelled frames")
    ap.add_argument("--out", type=Path, default=Path("looped_video.json"))
    args = ap.parse_args(argv)
    if args.video and not args.video.is_file():
        ap.error(f"--video {args.video}: no such file")
    res = run_real(args) if args.video else run(args)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
