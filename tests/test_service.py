"""`run`: a generated video through the real service to a real ZeroMQ subscriber; hot swap,
rollback, faults, clean shutdown of a real process."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_camera import write_video

from mas3_edge import bundle
from mas3_edge.errors import UserError
from mas3_edge.model import SegNet
from mas3_edge.runtime.frame_buffer import BufferPolicy
from mas3_edge.runtime.service import Service, ServiceConfig
from mas3_edge.runtime.subscriber import Subscriber
from mas3_edge.runtime.swap import EngineSwapper


def second_version(root: Path, seed: int = 1, serve: bool = False) -> str:
    from conftest import SMALL
    torch.manual_seed(seed)
    parent = bundle.load_version(root)
    return bundle.save_version(root, SegNet(SMALL).eval(), parent=parent, serve=serve,
                               info={"kind": "adapted", "health": {"swd": 0.1, "entropy": 0.5, "prior_kl": 0.2}}).name


def config(tmp_path: Path, root: Path, camera: str, **kw) -> ServiceConfig:
    base = dict(camera=camera, bundle=root, engine="torch", threads=1, publish=f"ipc://{tmp_path}/seg.sock",
                buffer=tmp_path / "frames", adapt=False, status_every=0.5, loop=True, fps=25)
    return ServiceConfig(**{**base, **kw})


class Running:
    """A Service on a thread (signals stay with pytest), its status lines, and a subscriber."""

    def __init__(self, cfg: ServiceConfig, latest_only: bool = False, **kw):
        self.lines: list[str] = []
        self.svc = Service(cfg, echo=self.lines.append, **kw)
        self.summary = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sub = Subscriber(cfg.publish, latest_only=latest_only)

    def _run(self):
        self.summary = self.svc.run()

    def __enter__(self):
        self.thread.start()
        return self

    def collect(self, seconds: float, until=None) -> list:
        msgs, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline and not (until and until(msgs)):
            m = self.sub.recv(timeout=0.2)
            if m is not None:
                msgs.append(m)
        return msgs

    def __exit__(self, *exc):
        self.svc.stop()
        self.thread.join(5)
        self.sub.close()
        assert not self.thread.is_alive()


def test_video_to_subscriber_end_to_end(tmp_path, tiny_bundle):
    video = write_video(tmp_path / "v.avi", 20, size=(240, 320))
    with Running(config(tmp_path, tiny_bundle, str(video))) as run:
        msgs = run.collect(8, until=lambda m: len(m) >= 15)
    assert len(msgs) >= 15
    m = msgs[-1]
    assert (m.version, m.engine, m.width, m.height, m.label_set) == ("v0001", "torch", 128, 64, "cityscapes19")
    assert (m.wire_version, m.camera_id, m.source_width, m.source_height, m.crop) == (2, "v.avi", 320, 240,
                                                                                      (0, 40, 320, 160))
    assert m.classes.max() < 19 and m.overlay_rgb().shape == (64, 128, 3)
    assert 0 <= m.latency_us < 5e6 and m.publish_ns >= m.capture_ns
    assert all(b.frame_id > a.frame_id for a, b in zip(msgs, msgs[1:]))
    assert run.summary["frames"] >= 15 and any("fps" in line for line in run.lines)


def test_hot_swap_and_rollback_happen_between_frames(tmp_path, tiny_bundle):
    video = write_video(tmp_path / "v.avi", 30, size=(64, 128))
    v2 = second_version(tiny_bundle)
    events = tmp_path / "events.jsonl"
    with Running(config(tmp_path, tiny_bundle, str(video), events=events, fps=12)) as run:
        run.collect(1.0)
        bundle.set_serving(tiny_bundle, v2)  # what an accepted round or `mas3-edge adapt` does
        msgs = run.collect(6, until=lambda m: sum(x.version == v2 for x in m) >= 10)
        from mas3_edge.runtime.versions import rollback
        assert rollback(tiny_bundle) == (v2, "v0001")
        msgs += run.collect(6, until=lambda m: m and m[-1].version == "v0001")
    versions = [m.version for m in msgs]
    assert v2 in versions and versions[-1] == "v0001"
    for a, b in zip(msgs, msgs[1:]):
        if a.version != b.version:  # the swap: consecutive frame ids, no frame lost to it
            assert b.frame_id == a.frame_id + 1, (a.frame_id, b.frame_id)
    kinds = [__import__("json").loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds.count("swap") == 2 and kinds[0] == "start" and kinds[-1] == "stop"


def test_synthetic_source_reports_live_miou_and_metrics(tmp_path, tiny_bundle):
    cfg = config(tmp_path, tiny_bundle, "synthetic://fog", metrics_port=0, fps=20,  # a "full" disk: buffering
                 buffer_policy=BufferPolicy(min_free_mb=1e12, every_n=1, min_interval_s=0))  # stops, serving not
    with Running(cfg) as run:
        run.collect(3, until=lambda m: len(m) >= 11)  # the 11th is sent after the 10th was counted
        url = run.svc.metrics.url
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        health = urllib.request.urlopen(f"{url}/healthz", timeout=5).status
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["mas3_frames"].samples[0].value >= 10 and fams["mas3_latency_seconds"].type == "histogram"
    assert {"version": "v0001", "engine": "torch"}.items() <= fams["mas3_serving_info"].samples[0].labels.items()
    assert "mas3_live_miou_ratio" in fams and health == 200
    status = [line for line in run.lines if "mIoU last" in line]
    assert status and "buffer 0 (stopped: disk" in status[-1]
    assert run.summary["miou_window"] is not None and run.summary["frames"] >= 10
    assert run.summary["buffer_dropped"] >= 5  # what the policy chose while buffering was stopped


def test_overlay_fps_thins_the_overlays_and_keeps_every_frames_classes(tmp_path, tiny_bundle):
    with Running(config(tmp_path, tiny_bundle, "synthetic://fog", fps=30, overlay_fps=5)) as run:
        msgs = run.collect(3, until=lambda m: len(m) >= 60)
    drawn = [m.publish_ns / 1e9 for m in msgs if m.overlay_jpeg]
    span = (msgs[-1].publish_ns - msgs[0].publish_ns) / 1e9
    assert len(msgs) >= 40 and all(m.classes.shape == (64, 128) for m in msgs)
    assert 2 <= len(drawn) <= 5 * span + 2 and min(b - a for a, b in zip(drawn, drawn[1:])) > 0.1, (len(drawn), span)


@pytest.mark.parametrize("confidence", [False, True])
def test_onnxruntime_serves_the_confidence_map_only_when_asked(tmp_path, tiny_bundle, confidence):
    from mas3_edge.export.onnx import export_onnx
    export_onnx(bundle.resolve(tiny_bundle))
    cfg = config(tmp_path, tiny_bundle, "synthetic://fog", engine="onnxruntime", confidence=confidence)
    with Running(cfg) as run:
        msgs = run.collect(5, until=lambda m: len(m) >= 3)
    assert len(msgs) >= 3 and all((m.confidence is not None) == confidence for m in msgs)
    if confidence:
        assert all(0.0 < m.confidence.min() and m.confidence.max() <= 1.0 for m in msgs)


def test_bad_numbers_are_refused_by_the_config_itself(tmp_path, tiny_bundle):
    for kw, message in ((dict(fps=-1), "--fps must be 0"), (dict(duration=0), "--duration"),
                        (dict(overlay_fps=-2), "--overlay-fps"),
                        (dict(metrics_port=70000), "--metrics-port"), (dict(max_frames=0), "--max-frames"),
                        (dict(publish="tcp://127.0.0.1:99999"), "port 99999"),
                        (dict(status_every=float("nan")), "status")):
        with pytest.raises(UserError, match=message):
            config(tmp_path, tiny_bundle, "synthetic://fog", **kw)


def test_corrupt_serving_version_falls_back_to_the_last_good_one(tiny_bundle, caplog):
    v2 = second_version(tiny_bundle, serve=True)
    weights = tiny_bundle / "versions" / v2 / bundle.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: the hash no longer matches
    (tiny_bundle / "versions" / "v0003").mkdir()  # a version directory with nothing in it
    swapper = EngineSwapper(tiny_bundle, kind="torch")
    engine = swapper.start()
    swapper.close()
    assert engine.version == "v0001" and v2 in swapper.skipped
    assert any("cannot be served" in r.message for r in caplog.records)


def test_a_bad_new_version_never_replaces_the_serving_engine(tiny_bundle):
    swapper = EngineSwapper(tiny_bundle, kind="torch", poll_s=0.05)
    swapper.start()
    v2 = second_version(tiny_bundle)
    (tiny_bundle / "versions" / v2 / bundle.MODEL_FILE).write_bytes(b"garbage")
    bundle.set_serving(tiny_bundle, v2)
    deadline = time.monotonic() + 5
    while v2 not in swapper.skipped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert v2 in swapper.skipped and swapper.poll() is None and swapper.version == "v0001"
    swapper.close()


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from mas3_edge.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_missing_camera_is_one_line_and_exit_1(tmp_path, tiny_bundle):
    p = _cli("run", "--camera", str(tmp_path / "none.avi"), "--bundle", str(tiny_bundle), "--no-adapt",
             "--publish", f"ipc://{tmp_path}/x.sock", "--buffer", str(tmp_path / "f"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert err.strip().count("\n") == 0 and err.startswith("error: camera source") and "Traceback" not in err


def test_sigterm_shuts_a_real_process_down_within_two_seconds(tmp_path, tiny_bundle):
    video = write_video(tmp_path / "v.avi", 30, size=(64, 128))
    sock = tmp_path / "seg.sock"
    p = _cli("run", "--camera", str(video), "--loop", "--bundle", str(tiny_bundle), "--engine", "torch",
             "--publish", f"ipc://{sock}", "--buffer", str(tmp_path / "frames"), "--buffer-every", "1",
             "--buffer-interval", "0", "--no-adapt", "--status-every", "0.5")
    deadline = time.monotonic() + 60
    with Subscriber(f"ipc://{sock}", latest_only=True) as sub:
        while sub.recv(timeout=0.5) is None:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, err
    assert elapsed < 2.0, f"shutdown took {elapsed:.2f} s"
    assert "stopped after" in err and not sock.exists()  # the socket was closed (libzmq unlinks it)
    assert not list((tmp_path / "frames").glob("*.tmp")) and list((tmp_path / "frames").glob("*.png"))


def test_versions_and_rollback_commands(tiny_bundle, monkeypatch):
    from typer.testing import CliRunner
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes tables to the terminal; CliRunner has none
    from mas3_edge.cli import app
    v2 = second_version(tiny_bundle, serve=True)
    (tiny_bundle / "versions" / "v0009").mkdir()
    (tiny_bundle / "versions" / "v0009" / bundle.META_FILE).write_text("{broken")
    runner = CliRunner()
    res = runner.invoke(app, ["versions", "--bundle", str(tiny_bundle)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "v0001" in res.output and v2 in res.output and "0.1000" in res.output and "corrupt" in res.output
    res = runner.invoke(app, ["rollback", "--bundle", str(tiny_bundle)])
    assert res.exit_code == 0 and bundle.serving_id(tiny_bundle) == "v0001"
    res = runner.invoke(app, ["rollback", "--bundle", str(tiny_bundle)])
    assert isinstance(res.exception, UserError) and "no parent" in str(res.exception)
    res = runner.invoke(app, ["rollback", "v0009", "--bundle", str(tiny_bundle)])
    assert isinstance(res.exception, UserError) and bundle.serving_id(tiny_bundle) == "v0001"
    res = runner.invoke(app, ["rollback", v2, "--bundle", str(tiny_bundle)])
    assert res.exit_code == 0 and bundle.serving_id(tiny_bundle) == v2


def test_buffer_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    monkeypatch.setenv("COLUMNS", "200")
    from mas3_edge.cli import app
    from mas3_edge.runtime.frame_buffer import FrameBuffer
    buf = FrameBuffer(tmp_path / "frames", BufferPolicy(every_n=1, min_interval_s=0, dedup=0, min_free_mb=0))
    for i in range(3):
        buf.offer(np.random.default_rng(i).integers(0, 255, (16, 32, 3), np.uint8), t=float(i))
    buf.close()
    res = CliRunner().invoke(app, ["buffer", "--buffer", str(tmp_path / "frames")], terminal_width=200)
    assert res.exit_code == 0 and "00000002.png" in res.output
