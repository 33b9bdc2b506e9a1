"""MCAP out: `mas3-edge subscribe --record` against a real Publisher on a tcp loopback port, read back
with rosbags (and the mcap reader for a recorder killed with SIGKILL); the stream -> ROS 2 conversion."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mas3_edge.errors import UserError
from mas3_edge.runtime import ros, wire
from mas3_edge.runtime.publisher import Publisher

pytest.importorskip("rosbags")
pytest.importorskip("mcap")
from rosbags.highlevel import AnyReader, AnyReaderError  # noqa: E402

from mas3_edge.runtime.record import McapRecorder  # noqa: E402

T0, H, W = 1_700_000_000_000_000_000, 48, 64
_IMG = np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)
_JPEGS = [wire.encode_overlay(_IMG, np.full((H, W), c, np.uint8)) for c in range(19)]


def expected(i: int) -> dict:
    """Frame i of the test stream: everything a reader must get back is a function of i."""
    classes = ((np.arange(H * W) + i) % 19).astype(np.uint8).reshape(H, W)
    classes[0, 0] = 255  # ignore survives
    return {"stamp": T0 + i * 50_000_000 + 7, "classes": classes, "conf": np.full((H, W), (i % 256) / 255, np.float32),
            "jpeg": _JPEGS[i % 19], "version": f"v000{(i // 10) % 2 + 1}"}


def encoded(i: int) -> bytes:
    e = expected(i)
    return wire.encode("mas3/seg", i, e["stamp"], e["classes"], version=e["version"], engine="onnxruntime",
                       label_set="cityscapes19", num_classes=19, confidence=e["conf"] if i % 3 else None,
                       overlay_jpeg=e["jpeg"], camera_id="front")


class Stream:
    """A real Publisher on tcp://127.0.0.1:<free port> sending frame 0, 1, 2 ... every `period` s."""

    def __init__(self, period: float = 0.005):
        self.pub = Publisher("tcp://127.0.0.1:0", hwm=1000)
        self.stop, self.period = threading.Event(), period
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.pub.send(encoded(i))
            i += 1
            time.sleep(self.period)

    def __enter__(self) -> str:
        self.thread.start()
        return self.pub.endpoint

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(2)
        self.pub.close()


def read_rosbags(path: Path) -> dict[str, list]:
    """topic -> [(log time, deserialized message)], through rosbags' own MCAP reader."""
    out: dict[str, list] = {}
    with AnyReader([path]) as reader:
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, reader.deserialize(raw, conn.msgtype)))
    return out


def frame_index(stamp) -> int:
    return (stamp.sec * 1_000_000_000 + stamp.nanosec - T0) // 50_000_000


def check_frame(topics: dict[str, list], k: int) -> int:
    """The k-th recorded frame matches the stream; returns its frame index."""
    t, cls = topics["/mas3/classes"][k]
    i = frame_index(cls.header.stamp)
    e = expected(i)
    assert t == e["stamp"] and cls.header.frame_id == "front"
    assert (cls.encoding, cls.height, cls.width, cls.step) == ("mono8", H, W, W)
    assert np.array_equal(cls.data.reshape(H, W), e["classes"])
    ov = next(m for s, m in topics["/mas3/overlay"] if s == t)
    assert ov.format == "jpeg" and ov.data.tobytes() == e["jpeg"]
    conf = [m for s, m in topics.get("/mas3/confidence", []) if s == t]
    assert len(conf) == (1 if i % 3 else 0)  # only where the stream sent one
    if conf:
        assert np.array_equal(conf[0].data.reshape(H, W), np.rint(e["conf"] * 255).astype(np.uint8))
    return i


def test_subscribe_record_writes_ros2_messages_that_read_back(tmp_path):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    out = tmp_path / "out.mcap"
    with Stream() as endpoint:
        res = CliRunner().invoke(app, ["subscribe", "--address", endpoint, "--record", str(out), "--count", "25",
                                       "--interval", "0.2"])
    assert res.exit_code == 0, res.output
    assert "recorded 25 frames" in res.output
    topics = read_rosbags(out)
    assert len(topics["/mas3/classes"]) == len(topics["/mas3/overlay"]) == 25
    ids = [check_frame(topics, k) for k in range(25)]
    assert ids == list(range(ids[0], ids[0] + 25))  # --record implies every message, not the newest only
    changes = [i for i in ids if i == ids[0] or expected(i)["version"] != expected(i - 1)["version"]]
    infos = topics["/mas3/info"]
    assert [t for t, _ in infos] == [expected(i)["stamp"] for i in changes] and len(changes) >= 2
    info = json.loads(infos[-1][1].data)
    assert info["model_version"] == expected(changes[-1])["version"] and info["label_set"] == "cityscapes19"
    assert info["classes"][13] == "car" and len(info["palette"]) == 19 and info["camera_id"] == "front"


def test_the_file_is_a_ros2_mcap_with_ros2msg_schemas(tmp_path):
    from mcap.reader import make_reader
    with McapRecorder(tmp_path / "o.mcap") as rec:
        for i in range(3):
            assert rec.write(wire.decode(encoded(i)))
    with open(tmp_path / "o.mcap", "rb") as f:
        reader = make_reader(f)
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
    types = {c.topic: (c.message_encoding, summary.schemas[c.schema_id]) for c in summary.channels.values()}
    assert {t: s.name for t, (_, s) in types.items()} == {t: ros.TYPES[k] for k, t in ros.TOPICS.items()}
    assert all(enc == "cdr" and s.encoding == "ros2msg" for enc, s in types.values())
    assert b"MSG: std_msgs/Header" in types["/mas3/classes"][1].data  # nested types travel with the file


def test_max_mb_bounds_the_file_and_it_still_reads_back(tmp_path):
    path = tmp_path / "capped.mcap"
    with McapRecorder(path, max_mb=1.0, chunk_kb=64) as rec:
        written = sum(rec.write(wire.decode(encoded(i))) for i in range(2000))
    assert rec.full and 10 < written < 2000
    assert 0.5 * 2**20 < path.stat().st_size <= 2**20
    assert len(read_rosbags(path)["/mas3/classes"]) == written


def test_subscribe_stops_at_max_mb_and_checks_its_options(tmp_path):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    with Stream(period=0.001) as endpoint:
        res = CliRunner().invoke(app, ["subscribe", "--address", endpoint, "--record", str(tmp_path / "c.mcap"),
                                       "--max-mb", "0.5", "--duration", "60"])
    assert res.exit_code == 0 and "stopped at --max-mb" in res.output, res.output
    assert (tmp_path / "c.mcap").stat().st_size <= 0.5 * 2**20
    for args, message in ((["--max-mb", "1"], "--max-mb bounds a recording"),
                          (["--record", str(tmp_path / "c.mcap")], "exists")):
        res = CliRunner().invoke(app, ["subscribe", "--count", "1", *args])
        assert isinstance(res.exception, UserError) and message in str(res.exception)


def test_without_the_ros_extra_recording_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mcap.writer", None)  # `import` now raises ImportError
    with pytest.raises(UserError, match=r'pip install "mas3-edge\[ros\]"'):
        McapRecorder(tmp_path / "x.mcap")
    assert not (tmp_path / "x.mcap").exists()


def read_killed(path: Path) -> list[tuple[str, int, object]]:
    """(topic, log time, message) of every complete chunk of a file with no summary (the mcap reader
    reads it front to back; rosbags' reader needs the summary a killed recorder never wrote)."""
    from mcap.exceptions import EndOfFile
    from mcap.reader import NonSeekingReader
    store, out = ros.typestore(), []
    try:
        for schema, channel, m in NonSeekingReader(io.BytesIO(path.read_bytes())).iter_messages(log_time_order=False):
            out.append((channel.topic, m.log_time, store.deserialize_cdr(m.data, schema.name)))
    except EndOfFile:  # the end of the last complete chunk: nothing after it was written
        pass
    return out


def record_until_signal(out: Path, sig: int) -> subprocess.Popen:
    """A real `mas3-edge subscribe --record` process, sent `sig` once three chunks are on disk."""
    with Stream(period=0.002) as endpoint:
        p = subprocess.Popen([sys.executable, "-m", "mas3_edge", "subscribe", "--address", endpoint,
                              "--record", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sizes, deadline = set(), time.monotonic() + 60
        while len(sizes) < 4:  # the header, then three chunks flushed
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            if out.exists():
                sizes.add(out.stat().st_size)
            time.sleep(0.01)
        os.kill(p.pid, sig)
        p.communicate(timeout=10)
    return p


def test_sigterm_closes_the_recording_with_its_index(tmp_path):
    p = record_until_signal(tmp_path / "term.mcap", signal.SIGTERM)
    assert p.returncode == 0
    topics = read_rosbags(tmp_path / "term.mcap")  # seeks by the summary: it was written
    assert len(topics["/mas3/classes"]) >= 3 and check_frame(topics, -1) >= 0


def test_a_recorder_killed_with_sigkill_leaves_its_chunks_readable(tmp_path):
    out = tmp_path / "killed.mcap"
    p = record_until_signal(out, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    msgs = read_killed(out)
    classes = [(t, m) for topic, t, m in msgs if topic == "/mas3/classes"]
    assert len(classes) >= 3  # at least three chunks' worth, each frame intact
    ids = [frame_index(m.header.stamp) for _, m in classes]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    for (t, m), i in zip(classes, ids):
        assert t == expected(i)["stamp"] and np.array_equal(m.data.reshape(H, W), expected(i)["classes"])
    with pytest.raises(AnyReaderError):  # what a summary-seeking reader says; `mcap recover` rebuilds it
        read_rosbags(out)


def test_conversion_is_one_module_for_recorder_and_bridge():
    conv = ros.Converter()
    first = conv.convert(wire.decode(encoded(1)))
    assert [m.topic for m in first] == ["/mas3/info", "/mas3/classes", "/mas3/overlay", "/mas3/confidence"]
    assert all(m.stamp_ns == expected(1)["stamp"] for m in first)
    assert [m.topic for m in conv.convert(wire.decode(encoded(3)))] == ["/mas3/classes", "/mas3/overlay"]
    assert conv.convert(wire.decode(encoded(10)))[0].topic == "/mas3/info"  # v0001 -> v0002


def test_the_bridge_builds_its_rclpy_messages_from_the_same_conversion():
    """tools/ros2_bridge.py imports without ROS; its message building runs on stand-in rclpy classes."""
    import array
    import importlib.util
    from types import SimpleNamespace
    spec = importlib.util.spec_from_file_location("ros2_bridge", Path(__file__).parents[1] / "tools" / "ros2_bridge.py")
    bridge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bridge)
    assert bridge.ros is ros

    class Stamped(SimpleNamespace):  # what an rclpy message with a std_msgs/Header looks like
        def __init__(self):
            super().__init__(header=SimpleNamespace(stamp=SimpleNamespace(sec=0, nanosec=0), frame_id=""))
    fakes = {ros.IMAGE: Stamped, ros.COMPRESSED: Stamped, ros.STRING: SimpleNamespace}
    out = [bridge.to_rclpy(rm, fakes) for rm in ros.Converter("cam_front").convert(wire.decode(encoded(4)))]
    info, cls, ov, conf = out
    assert json.loads(info.data)["model_version"] == "v0001" and not hasattr(info, "header")
    assert (cls.header.stamp.sec, cls.header.stamp.nanosec) == divmod(expected(4)["stamp"], 10**9)
    assert cls.header.frame_id == "cam_front" and (cls.encoding, cls.height, cls.width, cls.step) == ("mono8", H, W, W)
    assert isinstance(cls.data, array.array) and cls.data.tobytes() == expected(4)["classes"].tobytes()
    assert ov.format == "jpeg" and ov.data.tobytes() == expected(4)["jpeg"] and conf.encoding == "mono8"
