"""A live stream that freezes and comes back, as `run` reports it: the status line, its frame rate,
/healthz. The rate is over a recent window of frames really served."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import cv2
import pytest
from test_camera import _stalling_capture
from test_service import Running, config

from mas3_edge.runtime.service import RateWindow


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _rate(msgs) -> float:
    """The publish rate of a run of messages, from their own timestamps."""
    return (len(msgs) - 1) / ((msgs[-1].publish_ns - msgs[0].publish_ns) / 1e9)


def test_rate_window_follows_the_frames_really_served():
    rate, t = RateWindow(window=5.0), 0.0
    for _ in range(100):  # 10.35 fps for about 10 s
        t += 1 / 10.35
        rate.add(t)
    assert rate.fps(t) == pytest.approx(10.35, rel=0.01)
    assert rate.fps(t + 0.2) == pytest.approx(10.35, rel=0.01)  # one frame late is no outage
    assert rate.fps(t + 1.5) == 0.0  # an outage: no figure from before it
    t += 20.0
    for _ in range(3):  # back, at 10.35 fps: right from the second frame on
        rate.add(t)
        t += 1 / 10.35
    assert rate.fps(t - 1 / 10.35) == pytest.approx(10.35, rel=0.01)
    slow = RateWindow(window=5.0)
    for i in range(6):  # a slow source (0.5 fps) is not taken for an outage
        slow.add(i * 2.0)
    assert slow.fps(10.5) == pytest.approx(0.5)


def test_a_frozen_stream_shows_in_the_status_rate_and_health(tmp_path, tiny_bundle, monkeypatch):
    capture = _stalling_capture(read_timeout=0.3)
    monkeypatch.setattr(cv2, "VideoCapture", capture)
    cfg = config(tmp_path, tiny_bundle, "rtsp://10.0.0.2/stream", fps=None, loop=False, buffer=None,
                 camera_stall_s=0.5, health_stale_s=0.5, metrics_port=0, status_every=0.2)
    with Running(cfg) as run:
        before = run.collect(2.0)
        assert len(before) >= 10 and run.svc.snapshot()["fps"] == pytest.approx(_rate(before[-10:]), rel=0.2)
        assert _health(run.svc.metrics.url) == 200
        capture.frozen.set()
        time.sleep(0.2)
        n_lines = len(run.lines)
        time.sleep(1.6)  # stall_s is 0.5 s: 30 failed reads of 0.3 s each would be 9 s
        during, snap = run.lines[n_lines:], run.svc.snapshot()
        assert snap["fps"] == 0.0 and not snap["camera_connected"] and snap["camera_reconnects"] >= 1
        assert _health(run.svc.metrics.url) == 503
        assert during and "camera: reconnecting" in during[-1] and " 0.0 fps" in during[-1]
        capture.frozen.clear()
        after = run.collect(4.0, until=lambda m: len(m) >= 20)
        snap = run.svc.snapshot()
        assert snap["camera_connected"] and _health(run.svc.metrics.url) == 200
        # the rate right after the outage is that of the frames since: the gap is not averaged in
        assert snap["fps"] == pytest.approx(_rate(after[-10:]), rel=0.2)
    assert "camera: reconnecting" not in run.lines[-2]
