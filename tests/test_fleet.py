"""The fleet: signed set objects in a folder and in a real S3 API server (moto's, on loopback),
every refusal, concurrent publishes, a store that is down or half-written, the judgement of a
pulled set, and the console script's exit codes."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import adapted_copy, domain
from mas3_edge import bank, bundle
from mas3_edge.data import write_png
from mas3_edge.fleet import objects, sync
from mas3_edge.fleet.adopt import round_set
from mas3_edge.fleet.store import Backoff, open_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_fleet import free_port as _free_port, start_moto as _start_moto  # noqa: E402  the benchmark's S3 server

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 API server process on loopback with a bucket; yields its URL prefix."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    proc = _start_moto(port)
    open_store("s3://fleet").fs.mkdir("fleet")
    yield "s3://fleet"
    proc.kill()
    proc.wait()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def robots(tmp_path_factory):
    """Keys of a, b (trusted) and mallory (not), two bundles of one lineage (a has an accepted
    round that adapted to dark frames), and b's buffered frames of its own, brighter domain."""
    import torch

    from conftest import SMALL
    from mas3_edge.model import SegNet
    d = tmp_path_factory.mktemp("fleet")
    keys = {n: objects.load_key(objects.keygen(n, d / "keys")[0]) for n in ("a", "b", "mallory")}
    (d / "trust").write_text((d / "keys/a.pub").read_text() + (d / "keys/b.pub").read_text())
    from mas3_edge import prototypes
    torch.manual_seed(0)
    net = SegNet(SMALL).eval()
    bundle.save_version(d / "a", net)
    base = bundle.load_version(d / "a")
    k, dim = net.config.num_classes, net.config.embed_dim  # a GMM: one well-separated component per class
    gmm = prototypes.Prototypes(torch.full((k,), 1 / k), torch.randn(k, dim) * 3, torch.eye(dim).repeat(k, 1, 1) * 0.5,
                                torch.full((k,), 100.0))
    prototypes.save(gmm, base.prototypes_path, base.meta["source_sha256"], "test")
    shutil.copytree(d / "a", d / "b")
    report = {"accepted": True, "gate_after": {"retained": 0.9, "source": 1.0}, "reason": "gate held"}
    adapted = bundle.save_version(d / "a", adapted_copy(net, domain(0, 60)), parent=base, info={"kind": "adapted"},
                                  files={"report.json": json.dumps(report).encode()})
    (d / "frames").mkdir()
    for i, f in enumerate(domain(120, 250, n=12, seed=1)):
        write_png(d / "frames" / f"{i:04d}.png", f)
    lineage = objects.Lineage.of_version(adapted)
    return {"dir": d, "keys": keys, "trust": objects.load_trust(d / "trust"), "lineage": lineage,
            "rows": round_set(d / "a", adapted.name), "adapted": adapted.name, "report": report}


def _fleets(robots, url, state: Path | None = None):
    a = sync.Fleet(open_store(url), robots["lineage"], None, robots["keys"]["a"], robots["trust"])
    b = sync.Fleet(open_store(url), robots["lineage"], state, robots["keys"]["b"], robots["trust"])
    return a, b


def _fleet_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mas3_edge.fleet.sync" and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------- objects through the stores


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_published_set_is_pulled_verified_and_whole_once(robots, tmp_path, where, request):
    url = str(tmp_path / "store") if where == "folder" else request.getfixturevalue("s3") + "/" + tmp_path.name
    a, b = _fleets(robots, url, tmp_path / "b.json")
    res = a.publish(robots["rows"], {"gate_after": {"retained": 0.9}}, "cam-a")
    got = b.pull()
    assert [p.entry["object"] for p in got] == [res["object"]] and got[0].entry["robot"] == "a"
    assert list(got[0].rows) == list(robots["rows"])  # the router first, every layer in order
    assert all(np.array_equal(got[0].rows[k], v) for k, v in robots["rows"].items())
    assert got[0].header["camera_id"] == "cam-a" and objects.sha256(got[0].data) == res["object"]
    assert b.pull() == [] and a.pull() == []  # waiting for its judgement; and a's own set is a's
    b.record(got[0].key, "adopted", "test")
    again = sync.Fleet(open_store(url), robots["lineage"], tmp_path / "b.json", robots["keys"]["b"], robots["trust"])
    assert again.pull() == []  # the record survives a restart


def test_pulls_list_only_new_keys(robots, s3, tmp_path, monkeypatch):
    monkeypatch.setattr(sync, "SKEW_S", 0.0)
    a, b = _fleets(robots, f"{s3}/{tmp_path.name}")
    listed: list[list[str]] = []
    real = b.store.list_after
    b.store.list_after = lambda prefix, after=None: listed.append(real(prefix, after)) or listed[-1]
    for _ in range(3):
        a.publish(robots["rows"], {}, None)
    assert len(b.pull()) == 3
    newest = a.publish(robots["rows"], {}, None)
    assert [p.key for p in b.pull()] == [newest["entry"]]
    # the store listed from the newest key seen on (S3 StartAfter): it and the new one, not the three before
    assert listed[-1][-1] == newest["entry"] and len(listed[-1]) == 2


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_two_robots_publishing_at_once_overwrite_nothing(robots, tmp_path, where, request):
    url = str(tmp_path / "store") if where == "folder" else request.getfixturevalue("s3") + "/" + tmp_path.name
    a, b = _fleets(robots, url)
    c = sync.Fleet(open_store(url), robots["lineage"], None, robots["keys"]["a"], robots["trust"])
    other = {k: v * 1.01 for k, v in robots["rows"].items()}
    start, out = threading.Barrier(3), []

    def publish(fleet, rows):
        start.wait()
        out.append(fleet.publish(rows, {}, None))

    threads = [threading.Thread(target=publish, args=(f, r)) for f, r in ((a, robots["rows"]), (b, other), (c, other))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    reader = sync.Fleet(open_store(url), robots["lineage"], None, None, robots["trust"])
    got = reader.pull()
    # three entries, each naming its own whole object (verified by the pull): none overwrote another
    assert len(got) == 3 and {p.key for p in got} == {o["entry"] for o in out}
    assert len({p.entry["object"] for p in got}) == 3


# ---------------------------------------------------------------- refusals


def _nan_router(rows):
    rows = {k: v.copy() for k, v in rows.items()}
    next(iter(rows.values()))[0, 0] = np.nan
    return rows


def _tamper(store: Path, res: dict, how: str) -> None:
    obj = store / "objects" / f"{res['object']}.safetensors"
    data = bytearray(obj.read_bytes())
    if how == "flip":
        data[-5] ^= 0xFF
    obj.write_bytes(bytes(data) + (b"x" * 10 if how == "grow" else b""))


def _publish_as(robots, store: Path, case: str) -> None:
    a, _ = _fleets(robots, str(store))
    if case == "unknown signer":
        a.robot, a.key = robots["keys"]["mallory"]
    if case == "wrong lineage":
        a.lineage = objects.Lineage("0" * 64, "cityscapes19", "0" * 64)
    res = a.publish(_nan_router(robots["rows"]) if case == "router key" else robots["rows"], {}, None)
    if case == "wrong lineage":  # put where this robot's lineage is listed: its signed lineage still differs
        src = store / res["entry"]
        dst = store / "lineages" / robots["lineage"].id / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
    if case in ("tampered object", "oversized"):
        _tamper(store, res, "flip" if case == "tampered object" else "grow")
    if case == "tampered entry":
        path = store / res["entry"]
        entry = json.loads(path.read_text())
        path.write_text(json.dumps({**entry, "size": entry["size"] + 1}))


@pytest.mark.parametrize("case", ["tampered object", "tampered entry", "unknown signer", "wrong lineage",
                                  "oversized", "router key"])
def test_each_refusal_is_one_line_recorded_and_never_retried(robots, tmp_path, caplog, case):
    _publish_as(robots, tmp_path / "store", case)
    _, b = _fleets(robots, str(tmp_path / "store"), tmp_path / "b.json")
    caplog.set_level(logging.INFO)
    assert b.pull() == []
    lines = _fleet_lines(caplog)
    assert len(lines) == 1 and "refused" in lines[0] and case.split()[-1] in lines[0], lines
    assert [r["outcome"] for r in json.loads((tmp_path / "b.json").read_text())["sets"].values()] == ["refused"]
    caplog.clear()
    assert b.pull() == [] and _fleet_lines(caplog) == []  # recorded: not fetched nor judged again


def test_a_half_written_object_is_tried_again_then_taken_or_refused(robots, tmp_path, caplog):
    store = tmp_path / "store"
    a, b = _fleets(robots, str(store))
    res = a.publish(robots["rows"], {}, None)
    obj = store / "objects" / f"{res['object']}.safetensors"
    whole = obj.read_bytes()
    obj.write_bytes(whole[:len(whole) // 2])  # a writer that wrote its manifest before its object
    caplog.set_level(logging.INFO)
    assert b.pull() == [] and "truncated" in _fleet_lines(caplog)[0] and "try again" in _fleet_lines(caplog)[0]
    obj.write_bytes(whole)
    assert [p.entry["object"] for p in b.pull()] == [res["object"]]
    obj.write_bytes(whole[:100])  # half-written for good: refused after a few tries
    _, c = _fleets(robots, str(store))
    for _ in range(sync.MAX_ATTEMPTS):
        assert c.pull() == []
    assert "refused" in _fleet_lines(caplog)[-1] and c.pull() == []


def test_backoff_doubles_to_its_cap_and_resets():
    b = Backoff(first=1.0, cap=5.0)
    assert [b.failed(now=0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert not b.ready(now=4.0) and b.ready(now=5.0)
    b.ok()
    assert b.ready(now=0.0) and b.failed(now=0.0) == 1.0


# ---------------------------------------------------------------- the runtime's side


def _runner(robots, tmp_path, url: str, name: str = "b", **cfg):
    from mas3_edge.runtime.fleet import FleetConfig, FleetRunner
    from mas3_edge.runtime.scheduler import ScheduleConfig
    d = robots["dir"]
    root = tmp_path / name
    shutil.copytree(d / name, root)
    fc = FleetConfig(url, d / "keys" / f"{name}.key", d / "trust", every_s=0.1, **{"judge_gap_s": 0.0, **cfg})
    return FleetRunner(fc, root, d / "frames", ScheduleConfig(min_frames=2, limit=2, export=False)), root


def _runtime_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mas3_edge.runtime.fleet" and r.levelno >= logging.WARNING]


def test_a_store_that_is_down_costs_the_loop_nothing_and_is_retried_with_backoff(robots, tmp_path, caplog,
                                                                                 monkeypatch):
    pytest.importorskip("moto.server")
    port = _free_port()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    caplog.set_level(logging.INFO)
    runner, _ = _runner(robots, tmp_path, "s3://down/fleet", name="a", backoff_s=0.2)
    runner.backoff.cap = 0.4  # the test waits for the store's return, not a minute
    try:
        runner.round_done({"outcome": "rejected", "version": robots["adapted"]})  # never published
        runner.round_done({"outcome": "accepted", "version": robots["adapted"]})
        t_end, slowest = time.monotonic() + 8.0, 0.0
        while time.monotonic() < t_end and len(_runtime_lines(caplog)) < 2:
            t0 = time.perf_counter()
            runner.tick(12, round_running=False)
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.01)
        fails = _runtime_lines(caplog)
        waits = [float(line.rsplit("retrying in ", 1)[1].split()[0]) for line in fails]
        assert len(fails) >= 2 and waits[:2] == [0.2, 0.4]  # one line per failure, the wait doubling
        assert slowest < 0.05  # the serving loop's tick never waits on the store
        proc = _start_moto(port)
        try:
            open_store("s3://down").fs.mkdir("down")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not open_store("s3://down/fleet").list_after("objects"):
                time.sleep(0.2)
            assert len(open_store("s3://down/fleet").list_after("objects")) == 1  # the accepted round's set only
        finally:
            proc.kill()
            proc.wait()
    finally:
        runner.close()


def test_a_set_for_other_frames_stays_pending_unfetched_then_is_judged_and_served_when_they_arrive(
        robots, tmp_path, monkeypatch):
    from mas3_edge.runtime import fleet as rfleet
    monkeypatch.setattr(rfleet, "DOMAIN_FRAMES", 8)
    a, _ = _fleets(robots, str(tmp_path / "store"))
    rows = _dark_keyed_rows(robots)
    res = a.publish(rows, robots["report"], "cam-a")  # a's set is for dark frames
    frames = tmp_path / "frames"
    shutil.copytree(robots["dir"] / "frames", frames)  # b sees its own bright domain
    runner, root = _runner(robots, tmp_path, str(tmp_path / "store"))
    runner.frames = frames
    status = tmp_path / "store/robots/b.json"
    try:
        t_end, out = time.monotonic() + 1.5, None
        while time.monotonic() < t_end and out is None:
            out = runner.tick(12, round_running=False)
            time.sleep(0.05)
        sets = json.loads((root / "fleet.json").read_text())["sets"]
        assert out is None and not runner.busy and [r["outcome"] for r in sets.values()] == ["pending"]
        assert runner.fleet.gets == 0  # the object was never read: the signed entry's key said "not for you"
        assert json.loads(status.read_text())["pending"] == [res["object"][:16]]
        for i, f in enumerate(domain(0, 60, n=8, seed=5)):  # then b meets a's domain
            write_png(frames / f"{100 + i:04d}.png", f)
        deadline = time.monotonic() + 300
        while out is None and time.monotonic() < deadline:
            out = runner.tick(12, round_running=False)
            time.sleep(0.05)
        time.sleep(0.5)  # the thread records the outcome and announces what b serves
    finally:
        runner.close()
    assert out is not None and out["outcome"] == "accepted" and out["robot"] == "a", out
    assert runner.fleet.gets == 1
    assert bundle.serving_id(root) == out["version"] and bundle.incomplete_reason(root / "versions" / out["version"]) is None
    v = bundle.load_version(root)
    assert v.meta["info"]["fleet"]["robot"] == "a" and bank.count(v.net) == 2  # the source set and a's
    assert all(np.allclose(bank.export_set(v.net)[k].numpy(), r) for k, r in rows.items())
    state = json.loads((root / "fleet.json").read_text())["sets"]
    assert [r["outcome"] for r in state.values()] == ["adopted"]
    assert json.loads(status.read_text())["sets"] == [res["object"]]


def test_judgements_start_at_most_one_a_gap(robots, tmp_path):
    runner, _ = _runner(robots, tmp_path, str(tmp_path / "store"), judge_gap_s=3600.0)
    try:
        runner._judged_at = time.monotonic()  # a judgement started just now
        runner._ready.append("a verified set")
        assert runner.tick(12, round_running=False) is None and not runner.busy
        assert list(runner._ready) == ["a verified set"]  # it waits for the gap, it is not dropped
    finally:
        runner.close()


def _dark_keyed_rows(robots) -> dict:
    """A set whose router key is a's dark set's, and which segments exactly as the source set does
    (the first layer's affine undoes its statistics): the untrained test network's gate accepts it."""
    net = bundle.load_version(robots["dir"] / "b").net
    rows = {k: r.numpy().astype(np.float64) for k, r in bank.export_set(net, 0).items()}
    name, eps = next(iter(rows)), bank.lead(net).eps
    m0, v0, w0, b0 = rows[name]
    m, v = robots["rows"][name][:2]
    w = w0 * np.sqrt(v + eps) / np.sqrt(v0 + eps)
    rows[name] = np.stack([m, v, w, b0 + w * (m - m0) / np.sqrt(v + eps)])
    return {k: r.astype(np.float32) for k, r in rows.items()}


def test_the_pending_list_keeps_the_newest_and_the_frames_take_the_nearest(robots, tmp_path, monkeypatch):
    monkeypatch.setattr(sync, "MAX_PENDING", 3)
    a, b = _fleets(robots, str(tmp_path / "store"), tmp_path / "b.json")
    published = [a.publish({k: v * (1 + i / 100) for k, v in robots["rows"].items()}, {}, None)["entry"]
                 for i in range(5)]
    seen: list[tuple] = []
    assert b.pull(lambda m, v: seen.append((m, v)) or None) == [] and b.gets == 0
    assert np.array_equal(seen[0][0], robots["rows"][next(iter(robots["rows"]))][0])  # the entry's key, exact
    assert b.pending() == published[:1:-1]  # the newest three
    dropped = [k for k, r in json.loads((tmp_path / "b.json").read_text())["sets"].items() if r["outcome"] == "dropped"]
    assert dropped == published[:2]
    target = float(seen[0][0].sum()) * 1.031  # nearest the 4th published set, then the 5th
    near = lambda m, v: abs(float(m.sum()) - target)  # noqa: E731
    assert [p.key for p in b.pull(near, recheck=True)] == [published[3]] and b.gets == 1
    assert b.pull(near, recheck=True) == [] and b.gets == 1  # one judgement at a time
    b.record(published[3], "adopted", "test")
    assert [p.key for p in b.pull(near, recheck=True)] == [published[4]] and b.pending() == [published[2]]
    b.record(published[4], "rejected", "test")  # its key stays: a farther set is not judged for these frames
    assert b.pull(near, recheck=True) == [] and b.pending() == [published[2]] and b.gets == 2


def test_a_tampered_or_mismatched_router_key_is_refused(robots, tmp_path, caplog):
    a, b = _fleets(robots, str(tmp_path / "store"), tmp_path / "b.json")
    res = a.publish(robots["rows"], {}, None)
    path = tmp_path / "store" / res["entry"]
    entry = json.loads(path.read_text())
    other = objects.router_key({k: v + 1 for k, v in robots["rows"].items()})
    path.write_text(json.dumps({**entry, "router": other}))  # a key that would route b's frames to it
    caplog.set_level(logging.INFO)
    assert b.pull(lambda m, v: 0.0) == [] and "tampered manifest entry" in _fleet_lines(caplog)[0]
    signed = objects.make_entry((tmp_path / "store" / "objects" / f"{res['object']}.safetensors").read_bytes(),
                                {"lineage_id": robots["lineage"].id}, "a", robots["keys"]["a"][1], other)
    path.write_text(json.dumps(signed))  # signed, but the key is not the object's
    _, c = _fleets(robots, str(tmp_path / "store"))
    assert c.pull(lambda m, v: 0.0) == [] and "not the one its entry signs" in _fleet_lines(caplog)[-1]
    signed = objects.make_entry((tmp_path / "store" / "objects" / f"{res['object']}.safetensors").read_bytes(),
                                {"lineage_id": robots["lineage"].id}, "a", robots["keys"]["a"][1])
    path.write_text(json.dumps(signed))  # an entry made before entries carried a key: fetched as before
    _, d = _fleets(robots, str(tmp_path / "store"))
    assert [p.key for p in d.pull(lambda m, v: None)] == [res["entry"]] and d.gets == 1


def _bad_rows(robots) -> dict:
    """A set routed to b's own frames (their statistics) whose affine parameters flip every sign."""
    from conftest import SMALL
    from mas3_edge.frames import load_frames
    net = bundle.load_version(robots["dir"] / "b").net
    rows = bank.export_set(adapted_copy(net, load_frames(robots["dir"] / "frames", SMALL.input_size)))
    return {k: np.concatenate([r[:2].numpy(), -3 * r[2:].numpy()]) for k, r in rows.items()}


def test_a_set_that_fails_the_gate_is_rejected_and_recorded_by_pull(robots, tmp_path):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    a, _ = _fleets(robots, str(tmp_path / "store"))
    a.publish(_bad_rows(robots), {}, None)
    dark = a.publish(robots["rows"], {}, None)["object"]  # not for b's frames: pending under --lazy
    shutil.copytree(robots["dir"] / "b", tmp_path / "b")
    args = ["fleet", "pull", str(tmp_path / "store"), "--trust", str(robots["dir"] / "trust"), "--bundle",
            str(tmp_path / "b"), "--buffer", str(robots["dir"] / "frames"), "--limit", "2", "--json", "--lazy"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (judged,) = json.loads(res.stdout)["sets"]
    assert judged["outcome"] == "rejected" and judged["robot"] == "a" and bundle.serving_id(tmp_path / "b") == "v0001"
    assert json.loads(res.stdout)["pending"] == [dark]
    again = CliRunner().invoke(app, args)
    assert json.loads(again.stdout)["sets"] == [] and json.loads(again.stdout)["pending"] == [dark]  # recorded


@pytest.mark.parametrize("args, says", [
    (["fleet", "ls", "ftp://host/x"], "use a folder, file://PATH or s3://"),
    (["fleet", "push", "{d}/store", "--key", "{d}/keys/nobody.key", "--bundle", "{d}/a"], "cannot read the fleet key"),
    (["fleet", "pull", "{d}/store", "--trust", "{d}/keys/a.key", "--bundle", "{d}/b", "--buffer", "{d}/frames"],
     "expected `NAME HEX`"),
    (["run", "--camera", "synthetic://night", "--fleet", "{d}/store"], "--fleet needs --fleet-key"),
])
def test_console_script_exit_codes(robots, args, says):
    d = robots["dir"]
    script = Path(sys.executable).parent / "mas3-edge"  # what `pip install -e .` puts beside the interpreter
    res = subprocess.run([str(script), *[a.format(d=d) for a in args]], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and says in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_push_publishes_only_accepted_rounds_and_ls_shows_who_serves_what(robots, tmp_path):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    d, store = robots["dir"], str(tmp_path / "store")
    push = ["fleet", "push", store, "--key", str(d / "keys/a.key"), "--bundle", str(d / "a")]
    assert CliRunner().invoke(app, [*push, "--version", "v0001"]).exit_code == 1  # no round: nothing to share
    res = CliRunner().invoke(app, [*push, "--camera-id", "cam-a", "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)["object"]
    sync.Fleet(open_store(store), robots["lineage"], None, robots["keys"]["b"]).announce({
        "lineage": robots["lineage"].id, "sets": [obj], "serving": "v0002"})
    sync.Fleet(open_store(store), robots["lineage"], None, robots["keys"]["mallory"]).announce({
        "lineage": robots["lineage"].id, "sets": [], "pending": [obj[:16]], "serving": "v0001"})
    ls = CliRunner().invoke(app, ["fleet", "ls", store, "--json", "--trust", str(d / "trust")])
    (s,) = json.loads(ls.stdout)["lineages"][robots["lineage"].id]["sets"]
    assert (s["object"], s["robot"], s["camera_id"], s["served_by"], s["status"]) == (obj, "a", "cam-a", ["b"], "signed")
    assert s["pending_on"] == ["mallory"]
    table = CliRunner().invoke(app, ["fleet", "ls", store])
    assert "pending on" in table.stdout and "mallory" in table.stdout
    assert s["gate"] == robots["report"]["gate_after"]


def test_the_fleet_options_come_from_the_config_file_too(robots, tmp_path):
    from typer.testing import CliRunner

    from mas3_edge.cli import app
    d = robots["dir"]
    cfg = tmp_path / "robot.toml"
    cfg.write_text(f'fleet = "{tmp_path / "store"}"\nfleet-key = "{d / "keys/a.key"}"\n'
                   f'fleet-trust = "{d / "trust"}"\nfleet-every = 5.0\n')
    res = CliRunner().invoke(app, ["run", "--camera", "synthetic://night", "--config", str(cfg), "--print-config"])
    assert res.exit_code == 0, res.output
    assert f'fleet = "{tmp_path / "store"}"' in res.stdout and "fleet-every = 5.0" in res.stdout


def test_a_slow_store_holds_the_thread_not_the_loop(robots, tmp_path, monkeypatch):
    from mas3_edge.fleet.store import FolderStore
    a, _ = _fleets(robots, str(tmp_path / "store"))
    a.publish(robots["rows"], {}, None)
    real = FolderStore.get
    # every read takes 0.6 s, from the thread's first pull on
    monkeypatch.setattr(FolderStore, "get", lambda self, key, n: time.sleep(0.6) or real(self, key, n))
    runner, _ = _runner(robots, tmp_path, str(tmp_path / "store"), lazy=False)  # every set is b's to judge
    try:
        t_end, slowest = time.monotonic() + 1.0, 0.0
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            runner.tick(12, round_running=True)  # a round runs: nothing is judged meanwhile
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.01)
        assert slowest < 0.05 and not runner._ready  # the pull is still reading: the loop did not wait
        deadline = time.monotonic() + 5
        while not runner._ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(runner._ready) == 1  # and the set arrived all the same
    finally:
        runner.close()


def test_an_imported_set_joins_the_bank_within_max_sets(robots):
    import torch

    from mas3_edge.errors import UserError
    net = bundle.load_version(robots["dir"] / "b").net
    rows = {k: torch.from_numpy(v) for k, v in robots["rows"].items()}
    for scale in (1.0, 1.1, 1.2):
        bank.import_set(net, {k: v * scale for k, v in rows.items()}, keep=2)
    assert bank.count(net) == 3  # the source set and the two newest: the oldest import was dropped
    assert torch.allclose(next(iter(bank.export_set(net).values())), next(iter(rows.values())) * 1.2)
    with pytest.raises(UserError, match="layer"):
        bank.import_set(net, {k: v[:, :1] for k, v in rows.items()}, keep=2)
