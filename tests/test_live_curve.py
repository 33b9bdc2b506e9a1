"""tools/live_curve.py: parsing a run's events and plotting them (no subprocess, no model)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("live_curve", Path(__file__).parent.parent / "tools" / "live_curve.py")
live_curve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(live_curve)


def _events(tmp_path: Path, last_miou: float) -> Path:
    t0 = 1000.0
    rows = [{"event": "start", "time": t0, "version": "v0001"}]
    rows += [{"event": "status", "time": t0 + t, "frames": 10 * t, "uptime_s": t, "miou_window": 20.0 + 0.01 * t,
              "miou_first": 20.5 if t >= 10 else None} for t in range(2, 60, 2)]
    rows += [{"event": "round", "time": t0 + 20, "round": 1, "outcome": "rejected", "seconds": 15.0, "reason": "worse"},
             {"event": "round", "time": t0 + 40, "round": 2, "outcome": "accepted", "version": "v0002", "seconds": 14.0,
              "reason": "ok"},
             {"event": "swap", "time": t0 + 41, "from": "v0001", "to": "v0002", "frame": 410},
             {"event": "stop", "time": t0 + 60, "frames": 600, "uptime_s": 60.0, "miou_window": last_miou,
              "miou_first": 20.5, "miou_by_version": {"v0001": 20.4, "v0002": 24.0}}]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_summary_reads_rounds_end_figures_and_curve(tmp_path):
    s = live_curve.summarize(live_curve.load_events(_events(tmp_path, 24.0)), ["mas3-edge", "run"])
    assert (s["miou_first_100"], s["miou_last_100"], s["frames"], s["fps"]) == (20.5, 24.0, 600, 10.0)
    assert (s["accepted"], s["rejected"]) == (1, 1)
    assert [(r["outcome"], r["time_s"], r["version"]) for r in s["rounds"]] == [("rejected", 20.0, None),
                                                                             ("accepted", 40.0, "v0002")]
    assert s["curve"][0] == [2.0, 20, 20.02] and s["curve"][-1][0] == 60.0  # the stop event ends the curve
    assert live_curve.floor_met(s)


@pytest.mark.parametrize("last", [20.5, 19.0])
def test_floor_needs_last_100_above_first_100(tmp_path, last):
    assert not live_curve.floor_met(live_curve.summarize(live_curve.load_events(_events(tmp_path, last))))


def test_plot_writes_a_png(tmp_path):
    s = live_curve.summarize(live_curve.load_events(_events(tmp_path, 24.0)))
    live_curve.plot(s, "test", tmp_path / "out" / "curve.png")
    assert (tmp_path / "out" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("last, adds", [(24.0, True), (22.0, False)])
def test_later_rounds_must_add_two_points_over_the_frames_after_the_first_swap(tmp_path, last, adds):
    s = live_curve.summarize(live_curve.load_events(_events(tmp_path, last)))
    # swapped at frame 410: the first rolling window of 100 frames after it ends at frame 520 (t = 52 s)
    assert (s["first_swap_frame"], s["miou_after_first_swap"]) == (410, pytest.approx(20.52))
    assert live_curve.adding_floor_met(s) is adds
