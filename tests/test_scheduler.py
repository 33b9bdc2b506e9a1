"""Background adaptation rounds in real spawned processes, with stand-in round functions.

The stand-ins live at module level so the spawned child can import them; this module imports
nothing heavy at the top so that a child running a light stand-in starts in well under a second.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mas3_edge.runtime.scheduler import ScheduleConfig, Scheduler

FAST = dict(every_frames=5, min_frames=2, limit=10, export=False, nice=0)


# ---------------------------------------------------------------- stand-in round functions

def _new_version(bundle: str, version: str, fill: float | None = None) -> str:
    import torch

    from mas3_edge import bundle as b
    torch.set_num_threads(1)
    base = b.load_version(bundle, version)
    with torch.no_grad():
        if fill is None:
            base.net.head.bias.add_(0.01)
        else:
            base.net.head.weight.fill_(fill)
    return b.save_version(bundle, base.net, parent=base, serve=False, info={"kind": "adapted", "method": "stand-in"}).name


def perturbed_round(bundle, frames, version, **_):
    return {"outcome": "accepted", "reason": "stand-in", "version": _new_version(bundle, version)}


def nan_round(bundle, frames, version, **_):
    return {"outcome": "accepted", "reason": "claims success", "version": _new_version(bundle, version, float("nan"))}


def crash_round(**_):
    os._exit(3)  # as a segfault or the OOM killer would: no result, no exception


def raising_round(**_):
    raise RuntimeError("CUDA error: an illegal memory access")


def slow_round(bundle, frames, version, **_):
    _new_version(bundle, version)
    time.sleep(60)  # "exporting" when the service is stopped


def existing_v2_round(**_):
    time.sleep(1.0)
    return {"outcome": "accepted", "reason": "stand-in", "version": "v0002"}


# ---------------------------------------------------------------- helpers

def wait_result(s: Scheduler, timeout: float = 60.0) -> dict:
    s.tick(100, 100)  # starts the round
    assert s.busy
    return _finish(s, timeout)


def frames_dir(tmp_path: Path) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    return d


# ---------------------------------------------------------------- tests

def round_caught_exporting(root: Path, tmp_path: Path) -> Scheduler:
    """A scheduler whose slow round has written v0002 and is now "exporting" (still running)."""
    from mas3_edge import bundle
    s = Scheduler(root, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=slow_round)
    s.tick(100, 100)
    deadline = time.monotonic() + 60
    while "v0002" not in bundle.version_ids(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return s


def test_triggers(tmp_path, monkeypatch):
    launched = []
    s = Scheduler(tmp_path, tmp_path, ScheduleConfig(every_frames=10, every_minutes=1.0, min_frames=5,
                                                      drift_threshold=0.5, drift_every_minutes=2.0))

    def fake_launch(total, now, drift):  # the real bookkeeping, without starting a process
        launched.append((total, drift))
        s._last_drift_t = now
        if not drift:
            s._last_round_t, s._buffered_at_last = now, total

    monkeypatch.setattr(s, "_launch", fake_launch)
    t0 = time.monotonic()
    s.tick(20, 3, t0)  # too few frames in the buffer for any round
    s.tick(9, 9, t0)  # 9 new frames: not yet
    s.tick(10, 10, t0)  # 10 new: a round
    s.tick(12, 12, t0 + 61)  # a minute later with new frames: a round
    s.tick(12, 12, t0 + 200)  # no new frames but drift is due: a drift check
    assert launched == [(10, False), (12, False), (12, True)]
    s._failures = 2  # two rounds in a row failed: wait 4x longer for the next
    s.tick(12 + 39, 60, t0 + 200)
    assert len(launched) == 3
    s.tick(12 + 40, 60, t0 + 200)
    assert launched[-1] == (52, False)
    s.close()


def test_bad_schedule_fails_in_the_parent():
    from mas3_edge.errors import UserError
    with pytest.raises(UserError):
        ScheduleConfig(adapt={"steps": -1})
    with pytest.raises(UserError):
        ScheduleConfig(min_frames=0)


def test_accepted_round_moves_the_pointer(tiny_bundle, tmp_path):
    from mas3_edge import bundle
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=perturbed_round)
    out = wait_result(s)
    s.close()
    assert out["outcome"] == "accepted" and out["version"] == "v0002" and out["parent"] == "v0001"
    assert bundle.serving_id(tiny_bundle) == "v0002" and "accepted v0002" in s.describe()


@pytest.mark.parametrize("fn, reason", [(crash_round, "exit code 3"), (raising_round, "illegal memory access")])
def test_a_crashing_round_is_rejected_and_nothing_is_served(tiny_bundle, tmp_path, fn, reason):
    from mas3_edge import bundle
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=fn)
    out = wait_result(s)
    s.close()
    assert out["outcome"] == "crashed" and reason in out["reason"]
    assert bundle.serving_id(tiny_bundle) == "v0001" and s.counts["crashed"] == 1


def test_nan_weights_are_never_served(tiny_bundle, tmp_path):
    from mas3_edge import bundle
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=nan_round)
    out = wait_result(s)
    s.close()
    assert out["outcome"] == "rejected" and "not finite" in out["reason"]
    assert bundle.serving_id(tiny_bundle) == "v0001"


def test_a_rollback_during_the_round_wins(tiny_bundle, tmp_path, small_net):
    from mas3_edge import bundle
    bundle.save_version(tiny_bundle, small_net, parent=bundle.load_version(tiny_bundle), serve=False)  # v0002
    v3 = bundle.save_version(tiny_bundle, small_net, serve=True).name  # serving v0003 when the round starts
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=existing_v2_round)
    s.tick(100, 100)
    bundle.set_serving(tiny_bundle, "v0001")  # `mas3-edge rollback v0001` while the round runs
    out = wait_result(s) if not s.busy else _finish(s)
    s.close()
    assert v3 == "v0003" and out["outcome"] == "superseded"
    assert bundle.serving_id(tiny_bundle) == "v0001"


def _finish(s: Scheduler, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = s.tick(100, 100)
        if done is not None:
            return done
        time.sleep(0.05)
    raise AssertionError("the round never finished")


def test_killed_mid_round_the_restart_serves_the_last_good_version(tiny_bundle, tmp_path):
    from mas3_edge import bundle
    from mas3_edge.runtime.swap import EngineSwapper
    s = round_caught_exporting(tiny_bundle, tmp_path)
    t0 = time.monotonic()
    s.close()  # SIGTERM to the service: the round process is stopped
    assert time.monotonic() - t0 < 1.0 and not s.busy
    assert bundle.serving_id(tiny_bundle) == "v0001"
    swapper = EngineSwapper(tiny_bundle, kind="torch")  # the restart
    assert swapper.start().version == "v0001"
    swapper.close()


def test_the_service_swaps_in_an_accepted_round_without_dropping_a_frame(tiny_bundle, tmp_path):
    from test_camera import write_video
    from test_service import Running, config

    from mas3_edge import bundle
    from mas3_edge.runtime.frame_buffer import BufferPolicy
    video = write_video(tmp_path / "v.avi", 30, size=(64, 128))
    # as in production, the round process runs niced, so the serving process keeps its core
    cfg = config(tmp_path, tiny_bundle, str(video), adapt=True, schedule=ScheduleConfig(**{**FAST, "nice": 10}), fps=10,
                 buffer_policy=BufferPolicy(every_n=1, min_interval_s=0, dedup=0, min_free_mb=0))
    with Running(cfg, round_fn=perturbed_round) as run:
        msgs = run.collect(60, until=lambda m: sum(x.version == "v0002" for x in m) >= 5)
    assert bundle.serving_id(tiny_bundle) in ("v0002", "v0003")  # the next round may have started
    swap = [(a, b) for a, b in zip(msgs, msgs[1:]) if a.version == "v0001" and b.version == "v0002"]
    assert swap and swap[0][1].frame_id == swap[0][0].frame_id + 1
    assert any("round 1 accepted -> v0002" in line for line in run.lines)
    assert any("swapped v0001 -> v0002" in line for line in run.lines)


def test_round_scratch_lives_in_the_bundle_and_goes_with_close(tiny_bundle, tmp_path):
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=perturbed_round)
    assert s._tmp.parent == tiny_bundle / "scratch" and str(os.getpid()) in s._tmp.name
    wait_result(s)
    s.close()
    assert not s._tmp.exists()


def test_snapshot_is_one_consistent_read_under_the_lock(tiny_bundle, tmp_path):
    import threading
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=perturbed_round)
    assert s.snapshot() == {"rounds": {}, "last_round": "none yet", "busy": False, "last": None}
    wait_result(s)
    snap = s.snapshot()
    assert snap["rounds"] == {"accepted": 1} and "accepted v0002" in snap["last_round"] and not snap["busy"]
    snap["rounds"]["accepted"] = 99  # a copy: the reader cannot change the counts
    assert s.counts["accepted"] == 1
    got = []
    with s._lock:  # the serving loop in the middle of recording a round: the metrics thread waits for it
        reader = threading.Thread(target=lambda: got.append(s.snapshot()))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive() and not got
    reader.join(2.0)
    s.close()
    assert got and got[0]["rounds"] == {"accepted": 1}


def write_then_crash(bundle, frames, version, **_):
    _new_version(bundle, version)
    os._exit(3)  # killed after writing its version, before saying so


def test_a_version_of_a_crashed_round_is_rejected_with_the_reason(tiny_bundle, tmp_path):
    from mas3_edge import bundle
    from mas3_edge.store import read_mark
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=write_then_crash)
    out = wait_result(s)
    s.close()
    mark = read_mark(tiny_bundle / "versions" / "v0002")
    assert out["outcome"] == "crashed" and "version" not in out
    assert mark["state"] == "rejected" and "exit code 3" in mark["reason"]
    assert bundle.serving_id(tiny_bundle) == "v0001"


def test_retention_runs_at_start_and_after_each_round(tiny_bundle, tmp_path):
    from mas3_edge import bundle
    v1 = bundle.load_version(tiny_bundle)
    for _ in range(4):
        bundle.save_version(tiny_bundle, v1.net, parent=v1, serve=False)  # v0002 .. v0005, never served
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST, keep_versions=3), round_fn=perturbed_round)
    assert bundle.version_ids(tiny_bundle) == ["v0001", "v0004", "v0005"]
    out = wait_result(s)
    s.close()
    assert out["version"] == "v0006" and bundle.serving_id(tiny_bundle) == "v0006"
    assert bundle.version_ids(tiny_bundle) == ["v0001", "v0005", "v0006"]  # v0001: source, served before
