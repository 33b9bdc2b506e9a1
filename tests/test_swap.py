"""The hot swap's watcher against a hostile bundle: garbage in SERVING, a pointer that moves back
before the loop looks, corrupt weights next to an intact model.onnx. Engines are stand-ins (the
real ones are covered in test_service), so each case is fast and its timing deterministic."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from mas3_edge import bundle
from mas3_edge.runtime import swap
from mas3_edge.runtime.swap import EngineSwapper


class FakeEngine:
    name, provider = "fake", "cpu"

    def __init__(self, vdir, *args, **kw):
        self.version, self.input_size, self.closed = vdir.name, (8, 8), False

    def infer(self, images):
        return np.zeros(images.shape[:3], np.uint8), np.ones(images.shape[:3], np.float32)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_engines(monkeypatch):
    """kind="onnxruntime" with a verified model.onnx: the path where weights were never hashed."""
    monkeypatch.setattr("mas3_edge.runtime.engines.load_engine", FakeEngine)
    monkeypatch.setattr(swap, "_verified_onnx", lambda vdir: True)


def versions(root, n: int) -> list[str]:
    """n - 1 more versions (not served), children of v0001."""
    v1 = bundle.load_version(root, "v0001")
    return ["v0001"] + [bundle.save_version(root, v1.net, parent=v1, serve=False).name for _ in range(n - 1)]


def wait(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def serve_until(swapper, engine, vid: str, timeout: float = 5.0):
    """What the service loop does between frames, until it serves `vid`."""
    deadline = time.monotonic() + timeout
    while engine.version != vid and time.monotonic() < deadline:
        new = swapper.poll()
        engine = swapper.swap(engine, new) if new is not None else engine
        time.sleep(0.01)
    return engine


def test_garbage_in_serving_warns_once_and_the_watcher_lives_on(tiny_bundle, fake_engines, caplog):
    _, v2 = versions(tiny_bundle, 2)
    swapper = EngineSwapper(tiny_bundle, kind="onnxruntime", poll_s=0.02)
    engine = swapper.start()
    with caplog.at_level(logging.WARNING):
        (tiny_bundle / "SERVING").write_bytes(b"\x00\xffgarbage\n")
        time.sleep(0.3)  # about 15 polls of the garbage
        (tiny_bundle / "SERVING").write_bytes(b"")
        time.sleep(0.1)
        assert swapper._thread.is_alive()
        bundle.set_serving(tiny_bundle, v2)  # a later accepted round
        engine = serve_until(swapper, engine, v2)
    swapper.close()
    assert engine.version == v2 and swapper.version == v2
    warnings = [r.message for r in caplog.records if "SERVING" in r.message]
    assert len(warnings) == 2 and "holds no version id" in warnings[0]  # one per problem, not one per poll


def test_startup_with_a_bad_pointer_serves_the_last_version_served(tiny_bundle, fake_engines, caplog):
    _, v2, v3 = versions(tiny_bundle, 3)
    bundle.set_serving(tiny_bundle, v2)  # v3 is newer but was never served
    for garbage in (b"\x00\xffgarbage\n", None):
        if garbage is None:
            (tiny_bundle / "SERVING").unlink()
        else:
            (tiny_bundle / "SERVING").write_bytes(garbage)
        swapper = EngineSwapper(tiny_bundle, kind="onnxruntime")
        assert swapper.candidates()[:2] == [v2, "v0001"]
        assert swapper.start().version == v2
        swapper.close()
    assert bundle.resolve(tiny_bundle).name == v2  # what `export`, `eval`, `adapt` pick as well


def test_a_pointer_that_moves_back_before_the_loop_looks_wins(tiny_bundle, fake_engines):
    _, v2 = versions(tiny_bundle, 2)
    swapper = EngineSwapper(tiny_bundle, kind="onnxruntime", poll_s=0.02)
    engine = swapper.start()
    bundle.set_serving(tiny_bundle, v2)
    assert wait(lambda: swapper._ready is not None)  # v2 is prepared; the loop has not polled yet
    bundle.set_serving(tiny_bundle, "v0001")  # rollback
    assert swapper.poll() is None  # the loop polls at once: v2 is not handed over
    bundle.set_serving(tiny_bundle, v2)
    assert wait(lambda: swapper._ready is not None)
    bundle.set_serving(tiny_bundle, "v0001")
    time.sleep(0.2)  # the watcher has seen the rollback (v0001 is what the loop serves)
    for _ in range(20):
        new = swapper.poll()
        engine = swapper.swap(engine, new) if new is not None else engine
        time.sleep(0.01)
    swapper.close()
    assert engine.version == "v0001" and swapper.version == "v0001"


def test_the_served_engine_converges_to_the_pointer_under_flapping(tiny_bundle, fake_engines):
    ids = versions(tiny_bundle, 3)
    swapper = EngineSwapper(tiny_bundle, kind="onnxruntime", poll_s=0.01)
    engine = swapper.start()
    rng = np.random.default_rng(0)
    for _ in range(60):  # the pointer and the loop race; whatever the interleaving ...
        bundle.set_serving(tiny_bundle, ids[rng.integers(3)])
        for _ in range(int(rng.integers(0, 4))):
            new = swapper.poll()
            engine = swapper.swap(engine, new) if new is not None else engine
            time.sleep(0.005)
    final = bundle.serving_id(tiny_bundle)
    engine = serve_until(swapper, engine, final)  # ... the loop ends up serving the pointer
    time.sleep(0.1)
    assert swapper.poll() is None
    swapper.close()
    assert engine.version == final == swapper.version


def test_corrupt_weights_with_an_intact_onnx_are_never_swapped_in(tiny_bundle, fake_engines, caplog):
    _, v2 = versions(tiny_bundle, 2)
    weights = tiny_bundle / "versions" / v2 / bundle.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:500])  # truncate -s 500
    swapper = EngineSwapper(tiny_bundle, kind="onnxruntime", poll_s=0.02)
    engine = swapper.start()
    with caplog.at_level(logging.WARNING):
        bundle.set_serving(tiny_bundle, v2)
        assert wait(lambda: v2 in swapper.skipped)
    assert swapper.poll() is None and swapper.version == "v0001" and engine.version == "v0001"
    assert "corrupt" in swapper.skipped[v2] and any("cannot serve" in r.message for r in caplog.records)
    swapper.close()


def test_weights_are_hashed_once_per_file_state(tiny_bundle, monkeypatch):
    calls = []
    real = bundle.sha256_file
    monkeypatch.setattr(bundle, "sha256_file", lambda p: calls.append(p) or real(p))
    vdir = tiny_bundle / "versions" / "v0001"
    for _ in range(5):
        bundle.check_servable(vdir)
    assert len(calls) == 1
    weights = vdir / bundle.MODEL_FILE
    weights.write_bytes(weights.read_bytes())  # same bytes, a new mtime: hashed again
    bundle.check_servable(vdir)
    assert len(calls) == 2


def test_a_version_restored_after_a_failed_load_is_served_on_rollback(tiny_bundle, fake_engines, caplog):
    from mas3_edge.runtime.versions import rollback
    _, v2 = versions(tiny_bundle, 2)
    weights = tiny_bundle / "versions" / v2 / bundle.MODEL_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[:500])  # truncate -s 500
    swapper = EngineSwapper(tiny_bundle, kind="onnxruntime", poll_s=0.02, retry_s=60.0)  # no retry by time
    engine = swapper.start()
    with caplog.at_level(logging.WARNING):
        bundle.set_serving(tiny_bundle, v2)
        assert wait(lambda: v2 in swapper.skipped)  # refused
        weights.write_bytes(good)  # the file is restored ...
        t0 = time.monotonic()
        rollback(tiny_bundle, v2)  # ... and `mas3-edge rollback` to it: "swaps to it within a second"
        engine = serve_until(swapper, engine, v2, timeout=1.0)
    swapper.close()
    assert engine.version == v2 == swapper.version and time.monotonic() - t0 < 1.0
    assert v2 not in swapper.skipped
    assert len([r for r in caplog.records if "cannot serve" in r.message]) == 1  # one line for the one failure


def test_a_failed_version_is_retried_with_backoff_one_line_per_failure(tiny_bundle, fake_engines, caplog):
    _, v2 = versions(tiny_bundle, 2)
    weights = tiny_bundle / "versions" / v2 / bundle.MODEL_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[:500])
    swapper = EngineSwapper(tiny_bundle, kind="onnxruntime", poll_s=0.01, retry_s=0.1, retry_max_s=0.4)
    engine = swapper.start()
    with caplog.at_level(logging.WARNING):
        bundle.set_serving(tiny_bundle, v2)
        time.sleep(1.35)  # failures at about 0, 0.1, 0.3, 0.7 and 1.1 s: the waits double up to the cap
        failures = [r.message for r in caplog.records if "cannot serve" in r.message]
        assert 3 <= len(failures) <= 6 and "trying again in" in failures[0]  # not 1 (never retried), not ~100
        weights.write_bytes(good)  # restored, the pointer left alone: the next try serves it
        engine = serve_until(swapper, engine, v2, timeout=2.0)
    swapper.close()
    assert engine.version == v2 and not swapper.skipped


def test_a_pointer_at_a_missing_version_is_reported_missing(tiny_bundle, fake_engines, caplog):
    swapper = EngineSwapper(tiny_bundle, kind="onnxruntime", poll_s=0.02)
    engine = swapper.start()
    with caplog.at_level(logging.WARNING):
        (tiny_bundle / "SERVING").write_text("v0042\n")  # the version was deleted, or a typo by hand
        assert wait(lambda: "v0042" in swapper.skipped)
    swapper.close()
    assert engine.version == "v0001" and "missing" in swapper.skipped["v0042"]
    assert "corrupt" not in swapper.skipped["v0042"]
    assert any("cannot serve v0042" in r.message and "missing" in r.message for r in caplog.records)
