"""Watch live adaptation: run `mas3-edge run` on a synthetic target, plot the live mIoU against time.

    python tools/live_curve.py --duration 540                      # night only
    python tools/live_curve.py --duration 540 --targets night fog

Each target gets a real `python -m mas3_edge run --camera synthetic://TARGET --events FILE` subprocess
that starts from the pristine source version: the packaged default bundle (copied afresh under a
temporary $MAS3_EDGE_HOME, exactly as a new install does) or a fresh copy of --bundle. The status events carry the mIoU over the last 100 labelled frames (the synthetic
source has labels); the plot draws it against time with accepted (green) and rejected (red) rounds as
vertical lines. Writes docs/results/live_curve_TARGET.png, docs/results/live_curve.json (first-100 and last-100 mIoU,
rounds, fps, the command) and docs/results/overlay_strip.png: held-out night scenes as image | source-only |
adapted (the bundle's first version against the last accepted one).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NOT_ACCEPTED = ("rejected", "crashed", "superseded")


def run_target(target: str, work: Path, args: argparse.Namespace) -> tuple[list[dict], list[str], Path]:
    """One `mas3-edge run` on a fresh bundle copy; returns (events, command, bundle root)."""
    work.mkdir(parents=True, exist_ok=True)
    home, events = work / "home", work / "events.jsonl"
    bundle = home / "bundle"  # where `run` copies the packaged default when no --bundle is named
    cmd = [sys.executable, "-m", "mas3_edge", "run", "--camera", f"synthetic://{target}"]
    if args.bundle is not None:
        bundle = work / "bundle"
        shutil.copytree(args.bundle, bundle)
        cmd += ["--bundle", str(bundle)]
    cmd += ["--events", str(events), "--buffer", str(work / "frames"), "--publish", f"ipc://{work}/seg.sock",
           "--status-every", str(args.status_every)]
    cmd += ["--duration", str(args.duration)] if args.duration else []
    cmd += ["--max-frames", str(args.max_frames)] if args.max_frames else []
    cmd += ["--fps", str(args.fps)] if args.fps is not None else []
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "MAS3_EDGE_HOME": str(home)})
    return load_events(events), cmd, bundle


def load_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarize(events: list[dict], cmd: list[str] | None = None) -> dict:
    """The curve (time, rolling-100 mIoU), the rounds and the end figures of one run's events."""
    t0 = next(e["time"] for e in events if e["event"] == "start")
    status = [e for e in events if e["event"] in ("status", "stop") and e.get("miou_window") is not None]
    last = next((e for e in reversed(events) if e["event"] == "stop"), status[-1] if status else {})
    rounds = [{"round": e["round"], "outcome": e["outcome"], "time_s": round(e["time"] - t0, 1),
               "seconds": round(e.get("seconds", 0.0), 1), "version": e.get("version"), "reason": e.get("reason")}
              for e in events if e["event"] == "round"]
    uptime = last.get("uptime_s") or 0.0
    # the 100 frames right after the first swap: the first rolling window that starts after it
    swap = next((e["frame"] for e in events if e["event"] == "swap"), None)
    after = next((e["miou_window"] for e in status if swap is not None and e["frames"] >= swap + 100), None)
    return {
        "command": " ".join(cmd) if cmd else None,
        "frames": last.get("frames"), "seconds": round(uptime, 1),
        "fps": round(last["frames"] / uptime, 2) if uptime else None,
        "miou_first_100": last.get("miou_first"), "miou_last_100": last.get("miou_window"),
        "miou_after_first_swap": after, "first_swap_frame": swap,
        "miou_by_version": next((e["miou_by_version"] for e in reversed(status) if e.get("miou_by_version")), None),
        "accepted": sum(r["outcome"] == "accepted" for r in rounds),
        "rejected": sum(r["outcome"] in NOT_ACCEPTED for r in rounds), "rounds": rounds,
        "curve": [[round(e["time"] - t0, 2), e["frames"], round(e["miou_window"], 2)] for e in status],
    }


def floor_met(s: dict) -> bool:
    """Issue 6 §4: within 10 minutes, a round accepted and last-100 mIoU above first-100."""
    return bool(s["accepted"] >= 1 and s["seconds"] <= 600 and s["miou_first_100"] is not None
                and s["miou_last_100"] is not None and s["miou_last_100"] > s["miou_first_100"])


def plot(s: dict, title: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    curve = np.asarray(s["curve"], float).reshape(-1, 3)
    ax.plot(curve[:, 0], curve[:, 2], color="tab:blue", lw=1.6, label="live mIoU, last 100 frames")
    for kind, colour, style in (("accepted", "tab:green", "-"), ("rejected", "tab:red", "--")):
        for r in (r for r in s["rounds"] if (r["outcome"] == "accepted") == (kind == "accepted")):
            ax.axvline(r["time_s"], color=colour, ls=style, lw=1.2, alpha=0.8)
        ax.plot([], [], color=colour, ls=style, label=f"round {kind}")  # legend entry
    if s["miou_first_100"] is not None:
        ax.axhline(s["miou_first_100"], color="grey", ls=":", lw=1, label="first 100 frames")
    ax.set(xlabel="seconds since serving started", ylabel="mIoU (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def overlay_strip(bundle: Path, adapted: str | None, out: Path, n: int = 3, domain: str = "night") -> dict:
    """Held-out scenes (a seed the camera does not use) as image | source-only | adapted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mas3_edge import bundle as bundles
    from mas3_edge import synth
    from mas3_edge.evaluate import predict
    from mas3_edge.labels import overlay
    from mas3_edge.metrics import Confusion
    first = bundles.version_ids(bundle)[0]
    nets = {v: bundles.load_version(bundle, v).net for v in dict.fromkeys([first, adapted or first])}
    size = tuple(bundles.read_meta(bundle / "versions" / first)["input_size"])
    scenes = [synth.render(domain, synth.scene_seed(977, i), size) for i in range(n)]
    images = np.stack([img for img, _ in scenes])
    preds, scores = {}, {}
    for v, net in nets.items():
        preds[v], conf = predict(net, images), Confusion()
        for p, (_, label) in zip(preds[v], scenes):
            conf.update(p, label)
        scores[v] = round(conf.miou(), 2)
    cols = [("image", lambda i: images[i]), (f"source-only {first} ({scores[first]:.1f} mIoU)",
                                              lambda i: overlay(images[i], preds[first][i]))]
    if adapted:
        cols.append((f"adapted {adapted} ({scores[adapted]:.1f} mIoU)", lambda i: overlay(images[i], preds[adapted][i])))
    fig, axes = plt.subplots(n, len(cols), figsize=(3.2 * len(cols), 1.75 * n), dpi=110, squeeze=False)
    for i in range(n):
        for j, (name, make) in enumerate(cols):
            axes[i, j].imshow(make(i))
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return {"domain": domain, "scene_seed": 977, "frames": n, "source": first, "adapted": adapted, "miou": scores}


def adding_floor_met(s: dict) -> bool:
    """Issue 15 §5: later rounds add, the last 100 frames at least 2 mIoU above the 100 right after
    the first swap."""
    return bool(s["miou_after_first_swap"] is not None and s["miou_last_100"] is not None
                and s["miou_last_100"] >= s["miou_after_first_swap"] + 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=["night"], help="synthetic domains (night, fog, rain, realistic)")
    p.add_argument("--duration", type=float, default=540.0, help="seconds of serving per target (0: no limit)")
    p.add_argument("--max-frames", type=int, default=None, help="stop each run after N frames")
    p.add_argument("--fps", type=float, default=None, help="camera pace (default: the source's 10 fps; 0: unpaced)")
    p.add_argument("--status-every", type=float, default=2.0, help="seconds between status events (curve points)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle to start from (default: the packaged one)")
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for the PNGs and live_curve.json")
    args = p.parse_args()
    report = {"tool_command": " ".join(["python", "tools/live_curve.py", *sys.argv[1:]]), "targets": {}}
    with tempfile.TemporaryDirectory(prefix="mas3-live-") as tmp:
        for target in args.targets:
            events, cmd, bundle = run_target(target, Path(tmp) / target, args)
            s = report["targets"][target] = {**summarize(events, cmd)}
            s["floor_met"], s["adding_floor_met"] = floor_met(s), adding_floor_met(s)
            plot(s, f"mas3-edge run --camera synthetic://{target}: live mIoU", args.out / f"live_curve_{target}.png")
            print(f"{target}: mIoU first 100 {s['miou_first_100']} -> last 100 {s['miou_last_100']}, rounds "
                  f"accepted {s['accepted']} rejected {s['rejected']}, {s['fps']} fps, floor met: {s['floor_met']}; "
                  f"right after the first swap {s['miou_after_first_swap']}: later rounds add 2 points: "
                  f"{'pass' if s['adding_floor_met'] else 'FAIL'}",
                  file=sys.stderr)
            if target == "night" or "strip" not in report:
                accepted = [r["version"] for r in s["rounds"] if r["outcome"] == "accepted"]
                report["strip"] = overlay_strip(bundle, accepted[-1] if accepted else None,
                                                args.out / "overlay_strip.png", domain=target)
    (args.out / "live_curve.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
