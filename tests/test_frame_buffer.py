"""The on-disk frame ring buffer: caps, sampling, atomic writes, restarts, a full disk."""
from __future__ import annotations

import errno
import logging
import time

import cv2
import numpy as np
import pytest

from mas3_edge.errors import UserError
from mas3_edge.frames import load_frames
from mas3_edge.runtime import frame_buffer
from mas3_edge.runtime.frame_buffer import BufferPolicy, scan, summarize

KEEP_ALL = dict(every_n=1, min_interval_s=0.0, dedup=0.0, min_free_mb=0.0)


def FrameBuffer(root, policy=BufferPolicy()):
    """A queue long enough that a burst of offers in a test is never dropped for backlog."""
    return frame_buffer.FrameBuffer(root, policy, queue_size=64)


def frame(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (32, 64, 3), np.uint8)


def fill(buf, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        buf.offer(frame(i), t=float(i))
    buf.close()


def test_frame_cap_evicts_oldest_first(tmp_path):
    buf = FrameBuffer(tmp_path, BufferPolicy(max_frames=5, **KEEP_ALL))
    fill(buf, 12)
    items = scan(tmp_path)
    assert [s for s, *_ in items] == list(range(7, 12))
    assert buf.evicted == 7 and len(buf) == 5
    newest = load_frames(tmp_path, (32, 64), limit=1)  # what an adaptation round reads
    assert np.array_equal(newest[0], frame(11))


def test_byte_cap(tmp_path):
    one = FrameBuffer(tmp_path / "probe", BufferPolicy(**KEEP_ALL))
    fill(one, 1)
    size = one.bytes
    buf = FrameBuffer(tmp_path / "b", BufferPolicy(max_mb=3.5 * size / 2**20, **KEEP_ALL))
    fill(buf, 10)
    assert buf.bytes <= 3.5 * size and len(scan(tmp_path / "b")) == 3


def test_sampling_policy(tmp_path):
    buf = FrameBuffer(tmp_path / "n", BufferPolicy(every_n=3, min_interval_s=0, dedup=0, min_free_mb=0))
    fill(buf, 9)
    assert buf.kept == 3
    buf = FrameBuffer(tmp_path / "t", BufferPolicy(every_n=1, min_interval_s=2.5, dedup=0, min_free_mb=0))
    fill(buf, 10)  # t = 0..9 s
    assert buf.kept == 4  # t = 0, 3, 6, 9
    buf = FrameBuffer(tmp_path / "d", BufferPolicy(every_n=1, min_interval_s=0, dedup=2.0, min_free_mb=0))
    same = frame(0)
    for i in range(5):
        buf.offer(same.copy(), t=float(i))
    buf.offer(frame(1), t=9.0)
    buf.close()
    assert buf.kept == 2


def test_survives_a_restart_and_cleans_half_written_files(tmp_path):
    fill(FrameBuffer(tmp_path, BufferPolicy(**KEEP_ALL)), 3)
    (tmp_path / "00000003.png.tmp").write_bytes(b"half a png")  # a crash mid-write
    buf = FrameBuffer(tmp_path, BufferPolicy(**KEEP_ALL))
    assert buf.ready.wait(5)
    assert len(buf) == 3 and not list(tmp_path.glob("*.tmp"))
    fill(buf, 2, start=3)
    assert [s for s, *_ in scan(tmp_path)] == [0, 1, 2, 3, 4]
    s = summarize(tmp_path)
    assert (s.frames, s.first, s.last) == (5, "00000000.png", "00000004.png") and s.bytes == buf.bytes


def test_full_disk_stops_buffering_and_never_raises(tmp_path, monkeypatch, caplog):
    def enospc(path, data):
        path.write_bytes(data[:10])  # the partial temp file a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    buf = FrameBuffer(tmp_path, BufferPolicy(**KEEP_ALL))
    monkeypatch.setattr(frame_buffer, "write_file", enospc)
    with caplog.at_level(logging.WARNING):
        fill(buf, 5)
    assert not buf.enabled and "full" in buf.warning and buf.failed == 1
    assert not list(tmp_path.iterdir())  # no partial file left behind
    assert sum("buffering stops" in r.message for r in caplog.records) == 1
    assert buf.offer(frame(99)) is False


def test_low_free_space_stops_before_the_disk_fills(tmp_path):
    buf = FrameBuffer(tmp_path, BufferPolicy(every_n=1, min_interval_s=0, dedup=0, min_free_mb=1e12))
    fill(buf, 3)
    assert not buf.enabled and "free" in buf.warning and not scan(tmp_path)


def test_a_slow_disk_drops_frames_instead_of_blocking(tmp_path, monkeypatch):
    import time
    slow = frame_buffer.write_file

    def slow_write(path, data):
        time.sleep(0.05)
        slow(path, data)

    monkeypatch.setattr(frame_buffer, "write_file", slow_write)
    buf = frame_buffer.FrameBuffer(tmp_path, BufferPolicy(**KEEP_ALL), queue_size=2)
    t0 = time.perf_counter()
    for i in range(20):
        buf.offer(frame(i), t=float(i))
    assert time.perf_counter() - t0 < 0.5 and buf.backlog_drops > 0
    buf.close()


def test_bad_policy_and_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError):
        BufferPolicy(max_frames=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create"):
        FrameBuffer(tmp_path / "file" / "sub")


def test_a_deleted_folder_is_recreated_and_buffering_resumes(tmp_path, caplog):
    import shutil
    import time
    root = tmp_path / "frames"
    buf = FrameBuffer(root, BufferPolicy(**KEEP_ALL))
    for i in range(3):
        buf.offer(frame(i), t=float(i))
    deadline = time.monotonic() + 5
    while buf.written < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    shutil.rmtree(root)  # a clean-up script, while `run` serves
    with caplog.at_level(logging.WARNING):
        buf.offer(frame(3), t=3.0)
        while buf.enabled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not buf.enabled  # the failed write stopped buffering ...
        t = 4.0
        while buf.written < 5 and time.monotonic() < deadline + 5:  # ... and it retries within about a second
            buf.offer(frame(int(t)), t=t)
            t += 1
            time.sleep(0.05)
    buf.close()
    assert buf.enabled and buf.written >= 5 and root.is_dir()
    assert len(buf) == len(scan(root)) and buf.bytes == sum(size for *_, size in scan(root))
    assert sum("buffering stops" in r.message for r in caplog.records) == 1


def test_scan_and_summary_count_only_real_frames(tmp_path, caplog):
    fill(FrameBuffer(tmp_path, BufferPolicy(**KEEP_ALL)), 2)
    whole = (tmp_path / "00000001.png").read_bytes()
    (tmp_path / "00000007.png").write_bytes(b"")  # zero bytes
    (tmp_path / "00000008.png").write_text("not an image")
    (tmp_path / "00000011.png").write_bytes(whole[:100])  # a real PNG cut short after 100 bytes
    (tmp_path / "00000009.txt").write_text("notes")
    (tmp_path / "00000010.png").mkdir()
    assert [s for s, *_ in scan(tmp_path)] == [0, 1]
    s = summarize(tmp_path)
    assert (s.frames, s.first, s.last) == (2, "00000000.png", "00000001.png")
    assert (tmp_path / "00000011.png").exists()  # `mas3-edge buffer` only looks
    with caplog.at_level(logging.WARNING):
        buf = FrameBuffer(tmp_path, BufferPolicy(**KEEP_ALL))
        fill(buf, 1, start=5)
    assert sum("not whole PNG" in r.message for r in caplog.records) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000000.png", "00000001.png", "00000002.png",
                                                          "00000009.txt", "00000010.png"]
    assert len(buf) == 3  # the new frame is numbered after the last whole one


def _frames_at(root, numbers) -> None:
    root.mkdir(exist_ok=True)
    for n in numbers:
        ok, png = cv2.imencode(".png", frame(n))
        (root / f"{n:08d}.png").write_bytes(png.tobytes())


def test_numbering_goes_on_past_99999999_and_name_order_stays_time_order(tmp_path):
    root = tmp_path / "frames"
    _frames_at(root, [99999996, 99999997])
    buf = FrameBuffer(root, BufferPolicy(**KEEP_ALL))
    fill(buf, 4, start=100)  # 99999998, 99999999, then the names need a ninth digit
    names = sorted(p.name for p in root.iterdir())
    assert names == [f"{n:09d}.png" for n in range(99999996, 100000002)]
    assert [s for s, *_ in scan(root)] == list(range(99999996, 100000002))
    assert np.array_equal(load_frames(root, (32, 64), limit=1)[0], frame(103))  # the newest by name is the newest
    again = FrameBuffer(root, BufferPolicy(**KEEP_ALL))  # a restart numbers on after the highest
    fill(again, 1, start=200)
    assert sorted(p.name for p in root.iterdir())[-1] == "100000002.png"
    assert np.array_equal(load_frames(root, (32, 64), limit=1)[0], frame(200))


def test_a_restart_at_99999999_widens_the_names_it_finds(tmp_path):
    root = tmp_path / "frames"
    _frames_at(root, [5, 99999999])  # and a name of other width: still number order after the restart
    (root / "00000005.png").rename(root / "5.png")
    buf = FrameBuffer(root, BufferPolicy(**KEEP_ALL))
    fill(buf, 1, start=300)
    assert sorted(p.name for p in root.iterdir()) == ["000000005.png", "099999999.png", "100000000.png"]
    assert len(buf) == 3 and np.array_equal(load_frames(root, (32, 64), limit=1)[0], frame(300))


def test_frames_dropped_while_stopped_are_counted(tmp_path):
    buf = FrameBuffer(tmp_path, BufferPolicy(every_n=2, min_interval_s=0, dedup=0, min_free_mb=1e12))
    buf.offer(frame(0), t=0.0)  # its write finds the disk "full": buffering stops
    deadline = time.monotonic() + 5
    while buf.enabled and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, 11):
        assert buf.offer(frame(i), t=float(i)) is False
    buf.close()
    assert buf.paused_drops == 5 and buf.dropped == 5  # every second frame: the ones the policy would keep


def test_the_folder_is_read_on_the_writer_thread_not_the_callers(tmp_path, monkeypatch):
    import threading
    _frames_at(tmp_path, range(3))
    real, threads = frame_buffer.scan, []

    def slow_scan(*args, **kw):
        threads.append(threading.current_thread().name)
        time.sleep(1.0)
        return real(*args, **kw)

    monkeypatch.setattr(frame_buffer, "scan", slow_scan)
    t0 = time.perf_counter()
    buf = FrameBuffer(tmp_path, BufferPolicy(**KEEP_ALL))
    buf.offer(frame(9), t=0.0)
    assert time.perf_counter() - t0 < 0.5 and not buf.ready.is_set()  # neither start nor offer waited on it
    while buf.written < 1 and time.perf_counter() - t0 < 5:  # queued meanwhile, written once it is read
        time.sleep(0.01)
    buf._stop("test")  # as after a failed write; the retry comes with the next offers
    buf._retry_at = 0.0
    t0 = time.perf_counter()
    while not buf.enabled and time.perf_counter() - t0 < 5:
        buf.offer(frame(10), t=time.perf_counter() + 10)
        time.sleep(0.01)
    buf.close()
    assert buf.enabled and len(threads) == 2 and set(threads) == {"frame-buffer"}
    assert [s for s, *_ in scan(tmp_path)] == [0, 1, 2, 3]


def test_the_folder_is_synced_after_each_rename(tmp_path, monkeypatch):
    seen = []

    def fsync_dir(folder):
        seen.append((folder, sorted(p.name for p in folder.iterdir())))

    monkeypatch.setattr(frame_buffer, "fsync_dir", fsync_dir)
    fill(FrameBuffer(tmp_path, BufferPolicy(**KEEP_ALL)), 2)
    assert seen == [(tmp_path, ["00000000.png"]), (tmp_path, ["00000000.png", "00000001.png"])]
    frame_buffer.fsync_dir(tmp_path)  # and the real one works on a folder
