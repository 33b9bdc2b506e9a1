"""SIGTERM/SIGINT end a real `mas3-edge run` within the 2 s a supervisor allows, with exit code 0."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mas3_edge.runtime.subscriber import Subscriber


def start_run(tmp_path: Path, bundle: Path, *extra: str, engine: str = "torch") -> subprocess.Popen:
    script = Path(sys.executable).with_name("mas3-edge")  # the console script users start
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mas3_edge"]
    return subprocess.Popen([*cmd, "run", "--camera", "synthetic://night", "--bundle", str(bundle), "--engine", engine,
                             "--publish", f"ipc://{tmp_path}/seg.sock", "--buffer", str(tmp_path / "frames"),
                             "--metrics-port", "0", "--status-every", "0.5", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_serving(p: subprocess.Popen, address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with Subscriber(address, latest_only=True) as sub:
        while sub.recv(timeout=0.5) is None:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_run_well_within_two_seconds(tmp_path, tiny_bundle, sig):
    p = start_run(tmp_path, tiny_bundle, "--no-adapt")
    try:
        wait_serving(p, f"ipc://{tmp_path}/seg.sock")
        time.sleep(0.5)
        t0 = time.monotonic()
        p.send_signal(sig)
        _, err = p.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert elapsed < 2.0, f"shutdown took {elapsed:.2f} s"
    assert "stopped after" in err and "Traceback" not in err  # the summary line was flushed before the exit


def test_a_signal_during_the_startup_export_ends_run_at_once(tmp_path, tiny_bundle):
    from mas3_edge import bundle
    p = start_run(tmp_path, tiny_bundle, "--no-adapt", engine="onnxruntime")  # no model.onnx: it is exported first
    try:
        deadline = time.monotonic() + 60
        while "exporting it in a child process" not in p.stderr.readline():
            assert p.poll() is None and time.monotonic() < deadline
        time.sleep(1.0)  # the export child is importing torch
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        p.kill()
    assert p.returncode == 0 and elapsed < 2.0, (elapsed, err)
    time.sleep(1.0)
    assert not (tiny_bundle / "versions" / "v0001" / bundle.ONNX_FILE).exists()  # the export died with `run`
