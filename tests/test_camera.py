"""Camera capture: real OpenCV reads of generated video files and image folders, synthetic scenes."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from mas3_edge.errors import UserError
from mas3_edge.runtime import camera as camera_mod
from mas3_edge.runtime.camera import Camera, Frame, default_camera_id, fit, refit, to_rgb

SIZE = (64, 128)


def write_video(path: Path, n: int, size: tuple[int, int] = (160, 320), fps: float = 30.0) -> Path:
    """An MJPG AVI whose frame i is red on the left, and has i encoded in the blue level on the right."""
    h, w = size
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    for i in range(n):
        bgr = np.zeros((h, w, 3), np.uint8)
        bgr[:, : w // 2, 2] = 255
        bgr[:, w // 2:, 0] = (i * 8) % 256
        vw.write(bgr)
    vw.release()
    return path


def drain(cam: Camera, seconds: float = 5.0, pause: float = 0.0) -> list:
    frames, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline and not cam.ended:
        f = cam.read_latest(timeout=0.2)
        if f is not None:
            frames.append(f)
            time.sleep(pause)
    while (f := cam.read_latest(timeout=0)) is not None:
        frames.append(f)
    return frames


def test_video_frames_arrive_rgb_at_model_size(tmp_path):
    video = write_video(tmp_path / "v.avi", 10)
    with Camera(str(video), SIZE, fps=0) as cam:
        frames = drain(cam)
    assert frames and all(f.image.shape == (*SIZE, 3) and f.image.dtype == np.uint8 for f in frames)
    left = frames[0].image[:, :40].reshape(-1, 3).mean(0)
    assert left[0] > 200 and left[2] < 60, f"BGR was not converted to RGB: {left}"
    assert [f.id for f in frames] == sorted({f.id for f in frames})
    assert cam.ended and cam.stats.grabbed == 10


def test_only_the_newest_frame_is_kept_and_drops_are_counted(tmp_path):
    video = write_video(tmp_path / "v.avi", 60)
    with Camera(str(video), SIZE, fps=400) as cam:  # paced like a camera, faster than its consumer
        frames = drain(cam, pause=0.03)
    s = cam.stats
    assert s.dropped > 0
    assert s.delivered + s.dropped == s.grabbed == 60
    assert all(b.id > a.id for a, b in zip(frames, frames[1:]))


def test_an_unpaced_file_is_read_one_frame_ahead_and_loses_none(tmp_path):
    video = write_video(tmp_path / "v.avi", 12)
    with Camera(str(video), SIZE, fps=0) as cam:
        time.sleep(0.3)  # a slow consumer: the reader must wait for it, not decode on
        assert cam.stats.grabbed == 1
        frames = drain(cam, pause=0.01)
    assert [f.id for f in frames] == list(range(12)) and cam.stats.dropped == 0


def test_file_loops_when_asked(tmp_path):
    video = write_video(tmp_path / "v.avi", 5)
    with Camera(str(video), SIZE, fps=0, loop=True) as cam:
        drain(cam, seconds=0.3)  # an unpaced file is read only as fast as it is consumed
        assert not cam.ended
    assert cam.stats.loops >= 1 and cam.stats.grabbed > 5


def test_file_rate_is_paced(tmp_path):
    video = write_video(tmp_path / "v.avi", 12, fps=40)
    t0 = time.monotonic()
    with Camera(str(video), SIZE) as cam:  # default: the file's own frame rate
        frames = drain(cam)
    assert time.monotonic() - t0 >= 11 / 40 * 0.8
    assert len(frames) == 12 and cam.stats.dropped == 0


def test_folder_converts_grey_16bit_bgra_and_skips_corrupt(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    cv2.imwrite(str(d / "0.png"), np.full((40, 80), 90, np.uint8))
    cv2.imwrite(str(d / "1.png"), np.full((100, 200, 3), 40000, np.uint16))
    (d / "2.png").write_bytes(b"\x89PNG not really")
    cv2.imwrite(str(d / "3.png"), np.full((64, 128, 4), 200, np.uint8))
    cv2.imwrite(str(d / "4.jpg"), np.zeros((480, 640, 3), np.uint8))
    with Camera(str(d), SIZE, fps=20) as cam:
        frames = drain(cam)
    assert len(frames) == 4 and cam.stats.corrupt == 1
    assert all(f.image.shape == (*SIZE, 3) and f.image.dtype == np.uint8 for f in frames)
    assert frames[1].image.max() == round(40000 / 257)


def test_fit_crops_to_the_aspect_ratio():
    img = np.zeros((240, 320, 3), np.uint8)
    img[:40] = 255  # top band outside the central 2:1 crop
    assert fit(img, SIZE).max() == 0
    assert to_rgb(np.zeros((5, 5, 3), np.float32)).dtype == np.uint8
    with pytest.raises(ValueError):
        to_rgb(np.zeros((0, 5, 3), np.uint8))


def test_missing_and_unreadable_sources_fail_with_one_line(tmp_path):
    with pytest.raises(UserError, match="neither a file"):
        Camera(str(tmp_path / "nope.avi"), SIZE).connect()
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(UserError, match="cannot read video file"):
        Camera(str(bad), SIZE).connect()
    with pytest.raises(UserError, match="no camera at index 57"):
        Camera("57", SIZE).connect()
    with pytest.raises(UserError, match="unknown domain"):
        Camera("synthetic://mars", SIZE).connect()


def test_synthetic_source_carries_labels():
    with Camera("synthetic://night?seed=3", SIZE, fps=50) as cam:
        f = cam.read_latest(timeout=5)
    assert f.image.shape == (*SIZE, 3) and f.label.shape == SIZE and f.label.dtype == np.uint8
    assert cam.has_labels


def test_vanished_device_is_reopened_with_backoff(tmp_path):
    """A live source whose stream ends is reopened; while it is gone, reopening backs off."""
    video = write_video(tmp_path / "cam.avi", 5)
    cam = Camera(str(video), SIZE, fps=100, live=True, max_failures=2, backoff=(0.05, 0.2)).connect()
    try:
        deadline = time.monotonic() + 5
        while cam.stats.reconnects < 1 and time.monotonic() < deadline:
            cam.read_latest(timeout=0.1)
        assert cam.stats.reconnects >= 1
        video.rename(tmp_path / "away.avi")  # the device disappears
        time.sleep(0.6)
        gone_at, grabbed = cam.stats.reconnects, cam.stats.grabbed
        assert not cam.connected
        (tmp_path / "away.avi").rename(video)  # and comes back
        while cam.stats.grabbed <= grabbed and time.monotonic() < deadline + 5:
            cam.read_latest(timeout=0.1)
        assert cam.stats.reconnects > gone_at and cam.stats.grabbed > grabbed
    finally:
        cam.disconnect()


class _DeviceCapture:
    """What a cv2.VideoCapture of a live device at 30 fps answers besides reading."""

    def set(self, *a):
        return True

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self):
        pass


class _FlakyCapture(_DeviceCapture):
    """Stands in for cv2.VideoCapture (lerobot-style): good frames, garbage, and failed reads."""

    script = ["ok", "empty", "int32", "ok", "fail", "ok", "weird", "ok"]

    def __init__(self, *args, **kwargs):
        self.i = 0

    def isOpened(self):
        return True

    def grab(self):
        self.step = self.script[self.i % len(self.script)]
        self.i += 1
        return self.step != "fail"

    def retrieve(self):
        step = self.step
        if step == "ok":
            return True, np.full((120, 240, 3), 100, np.uint8)
        if step == "empty":
            return True, np.zeros((0, 0, 3), np.uint8)
        if step == "int32":
            return True, np.zeros((120, 240, 3), np.int32)
        if step == "weird":
            return True, np.zeros((120, 240, 5), np.uint8)
        return False, None


def test_corrupt_frames_from_a_live_device_are_skipped_and_counted(monkeypatch):
    monkeypatch.setattr(cv2, "VideoCapture", _FlakyCapture)
    with Camera("0", SIZE, fps=200) as cam:
        deadline = time.monotonic() + 5
        while cam.stats.grabbed < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert cam.stats.corrupt >= 6 and cam.stats.read_errors >= 2
    assert cam.stats.reconnects == 0  # isolated failures stay under the cap


class _SlowDecodeCapture(_DeviceCapture):
    """A device whose grab() returns at once and whose retrieve() (the decode) takes 80 ms."""

    grabs: list[int] = []

    def __init__(self, *args, **kwargs):
        pass

    def isOpened(self):
        return True

    def grab(self):
        _SlowDecodeCapture.grabs.append(time.time_ns())
        return True

    def retrieve(self):
        time.sleep(0.08)
        return True, np.full((120, 240, 3), 100, np.uint8)

    def read(self):
        return self.grab() and self.retrieve()


def test_capture_time_is_the_grab_not_the_decode(monkeypatch):
    monkeypatch.setattr(cv2, "VideoCapture", _SlowDecodeCapture)
    _SlowDecodeCapture.grabs = []
    with Camera("0", SIZE, fps=0) as cam:
        f = cam.read_latest(timeout=5)
    grab = max(t for t in _SlowDecodeCapture.grabs if t <= f.capture_ns)
    assert f.capture_ns - grab < 20e6  # within 20 ms of the grab; after the decode it would be 80 ms later


def _source(kind: str, tmp_path: Path) -> str:
    if kind == "video":
        return str(write_video(tmp_path / "v.avi", 3))
    if kind == "folder":
        (tmp_path / "imgs").mkdir()
        cv2.imwrite(str(tmp_path / "imgs" / "0.png"), np.zeros((120, 160, 3), np.uint8))
        return str(tmp_path / "imgs")
    return "synthetic://night?seed=1"


@pytest.mark.parametrize("kind", ["video", "folder", "synthetic"])
def test_capture_time_comes_before_conversion_and_resize(kind, tmp_path, monkeypatch):
    """Whatever the source, the stamp is taken before our own work on the frame (which counts as latency)."""
    fitted: list[int] = []

    def slow_fit(image, size):
        fitted.append(time.time_ns())
        time.sleep(0.03)
        return fit(image, size)

    monkeypatch.setattr(camera_mod, "fit", slow_fit)
    with Camera(_source(kind, tmp_path), SIZE, fps=0) as cam:
        f = cam.read_latest(timeout=5)
    assert f.capture_ns <= fitted[f.id]  # one fit per frame, in order


def test_frames_say_which_box_of_the_source_they_show(tmp_path):
    video = write_video(tmp_path / "v.avi", 3, size=(240, 320))
    with Camera(str(video), SIZE, fps=0) as cam:
        f = cam.read_latest(timeout=5)
    assert f.source_size == (240, 320) and f.crop == (0, 40, 320, 160)  # 4:3 cut to the model's 2:1
    image, crop = refit(f, (64, 64))  # an engine with another input size: the crop of the crop
    assert image.shape == (64, 64, 3) and crop == (80, 40, 160, 160)
    assert refit(Frame(0, 0, f.image), SIZE)[1] is None  # the frame is all of its source


def test_camera_id_is_derived_from_the_source_or_given(tmp_path):
    assert default_camera_id("0") == "cam0"
    assert default_camera_id("rtsp://admin:secret@10.0.0.2:554/stream1") == "10.0.0.2/stream1"  # no credentials
    assert default_camera_id("synthetic://night?seed=3") == "synthetic-night"
    assert default_camera_id(str(tmp_path / "drive 1.mp4")) == "drive_1.mp4"
    assert default_camera_id("v4l2src ! videoconvert ! appsink") == "gstreamer"
    assert len(default_camera_id("/x/" + "a" * 80)) == 32
    assert Camera("synthetic://night", SIZE).id == "synthetic-night"
    assert Camera("synthetic://night", SIZE, camera_id="front-left").id == "front-left"
    for bad in ("", "a" * 33, "caméra", "tab\there"):
        with pytest.raises(UserError, match="camera id"):
            Camera("synthetic://night", SIZE, camera_id=bad)


def _stalling_capture(read_timeout: float):
    """A cv2.VideoCapture stand-in for a network stream at about 20 fps that freezes while `frozen`
    is set: each read then fails only after `read_timeout` s, as FFmpeg's reads of a frozen RTSP do."""

    class StallingCapture(_DeviceCapture):
        frozen, opened, params = threading.Event(), [], []

        def __init__(self, target, api=None, params=()):
            StallingCapture.opened.append(time.monotonic())
            StallingCapture.params = list(params)

        def isOpened(self):
            return True

        def grab(self):
            if self.frozen.is_set():
                time.sleep(read_timeout)
                return False
            time.sleep(0.05)
            return True

        def retrieve(self):
            return True, np.full((120, 240, 3), 100, np.uint8)

    return StallingCapture


def _wait(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_a_frozen_stream_is_reconnected_on_the_clock_not_after_30_timeouts(monkeypatch):
    capture = _stalling_capture(read_timeout=0.3)
    monkeypatch.setattr(cv2, "VideoCapture", capture)
    with Camera("rtsp://10.0.0.2/stream", SIZE, stall_s=0.5, backoff=(0.05, 0.2)) as cam:
        assert capture.params[capture.params.index(cv2.CAP_PROP_READ_TIMEOUT_MSEC) + 1] == 500
        assert _wait(lambda: cam.stats.grabbed >= 5, 5) and cam.connected
        capture.frozen.set()
        t0 = time.monotonic()
        assert _wait(lambda: not cam.connected, 2)
        assert 0.4 < time.monotonic() - t0 < 0.9  # stall_s, not a count of failed reads
        assert _wait(lambda: cam.stats.reconnects >= 1, 2), cam.stats  # 30 reads x 0.3 s would be 9 s
        assert cam.stats.stalls >= 1 and time.monotonic() - t0 < 1.5
        assert not cam.connected  # reopened, but no frame yet: still not delivering
        grabbed = cam.stats.grabbed
        capture.frozen.clear()
        assert _wait(lambda: cam.connected and cam.stats.grabbed > grabbed, 3)


def test_a_read_hanging_in_the_driver_shows_as_a_stall_at_once(monkeypatch):
    capture = _stalling_capture(read_timeout=3.0)  # a driver that ignores the read timeout
    monkeypatch.setattr(cv2, "VideoCapture", capture)
    cam = Camera("rtsp://10.0.0.2/stream", SIZE, stall_s=0.3).connect()
    try:
        assert _wait(lambda: cam.stats.grabbed >= 2, 5)
        capture.frozen.set()
        assert _wait(lambda: not cam.connected, 1.0) and cam.stats.read_errors == 0  # the read is still stuck
    finally:
        t0 = time.monotonic()
        cam.disconnect(timeout=0.2)
        assert time.monotonic() - t0 < 0.5  # the stuck read is abandoned, not waited for


def test_a_live_source_connected_early_numbers_its_frames_from_start(monkeypatch):
    """connect(start=False): the stream is read all along (its queue never fills) but nothing is
    handed out or numbered until start(); the first frame served is a fresh one with id 0."""
    monkeypatch.setattr(cv2, "VideoCapture", _stalling_capture(read_timeout=0.3))
    cam = Camera("rtsp://10.0.0.2/stream", SIZE).connect(start=False)
    try:
        assert _wait(lambda: cam.stats.warmup >= 3, 5)
        assert cam.read_latest(timeout=0.2) is None and cam.stats.grabbed == 0
        t_start = time.time_ns()
        cam.start()
        first = cam.read_latest(timeout=2)
        assert first.id == 0 and first.capture_ns >= t_start
        assert cam.stats.dropped == 0
    finally:
        cam.disconnect()


def test_a_file_connected_early_loses_no_frame(tmp_path):
    video = write_video(tmp_path / "v.avi", 8)
    cam = Camera(str(video), SIZE, fps=0).connect(start=False)
    time.sleep(0.3)  # an engine loading: nothing may be read ahead and replaced meanwhile
    assert cam.stats.grabbed == 1  # the probe frame, kept as frame 0
    t_start = time.time_ns()
    cam.start()
    frames = drain(cam, pause=0.0)
    cam.disconnect()
    assert [f.id for f in frames][:1] == [0] and cam.stats.grabbed == 8
    assert frames[0].read_ns >= t_start and frames[0].capture_ns >= t_start  # the wait is not its latency
    assert len(frames) + cam.stats.dropped == 8


def test_opencv_is_quiet_while_a_source_is_opened_and_its_log_level_restored():
    before = cv2.utils.logging.getLogLevel()
    levels = []
    real = cv2.VideoCapture

    def spy(*args):
        levels.append(cv2.utils.logging.getLogLevel())
        return real(*args)

    cv2.VideoCapture = spy
    try:
        with pytest.raises(UserError, match="no camera at index 57"):
            Camera("57", SIZE).connect()
    finally:
        cv2.VideoCapture = real
    assert levels == [cv2.utils.logging.LOG_LEVEL_SILENT] and cv2.utils.logging.getLogLevel() == before
