"""The first frames of a run reach a subscriber that was already listening: over real ZeroMQ on
loopback TCP, every frame id from 0 is published, and any id a subscriber misses is counted as a
drop. Two causes are covered: frames read (and replaced) while the engine loads, and the PUB
socket's "slow joiner" (what is sent before a waiting subscriber has reconnected is lost)."""
from __future__ import annotations

import socket
import time

import cv2
from test_camera import _stalling_capture, write_video
from test_service import config

from mas3_edge.runtime.service import Service
from mas3_edge.runtime.subscriber import Subscriber
from mas3_edge.runtime.swap import EngineSwapper


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cfg) -> tuple[list, dict, Subscriber]:
    """Run the service to its end with a subscriber that connected first; the messages it received."""
    sub = Subscriber(cfg.publish, latest_only=False)  # before the service binds, as a user starts them
    try:
        summary = Service(cfg, echo=lambda line: None, exit_on_signal=False).run()
        msgs = []
        while (m := sub.recv(timeout=0.5)) is not None:
            msgs.append(m)
    finally:
        sub.close()
    return msgs, summary, sub


def _slow_engine_load(monkeypatch, seconds: float) -> None:
    real = EngineSwapper.start

    def start(self):
        time.sleep(seconds)  # an export or a big model: frames keep coming meanwhile
        return real(self)

    monkeypatch.setattr(EngineSwapper, "start", start)


def test_a_video_is_published_from_its_first_frame(tmp_path, tiny_bundle):
    video = write_video(tmp_path / "v.avi", 15, size=(64, 128))
    cfg = config(tmp_path, tiny_bundle, str(video), publish=f"tcp://127.0.0.1:{_free_port()}", loop=False,
                 fps=20, buffer=None)
    msgs, summary, _ = _serve(cfg)
    ids = [m.frame_id for m in msgs]
    assert ids == list(range(15)), ids
    assert summary["camera_dropped"] == 0 and summary["publish_dropped"] == 0


def test_no_frame_of_a_video_is_used_up_while_the_engine_loads(tmp_path, tiny_bundle, monkeypatch):
    _slow_engine_load(monkeypatch, 1.0)  # 20 frames' time at 20 fps
    video = write_video(tmp_path / "v.avi", 10, size=(64, 128))
    cfg = config(tmp_path, tiny_bundle, str(video), publish=f"tcp://127.0.0.1:{_free_port()}", loop=False,
                 fps=20, buffer=None)
    msgs, summary, _ = _serve(cfg)
    ids = [m.frame_id for m in msgs]
    assert ids == list(range(10)), ids
    assert summary["camera_dropped"] == 0
    assert msgs[0].latency_us < 500_000  # frame 0 waited for the engine, but that is no latency of the stream


def test_a_live_camera_starts_at_frame_0_and_every_missed_id_is_a_counted_drop(tmp_path, tiny_bundle, monkeypatch):
    monkeypatch.setattr(cv2, "VideoCapture", _stalling_capture(read_timeout=0.3))
    _slow_engine_load(monkeypatch, 0.5)
    cfg = config(tmp_path, tiny_bundle, "rtsp://10.0.0.2/stream", publish=f"tcp://127.0.0.1:{_free_port()}",
                 loop=False, fps=None, buffer=None, max_frames=12)
    msgs, summary, sub = _serve(cfg)
    ids = [m.frame_id for m in msgs]
    assert ids[0] == 0 and len(ids) == 12 and ids == sorted(ids)
    assert sub.gaps == summary["camera_dropped"] + summary["publish_dropped"]  # nothing lost unseen
