"""Children of `run` (a round, an export) die with it, and start clear of the working directory.

Real processes: a parent python process starts a child by the real code path, the test kills the
parent with SIGKILL and watches the child. Linux only (/proc tells who is whose child). Nothing
heavy is imported at the top: the round process imports this module to find its round function.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
TESTS = str(Path(__file__).parent)


def late_round(bundle, frames, version, **_):
    """Writes a version 1.5 s in, as a round that was mid-way when its parent died would."""
    from test_scheduler import perturbed_round
    time.sleep(1.5)
    return perturbed_round(bundle, frames, version)


def onnx_round(**_):
    import onnx  # imported first here, in the round process: never by the parent
    return {"outcome": "skipped", "reason": onnx.__file__}


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def parent(code: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {TESTS!r})\n{code}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def test_a_round_dies_with_its_parent_and_writes_nothing(tiny_bundle, tmp_path):
    from mas3_edge import bundle
    (tmp_path / "frames").mkdir()
    p = parent(f"""
from multiprocessing import resource_tracker
from mas3_edge.runtime.scheduler import ScheduleConfig, Scheduler
from test_scheduler import FAST
from test_children import late_round
s = Scheduler({str(tiny_bundle)!r}, {str(tmp_path / "frames")!r}, ScheduleConfig(**FAST), round_fn=late_round)
s.tick(100, 100)
print(s._proc.pid, resource_tracker._resource_tracker._pid, flush=True)
import time; time.sleep(60)
""")
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2, p.stderr.read()
        time.sleep(0.5)  # the round is under way
        os.kill(p.pid, signal.SIGKILL)  # kill -9 of `run` mid-round
        p.wait(5)
        assert gone_within(pids, 2.0), "the round (or the resource tracker) outlived its parent"
        time.sleep(3.0)  # when the orphan would have written its version
        assert bundle.version_ids(tiny_bundle) == ["v0001"] and bundle.serving_id(tiny_bundle) == "v0001"
    finally:
        p.kill()
        p.communicate()


def test_an_export_dies_with_its_parent(tiny_bundle):
    from mas3_edge import bundle
    vdir = tiny_bundle / "versions" / "v0001"
    p = parent(f"""
from pathlib import Path
from mas3_edge.runtime.swap import export_in_child
print("exporting", flush=True)
export_in_child(Path({str(vdir)!r}))
""")
    try:
        assert p.stdout.readline().strip() == "exporting", p.stderr.read()
        deadline = time.monotonic() + 10
        while not children_of(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = children_of(p.pid)
        assert kids
        time.sleep(1.0)  # the child is importing torch / exporting
        os.kill(p.pid, signal.SIGKILL)  # SIGKILL (or SIGTERM) of `run` during a swap's export
        p.wait(5)
        assert gone_within(kids, 2.0), "the export outlived its parent"
        assert not (vdir / bundle.ONNX_FILE).exists()
    finally:
        p.kill()
        p.communicate()


def shadowing(folder: Path, *names: str) -> Path:
    folder.mkdir()
    for name in names:
        (folder / name).write_text("raise ImportError('shadowed by a file in the working directory')\n")
    return folder


def test_an_export_child_ignores_modules_in_the_working_directory(tiny_bundle, tmp_path, monkeypatch):
    from mas3_edge import bundle
    from mas3_edge.errors import UserError
    from mas3_edge.runtime.swap import export_in_child
    vdir = tiny_bundle / "versions" / "v0001"
    weights = vdir / bundle.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:500])  # the export fails fast, but only once it has run
    monkeypatch.chdir(shadowing(tmp_path / "cwd", "mas3_edge.py", "export.py"))
    with pytest.raises(UserError) as e:
        export_in_child(vdir)
    assert "corrupt" in str(e.value) and "shadowed" not in str(e.value)


def test_a_round_child_ignores_modules_in_the_working_directory(tiny_bundle, tmp_path):
    (tmp_path / "frames").mkdir()
    cwd = shadowing(tmp_path / "cwd", "onnx.py", "export.py")
    p = parent(f"""
import time
from mas3_edge.runtime.scheduler import ScheduleConfig, Scheduler
from test_scheduler import FAST
from test_children import onnx_round
s = Scheduler({str(tiny_bundle)!r}, {str(tmp_path / "frames")!r}, ScheduleConfig(**FAST), round_fn=onnx_round)
s.tick(100, 100)
while s.busy and s.tick(100, 100) is None:
    time.sleep(0.05)
print(s.last or "skipped", flush=True)
s.close()
""", cwd=cwd)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "crashed" not in out and "shadowed" not in out, out + err


def test_a_round_killed_after_writing_leaves_nothing_after_the_next_start(tiny_bundle, tmp_path):
    from test_scheduler import FAST

    from mas3_edge import bundle
    from mas3_edge.runtime.scheduler import ScheduleConfig, Scheduler
    from mas3_edge.store import read_mark
    (tmp_path / "frames").mkdir()
    p = parent(f"""
import time
from mas3_edge.runtime.scheduler import ScheduleConfig, Scheduler
from test_scheduler import FAST, slow_round
s = Scheduler({str(tiny_bundle)!r}, {str(tmp_path / "frames")!r}, ScheduleConfig(**FAST), round_fn=slow_round)
s.tick(100, 100)
print(s._tmp, flush=True)
time.sleep(60)
""")
    try:
        scratch = Path(p.stdout.readline().strip())
        assert scratch.parent == tiny_bundle / "scratch", p.stderr.read()
        deadline = time.monotonic() + 60
        while "v0002" not in bundle.version_ids(tiny_bundle) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)  # kill -9 of `run` while its round "exports" v0002
        p.wait(5)
    finally:
        p.kill()
        p.communicate()
    assert read_mark(tiny_bundle / "versions" / "v0002")["state"] == "writing" and scratch.is_dir()
    assert bundle.serving_id(tiny_bundle) == "v0001"
    s = Scheduler(tiny_bundle, tmp_path / "frames", ScheduleConfig(**FAST))  # the next `run` starts
    s.close()
    assert bundle.version_ids(tiny_bundle) == ["v0001"] and not scratch.exists()
    assert sorted(p.name for p in (tiny_bundle / "scratch").iterdir()) == []


def test_an_export_makes_no_temp_folder_for_a_kill_to_strand(tiny_bundle, tmp_path, monkeypatch):
    import threading

    from mas3_edge.runtime.swap import export_in_child
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the export child's temp dir
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(p.name for p in tmp.iterdir() if p.is_dir())  # ONNX Runtime keeps one file, .ses, there
            time.sleep(0.005)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        export_in_child(tiny_bundle / "versions" / "v0001")
    finally:
        done.set()
        watcher.join()
    assert (tiny_bundle / "versions" / "v0001" / "model.onnx").is_file() and not seen, seen
