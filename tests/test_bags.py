"""ROS bags in: ROS 2 (sqlite3, MCAP) and ROS 1 bags written with rosbags, read through the real Camera,
the adaptation frame loader and `mas3-edge adapt --buffer BAG`; and every kind of bad bag."""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mas3_edge import bags, bundle, prototypes as P
from mas3_edge.errors import UserError
from mas3_edge.frames import load_frames
from mas3_edge.runtime import ros
from mas3_edge.runtime.camera import Camera, open_reader

pytest.importorskip("rosbags")
_spec = importlib.util.spec_from_file_location("make_bag", Path(__file__).parent.parent / "tools" / "make_bag.py")
make_bag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_bag)

T0, N, SIZE = 1_700_000_000_123_456_789, 6, (32, 64)
TOPIC = "/camera/image_raw"
KINDS = {"sqlite3": "bag2_sqlite", "mcap": "bag2_mcap", "ros1": "drive.bag"}


def frame(i: int, h: int = 48, w: int = 96) -> np.ndarray:
    """RGB: red 200 everywhere, green = 10 * i, blue 0: frame i and the channel order are both visible."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 200, 10 * i
    return rgb


def stamps(n: int = N, fps: float = 20.0) -> list[int]:
    return [T0 + round(i * 1e9 / fps) for i in range(n)]


def write(tmp_path: Path, storage: str, msgs) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return make_bag.write_bag(tmp_path / KINDS[storage], list(msgs), storage)


def camera_bag(tmp_path: Path, storage: str = "sqlite3", compressed: bool = False, n: int = N, fps: float = 20.0):
    def msgs():
        for i, t in enumerate(stamps(n, fps)):
            if compressed:
                yield make_bag.jpeg(TOPIC, t, frame(i))
            else:
                yield ros.image(TOPIC, t, "cam", frame(i), "rgb8")
            yield ros.RosMessage("/odom_note", ros.STRING, t + 1, {"data": "not an image"})
    return write(tmp_path, storage, msgs())


def read_all(source: str) -> list[tuple[int, np.ndarray]]:
    """Every frame through the camera's own source dispatch and reader, in order."""
    reader, out = open_reader(source, SIZE), []
    try:
        while (r := reader.read())[0] != "end":
            assert r[0] == "ok"
            out.append((r[3], r[1]))
    finally:
        reader.close()
    return out


@pytest.mark.parametrize("storage", list(KINDS))
@pytest.mark.parametrize("compressed", [False, True])
def test_each_kind_of_bag_reads_in_order_with_header_stamps(tmp_path, storage, compressed):
    path = camera_bag(tmp_path, storage, compressed)
    got = read_all(str(path))  # one image topic among others: taken without ?topic=
    assert [t for t, _ in got] == stamps()
    for i, (_, rgb) in enumerate(got):
        assert rgb.shape == (48, 96, 3) and rgb.dtype == np.uint8
        assert np.abs(rgb[24, 48].astype(int) - [200, 10 * i, 0]).max() <= (6 if compressed else 0)


@pytest.mark.parametrize("storage", list(KINDS))
def test_the_real_camera_serves_a_bag_paced_at_its_recorded_rate(tmp_path, storage):
    path = camera_bag(tmp_path, storage, n=8, fps=20.0)  # 8 frames over 0.35 s
    with Camera(f"{path}?topic={TOPIC}", SIZE) as cam:
        t0, frames = time.monotonic(), []
        while not cam.ended or frames[-1:] and frames[-1].capture_ns != stamps(8)[-1]:
            if (f := cam.read_latest(timeout=1.0)) is not None:
                frames.append(f)
            assert time.monotonic() - t0 < 10
        elapsed = time.monotonic() - t0
    assert cam.stats.grabbed == 8 and elapsed >= 0.3  # paced at ~20 fps, not as fast as it decodes
    assert [f.capture_ns for f in frames] == sorted(f.capture_ns for f in frames)
    assert set(f.capture_ns for f in frames) <= set(stamps(8, 20.0)) and frames[-1].capture_ns == stamps(8)[-1]
    assert frames[0].image.shape == (*SIZE, 3) and frames[0].image[0, 0, 0] == 200  # RGB, resized
    # the latency clock is the local read time, not the recorded stamp (that would be the recording's age)
    assert all(abs(time.time_ns() - f.read_ns) < 30e9 for f in frames)


def test_fps_zero_is_unpaced_and_loop_repeats_the_recording(tmp_path):
    path = camera_bag(tmp_path, "mcap", n=8, fps=2.0)  # 3.5 s of recording
    t0 = time.monotonic()
    with Camera(str(path), SIZE, fps=0, loop=True) as cam:
        while cam.stats.loops < 2:
            cam.read_latest(timeout=0.5)
            assert time.monotonic() - t0 < 3.0, "--fps 0 should not wait for the recorded rate"
        assert cam.stats.grabbed >= 16 and cam.stats.corrupt == 0


@pytest.mark.parametrize("encoding, dtype, channels", [
    ("rgb8", np.uint8, 3), ("bgr8", np.uint8, 3), ("rgba8", np.uint8, 4), ("bgra8", np.uint8, 4),
    ("mono8", np.uint8, 1), ("8UC1", np.uint8, 1), ("mono16", np.uint16, 1), ("16UC1", np.uint16, 1)])
@pytest.mark.parametrize("bigendian, pad", [(False, 0), (True, 6)])
def test_image_encodings_become_rgb8(encoding, dtype, channels, bigendian, pad):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, np.iinfo(dtype).max, (5, 7, channels), endpoint=True).astype(dtype)
    order = ">" if bigendian else "<"
    rows = arr.astype(arr.dtype.newbyteorder(order)).view(np.uint8).reshape(5, -1)
    data = np.concatenate([rows, np.full((5, pad), 77, np.uint8)], axis=1).reshape(-1)  # padded rows
    msg = SimpleNamespace(encoding=encoding, height=5, width=7, step=rows.shape[1] + pad,
                          is_bigendian=int(bigendian), data=data)
    rgb = bags.to_rgb8(msg)
    eight = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8) if dtype == np.uint16 else arr
    want = {1: np.repeat(eight, 3, axis=2), 3: eight, 4: eight[..., :3]}[channels]
    if encoding.startswith("bgr") or encoding == "8UC3":
        want = want[..., ::-1]
    assert rgb.dtype == np.uint8 and np.array_equal(rgb, want)


def test_mono16_through_a_bag_is_scaled_as_the_camera_scales_16_bit(tmp_path):
    depth = np.full((8, 16), 65535, np.uint16)
    depth[:, :8] = 257 * 40
    path = write(tmp_path, "sqlite3", [ros.image(TOPIC, T0, "cam", depth, "16UC1")])
    (_, rgb), = read_all(str(path))
    assert rgb[0, 0].tolist() == [40, 40, 40] and rgb[0, 15].tolist() == [255, 255, 255]


def test_adaptation_frames_come_from_a_bag_newest_last(tmp_path):
    path = camera_bag(tmp_path, "ros1", n=5)
    frames = load_frames(f"{path}?topic={TOPIC}", SIZE)
    assert frames.shape == (5, *SIZE, 3) and frames[:, 0, 0, 1].tolist() == [0, 10, 20, 30, 40]
    assert load_frames(path, SIZE, limit=2)[:, 0, 0, 1].tolist() == [30, 40]


@pytest.fixture
def proto_bundle(tiny_bundle):
    """The untrained test bundle with a GMM (one component per class), so `adapt` can run."""
    v = bundle.load_version(tiny_bundle)
    k, d = v.net.config.num_classes, v.net.config.embed_dim
    gmm = P.Prototypes(torch.full((k,), 1 / k), torch.randn(k, d, generator=torch.Generator().manual_seed(0)) * 3,
                       torch.eye(d).repeat(k, 1, 1) * 0.5, torch.full((k,), 100.0))
    P.save(gmm, v.prototypes_path, v.meta["source_sha256"], "test")
    return tiny_bundle


def test_adapt_cli_runs_a_round_on_a_bag(tmp_path, proto_bundle):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    path = camera_bag(tmp_path, "mcap", n=6)
    res = CliRunner().invoke(app, ["adapt", "--buffer", f"{path}/?topic={TOPIC}", "--bundle", str(proto_bundle),
                                   "--method", "bn", "--steps", "1", "--no-guard", "--no-serve"])
    assert res.exit_code == 0, res.output
    report = json.loads((proto_bundle / "versions" / "v0002" / "report.json").read_text())
    assert sum(report["frames"].values()) == 6  # adapted on, choosing, judging


# ---------------------------------------------------------------- bad bags


def _main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The console entry point in-process: the exit code and stderr."""
    from mas3_edge.cli import main
    monkeypatch.setattr(sys, "argv", ["mas3-edge", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def _truncated(tmp_path: Path, storage: str) -> Path:
    path = camera_bag(tmp_path, storage, n=20)
    data = next(p for p in ([path] if path.is_file() else path.iterdir()) if p.suffix in (".bag", ".db3", ".mcap"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return path


def _bad_bags(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (--camera / --buffer value, what the error line must say)"""
    only_odom = write(tmp_path / "a", "sqlite3", [ros.RosMessage("/odom_note", ros.STRING, T0, {"data": "x"})])
    two = write(tmp_path / "b", "mcap", [ros.image("/left", T0, "l", frame(0), "rgb8"),
                                         ros.image("/right", T0, "r", frame(0), "rgb8")])
    yuv = write(tmp_path / "c", "ros1", [ros.image(TOPIC, T0, "c", frame(0)[..., :2], "yuv422")])
    return {
        "no image topic": (str(only_odom), "has no sensor_msgs/Image or CompressedImage topic (topics: /odom_note"),
        "two image topics": (str(two), "has 2 image topics (/left, /right); pick one with"),
        "unknown topic": (f"{two}?topic=/front", "topic /front is not in the bag; image topics: /left, /right"),
        "not an image": (f"{only_odom}?topic=/odom_note", "is std_msgs/msg/String, not an image"),
        "encoding": (str(yuv), "image encoding 'yuv422' is not supported"),
        **{f"truncated {s}": (str(_truncated(tmp_path / s, s)), "truncated or damaged") for s in KINDS},
        "missing": (f"{tmp_path}/nowhere?topic=/cam", "no ROS bag at"),
    }


def test_bad_bags_are_one_line_and_exit_1_from_adapt(tmp_path, proto_bundle, monkeypatch, capsys):
    for name, (source, message) in _bad_bags(tmp_path).items():
        code, err = _main(monkeypatch, capsys, "adapt", "--buffer", source, "--bundle", proto_bundle)
        assert code == 1, name
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (name, err)
    assert bundle.version_ids(proto_bundle) == ["v0001"]


def test_bad_bags_fail_the_camera_with_the_same_line(tmp_path):
    for name, (source, message) in _bad_bags(tmp_path).items():
        with pytest.raises(UserError) as e:
            Camera(source, SIZE).connect()
        assert message in str(e.value), name


def test_run_on_a_truncated_bag_is_one_line_and_exit_1(tmp_path, tiny_bundle):
    bag = _truncated(tmp_path, "ros1")
    p = subprocess.run([sys.executable, "-m", "mas3_edge", "run", "--camera", str(bag), "--bundle", str(tiny_bundle),
                        "--no-adapt", "--publish", f"ipc://{tmp_path}/x.sock", "--buffer", str(tmp_path / "f")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "truncated or damaged" in p.stderr, p.stderr


def test_a_bad_message_while_serving_is_a_warning_and_a_skip(tmp_path, caplog):
    msgs = [ros.image(TOPIC, t, "c", frame(i), "rgb8") for i, t in enumerate(stamps(4))]
    msgs[2] = ros.image(TOPIC, stamps(4)[2], "c", frame(2)[..., :2], "yuv422")
    path = write(tmp_path, "sqlite3", msgs)
    with caplog.at_level(logging.WARNING), Camera(str(path), SIZE, fps=100) as cam:
        got = []
        while not cam.ended or got[-1:] and got[-1] != stamps(4)[3]:
            if (f := cam.read_latest(timeout=1.0)) is not None:
                got.append(f.capture_ns)
    assert cam.stats.grabbed == 3 and cam.stats.corrupt == 1 and stamps(4)[2] not in got
    assert "skipping a frame" in caplog.text and "yuv422" in caplog.text


def test_a_bag_damaged_part_way_ends_the_stream_with_a_warning(tmp_path, caplog):
    from mas3_edge.runtime.bag import BagReader
    reader = BagReader(str(camera_bag(tmp_path, "sqlite3")))

    def damaged():
        yield T0, frame(0), None
        raise UserError("drive.db3 is damaged part-way through topic /camera/image_raw: malformed")
    reader._frames, reader._first = damaged(), None
    with caplog.at_level(logging.WARNING):
        assert [reader.read()[0] for _ in range(3)] == ["ok", "end", "end"]
    assert "damaged part-way" in caplog.text and "ending the stream" in caplog.text
    reader.close()


def test_without_rosbags_a_bag_says_how_to_install_it(tmp_path, monkeypatch):
    path = camera_bag(tmp_path, "sqlite3")
    monkeypatch.setitem(sys.modules, "rosbags.highlevel", None)  # `import` now raises ImportError
    with pytest.raises(UserError, match=r'pip install "mas3-edge\[ros\]"'):
        Camera(str(path), SIZE).connect()
    with pytest.raises(UserError, match=r'pip install "mas3-edge\[ros\]"'):
        load_frames(path, SIZE)


def test_make_bag_tool_writes_what_the_readme_uses(tmp_path):
    make_bag.main([str(tmp_path / "drive_bag"), "--frames", "3", "--height", "32", "--width", "64"])
    with bags.Bag(tmp_path / "drive_bag") as bag:
        assert (bag.topic, bag.count, round(bag.fps)) == ("/camera/image_raw", 3, 10)
