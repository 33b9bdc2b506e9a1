"""The segmentation stream: wire format, loopback-only publisher, real ZeroMQ subscribers."""
from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from mas3_edge.errors import UserError
from mas3_edge.runtime import wire
from mas3_edge.runtime.publisher import Publisher, check_address
from mas3_edge.runtime.subscriber import Subscriber


def _msg(fid: int, h: int = 8, w: int = 16, **kw) -> bytes:
    classes = (np.arange(h * w) % 19).astype(np.uint8).reshape(h, w)
    return wire.encode("mas3/seg", fid, time.time_ns(), classes, version="v0002", engine="onnxruntime",
                       label_set="cityscapes19", num_classes=19, infer_us=1234, **kw)


def _v1_msg(fid: int, h: int = 8, w: int = 16) -> bytes:
    """A message as the version 1 publisher packed it (112-byte header, no source size, crop or camera id)."""
    classes = (np.arange(h * w) % 19).astype(np.uint8).tobytes()
    header = struct.pack("<4sHHQqqIIHHBBH16s16s16sIIII", b"M3SG", 1, 112, fid, 1000, 3000, 2, 1234, w, h, 0, 19, 0,
                         b"v0001", b"torch", b"cityscapes19", h * w, 0, 0, 0)
    return b"mas3/seg\0" + header + classes


def test_wire_round_trip_with_all_payloads():
    img = np.random.default_rng(0).integers(0, 256, (8, 16, 3), np.uint8)
    classes = np.full((8, 16), 13, np.uint8)
    conf = np.linspace(0, 1, 128, dtype=np.float32).reshape(8, 16)
    buf = wire.encode("t", 7, 1000, classes, version="v0003", engine="torch", label_set="cityscapes19",
                      num_classes=19, confidence=conf, overlay_jpeg=wire.encode_overlay(img, classes), publish_ns=3000,
                      camera_id="front-left", source_size=(480, 640), crop=(0, 80, 640, 320))
    m = wire.decode(buf)
    assert (m.topic, m.frame_id, m.capture_ns, m.publish_ns, m.latency_us) == ("t", 7, 1000, 3000, 2)
    assert (m.version, m.engine, m.label_set, m.num_classes, m.width, m.height) == ("v0003", "torch", "cityscapes19", 19, 16, 8)
    assert (m.wire_version, m.camera_id, m.source_width, m.source_height, m.crop) == (2, "front-left", 640, 480,
                                                                                      (0, 80, 640, 320))
    assert np.array_equal(m.classes, classes)
    assert np.abs(m.confidence - conf).max() <= 0.5 / 255 + 1e-6
    assert m.overlay_rgb().shape == (8, 16, 3)


def test_wire_layout_matches_the_document():
    """The byte offsets docs/wire-format.md promises to a C++ reader, checked with plain struct calls."""
    buf = _msg(42)
    assert buf[:9] == b"mas3/seg\0"
    h = 9
    assert buf[h:h + 4] == b"M3SG"
    assert struct.unpack_from("<HH", buf, h + 4) == (2, 160)
    assert struct.unpack_from("<Q", buf, h + 8)[0] == 42
    assert struct.unpack_from("<I", buf, h + 36)[0] == 1234
    assert struct.unpack_from("<HHBB", buf, h + 40) == (16, 8, 0, 19)
    assert buf[h + 48:h + 64].rstrip(b"\0") == b"v0002"
    assert buf[h + 64:h + 80].rstrip(b"\0") == b"onnxruntime"
    assert buf[h + 80:h + 96].rstrip(b"\0") == b"cityscapes19"
    assert struct.unpack_from("<III", buf, h + 96) == (128, 0, 0)
    assert struct.unpack_from("<HHHHHH", buf, h + 112) == (16, 8, 0, 0, 16, 8)  # by default the map is the frame
    assert buf[h + 124:h + 156] == b"\0" * 32
    assert buf[h + 160:] == (np.arange(128) % 19).astype(np.uint8).tobytes()
    assert "160" in (Path(__file__).parents[1] / "docs" / "wire-format.md").read_text()


def test_version_1_messages_still_decode():
    m = wire.decode(_v1_msg(5))
    assert (m.wire_version, m.frame_id, m.capture_ns, m.publish_ns, m.infer_us) == (1, 5, 1000, 3000, 1234)
    assert (m.version, m.engine, m.label_set, m.num_classes) == ("v0001", "torch", "cityscapes19", 19)
    assert (m.width, m.height) == (16, 8) and np.array_equal(m.classes.ravel(), np.arange(128) % 19)
    assert (m.camera_id, m.source_width, m.source_height, m.crop) == ("", 0, 0, (0, 0, 0, 0))
    with pytest.raises(wire.WireError, match="no crop box"):
        m.to_source(0, 0)


def test_unknown_versions_and_short_headers_are_rejected():
    v1 = _v1_msg(5)
    for version, size in ((3, 160), (0, 112), (2, 112)):  # a future version; a version 2 that claims 112 bytes
        bad = bytearray(v1)
        struct.pack_into("<HH", bad, 9 + 4, version, size)
        with pytest.raises(wire.WireError, match="unsupported wire version"):
            wire.decode(bytes(bad))
    with pytest.raises(wire.WireError):
        wire.encode("t", 0, 0, np.zeros((8, 16), np.uint8), source_size=(100, 200), crop=(150, 0, 100, 100))


def test_subscriber_reads_version_1_and_2_publishers(tmp_path):
    addr = f"ipc://{tmp_path}/mixed.sock"
    with Publisher(addr, hwm=1000) as pub, Subscriber(addr, latest_only=False) as sub:
        _connected(pub, sub)
        pub.send(_v1_msg(1))
        pub.send(_msg(2, camera_id="cam0"))
        got = [sub.recv(timeout=2) for _ in range(2)]
    assert [(m.wire_version, m.frame_id, m.camera_id) for m in got] == [(1, 1, ""), (2, 2, "cam0")]
    assert sub.malformed == 0 and sub.gaps == 0


@pytest.mark.parametrize("bad", [b"", b"topic-without-nul", b"t\0" + b"XXXX" + bytes(200)])
def test_wire_rejects_malformed(bad):
    with pytest.raises(wire.WireError):
        wire.decode(bad)


def test_truncated_payload_is_rejected():
    with pytest.raises(wire.WireError):
        wire.decode(_msg(1)[:-1])


def test_publisher_binds_loopback_only_unless_told():
    assert check_address("tcp://localhost:5555") == "tcp://127.0.0.1:5555"
    assert check_address("tcp://127.0.0.1:0") == "tcp://127.0.0.1:*"
    for addr in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.4:5555"):
        with pytest.raises(UserError, match="allow-remote"):
            check_address(addr)
    assert check_address("tcp://0.0.0.0:5555", allow_remote=True) == "tcp://0.0.0.0:5555"
    with pytest.raises(UserError, match="not tcp"):
        check_address("udp://127.0.0.1:1")
    for port in ("65536", "99999"):  # ZeroMQ would bind some other port without a word
        with pytest.raises(UserError, match=f"port {port} is not in 1..65535"):
            check_address(f"tcp://127.0.0.1:{port}")
    assert check_address("tcp://127.0.0.1:65535") == "tcp://127.0.0.1:65535"


def test_subscriber_rejects_a_port_it_could_never_reach():
    for addr, message in (("tcp://127.0.0.1:99999", "port 99999"), ("tcp://127.0.0.1:0", "port 0"),
                          ("tcp://127.0.0.1", "not tcp://HOST:PORT")):
        with pytest.raises(UserError, match=message):
            Subscriber(addr)
    Subscriber("tcp://[::1]:5555").close()


def test_a_new_publisher_holds_its_first_frame_until_a_waiting_subscriber_can_join():
    from mas3_edge.runtime.publisher import JOIN_S
    with Publisher("tcp://127.0.0.1:0") as pub:
        assert 0 < pub.join_wait() <= JOIN_S
        time.sleep(JOIN_S)
        assert pub.join_wait() == 0


def test_port_in_use_is_one_clear_error():
    with Publisher("tcp://127.0.0.1:0") as a:
        with pytest.raises(UserError, match="cannot publish"):
            Publisher(a.endpoint)


def _connected(pub: Publisher, sub: Subscriber, timeout: float = 3.0) -> None:
    """PUB drops until the subscription arrives (slow joiner): send probes until one is received."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.send(_msg(0))
        if sub.recv(timeout=0.05) is not None:
            return
    raise AssertionError("subscriber never connected")


def test_every_message_mode_over_ipc(tmp_path):
    addr = f"ipc://{tmp_path}/seg.sock"
    with Publisher(addr, hwm=1000) as pub, Subscriber(addr, latest_only=False) as sub:
        _connected(pub, sub)
        for i in range(1, 201):
            assert pub.send(_msg(i))
        got = [sub.recv(timeout=2).frame_id for _ in range(200)]
    assert got == list(range(1, 201)) and sub.gaps == 0


def test_latest_only_mode_keeps_the_newest():
    with Publisher("tcp://127.0.0.1:0", hwm=1000) as pub, Subscriber(pub.endpoint, latest_only=True) as sub:
        _connected(pub, sub)
        for i in range(1, 51):
            pub.send(_msg(i))
        time.sleep(0.3)  # let all of them arrive; CONFLATE keeps only the last
        m = sub.recv(timeout=1)
        assert m.frame_id == 50
        assert sub.recv(timeout=0.1) is None


def test_topic_filter_is_exact():
    with Publisher("tcp://127.0.0.1:0") as pub, Subscriber(pub.endpoint, topic="mas3/se", latest_only=False) as sub:
        time.sleep(0.2)
        for i in range(20):
            pub.send(_msg(i))
        assert sub.recv(timeout=0.3) is None


def test_stalled_subscriber_never_blocks_the_publisher(tmp_path):
    """A subscriber that connects and never reads: 3000 sends of 64 KB maps return at once."""
    addr = f"ipc://{tmp_path}/stall.sock"
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    with Publisher(addr, hwm=2) as pub:
        stalled.connect(addr)
        time.sleep(0.2)
        t0 = time.perf_counter()
        for i in range(3000):
            pub.send(_msg(i, 256, 256))
        elapsed = time.perf_counter() - t0
    stalled.close(0)
    ctx.term()
    assert pub.sent + pub.dropped == 3000
    assert elapsed < 5.0, f"sending took {elapsed:.1f} s: the publisher blocked"


def test_subscriber_rejects_bad_address():
    with pytest.raises(UserError):
        Subscriber("udp://x:1")


def test_subscribe_command_saves_overlays_and_reports(tmp_path, monkeypatch):
    """`mas3-edge subscribe --save DIR --count N` against a live publisher thread."""
    import threading

    from typer.testing import CliRunner

    from mas3_edge.cli import app
    addr, stop = f"ipc://{tmp_path}/cli.sock", threading.Event()

    def publish():
        img = np.zeros((8, 16, 3), np.uint8)
        with Publisher(addr, hwm=1000) as pub:
            i = 0
            while not stop.is_set():
                i += 1
                classes = np.full((8, 16), i % 19, np.uint8)
                pub.send(wire.encode("mas3/seg", i, time.time_ns(), classes, version="v0001",
                                     overlay_jpeg=wire.encode_overlay(img, classes)))
                time.sleep(0.01)

    t = threading.Thread(target=publish, daemon=True)
    t.start()
    try:
        res = CliRunner().invoke(app, ["subscribe", "--address", addr, "--all", "--count", "20", "--save",
                                       str(tmp_path / "png"), "--interval", "0.1"])
    finally:
        stop.set()
        t.join(2)
    assert res.exit_code == 0, res.output
    assert "received 20 messages" in res.output and "msg/s" in res.output
    assert len(list((tmp_path / "png").glob("*.png"))) == 20
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    res = CliRunner().invoke(app, ["subscribe", "--address", addr, "--show", "--count", "1"])
    assert isinstance(res.exception, UserError) and "display" in str(res.exception)
