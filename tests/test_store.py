"""The bundle store: numeric version order, a round's begin/commit, cleanup of what killed
processes left, and the retention policy. Real folders and real processes throughout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mas3_edge import bundle
from mas3_edge.errors import UserError
from mas3_edge.store import INCOMPLETE_FILE, BundleStore, read_mark, version_key


def clone(root: Path, src: str, dst: str, parent: str | None = "keep") -> str:
    """A copy of version `src` under the id `dst` (model.json names it), optionally re-parented."""
    shutil.copytree(root / "versions" / src, root / "versions" / dst)
    path = root / "versions" / dst / bundle.META_FILE
    meta = json.loads(path.read_text())
    meta["version"] = dst
    if parent != "keep":
        meta["parent"] = parent
    path.write_text(json.dumps(meta))
    return dst


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_ids_sort_by_number_so_v10000_is_newer_than_v9999(tiny_bundle, small_net):
    for vid in ("v9999", "v10000", "v0100"):
        clone(tiny_bundle, "v0001", vid)
    store = BundleStore(tiny_bundle)
    assert store.ids() == ["v0001", "v0100", "v9999", "v10000"] == bundle.version_ids(tiny_bundle)
    assert store.newest() == "v10000"
    assert sorted(["v2", "vlocal", "v10", "v1"], key=version_key) == ["vlocal", "v1", "v2", "v10"]
    (tiny_bundle / "SERVING").unlink()
    (tiny_bundle / bundle.HISTORY_FILE).unlink()
    assert bundle.resolve(tiny_bundle).name == "v10000"  # no pointer, no history: the newest
    assert bundle.save_version(tiny_bundle, small_net, serve=False).name == "v10001"


def test_a_round_marks_what_it_writes_until_committed(tiny_bundle, small_net):
    store = BundleStore(tiny_bundle)
    store.begin_round(owner=os.getpid(), label="r1")
    try:
        vid = bundle.save_version(tiny_bundle, small_net, serve=False).name
    finally:
        store.end_round()
    mark = read_mark(store.path(vid))
    assert mark["state"] == "writing" and mark["owner"] == os.getpid() and store.round_versions("r1") == [vid]
    with pytest.raises(UserError, match=f"{vid} cannot be served.*did not finish"):
        bundle.check_servable(store.path(vid))
    after = bundle.save_version(tiny_bundle, small_net, serve=False).name  # the round has ended: no mark
    assert read_mark(store.path(after)) is None
    store.commit(vid)
    assert bundle.check_servable(store.path(vid))["version"] == vid and store.round_versions("r1") == []


def test_a_process_started_from_a_round_writes_servable_versions(tiny_bundle):
    """Nothing of the round travels in the environment: a tool run from inside a round is no round."""
    store = BundleStore(tiny_bundle)
    store.begin_round(owner=os.getpid(), label="r1")
    try:
        code = ("import sys; from mas3_edge import bundle as b; v = b.load_version(sys.argv[1]); "
                "print(b.save_version(sys.argv[1], v.net, parent=v, serve=False).name)")
        res = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], capture_output=True, text=True,
                             timeout=120)
    finally:
        store.end_round()
    assert res.returncode == 0, res.stderr
    vid = res.stdout.strip()
    assert read_mark(store.path(vid)) is None and bundle.check_servable(store.path(vid))


def test_rejected_versions_keep_their_reason(tiny_bundle, small_net):
    store = BundleStore(tiny_bundle)
    vid = bundle.save_version(tiny_bundle, small_net, serve=False).name
    store.reject(vid, "round rejected: held-out entropy rose")
    assert read_mark(store.path(vid)) == {"state": "rejected", "reason": "round rejected: held-out entropy rose"}
    assert bundle.incomplete_reason(store.path(vid)) == "round rejected: held-out entropy rose"


def test_cleanup_removes_what_ended_processes_left(tiny_bundle, small_net):
    store, gone, me = BundleStore(tiny_bundle), dead_pid(), os.getpid()
    stale = [store.versions_dir / f".tmp-{gone}-abc", store.scratch_dir / f"rounds-{gone}-xyz"]
    live = [store.versions_dir / f".tmp-{me}-abc", store.scratch_dir / f"rounds-{me}-xyz"]
    old, new = store.versions_dir / ".tmp-oldname", store.versions_dir / ".tmp-newname"  # names without a pid
    for d in [*stale, *live, old, new]:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    marks = {"killed": {"state": "writing", "owner": gone, "round": "r"},
             "running": {"state": "writing", "owner": me, "round": "r"},
             "rejected": {"state": "rejected", "reason": "round rejected: worse"},
             "legacy": {"reason": "its adaptation round did not finish"}}  # a mark from before marks had owners
    vids = {}
    for name, mark in marks.items():
        vids[name] = bundle.save_version(tiny_bundle, small_net, serve=False).name
        (store.path(vids[name]) / INCOMPLETE_FILE).write_text(json.dumps(mark))
    removed = store.cleanup()
    assert sorted(removed) == sorted([p.name for p in stale] + [old.name, vids["killed"], vids["legacy"]])
    assert not any(p.exists() for p in [*stale, old]) and all(p.exists() for p in [*live, new])
    assert store.ids() == ["v0001", vids["running"], vids["rejected"]]
    assert not [p for p in store.versions_dir.iterdir() if "drop" in p.name]


def test_cleanup_never_removes_the_serving_version(tiny_bundle, small_net):
    store = BundleStore(tiny_bundle)
    vid = bundle.save_version(tiny_bundle, small_net).name  # serving
    (store.path(vid) / INCOMPLETE_FILE).write_text(json.dumps({"state": "writing", "owner": dead_pid()}))
    assert store.cleanup() == [] and store.exists(vid)


def chain(root: Path, n: int) -> list[str]:
    """v0001 (the source) and n - 1 versions, each the child of the one before."""
    ids = ["v0001"]
    for _ in range(n - 1):
        parent = bundle.load_version(root, ids[-1])
        ids.append(bundle.save_version(root, parent.net, parent=parent, serve=False).name)
    return ids


def test_retention_keeps_n_and_never_the_protected_ones(tiny_bundle):
    ids = chain(tiny_bundle, 8)
    store = BundleStore(tiny_bundle)
    store.set_serving("v0004")
    store.set_serving("v0006")  # serving v0006 (parent v0005), served before: v0004, source: v0001
    store.reject("v0003", "round rejected: worse")
    assert store.prune(0) == [] and store.prune(8) == []
    assert store.prune(5) == ["v0003", "v0002", "v0007"]  # the unservable one first, then the oldest
    assert store.ids() == ["v0001", "v0004", "v0005", "v0006", "v0008"]
    assert store.prune(1) == ["v0008"]  # fewer than the protected ones: those stay
    assert store.ids() == ["v0001", "v0004", "v0005", "v0006"] and len(ids) == 8
    assert bundle.load_version(tiny_bundle).id == "v0006"


def test_another_source_version_is_kept_too(tiny_bundle, small_net):
    chain(tiny_bundle, 3)
    other = bundle.save_version(tiny_bundle, small_net, serve=False).name  # a second `train`: parentless
    chain_end = bundle.save_version(tiny_bundle, small_net, parent=bundle.load_version(tiny_bundle, "v0003"),
                                    serve=False).name
    store = BundleStore(tiny_bundle)
    store.set_serving(chain_end)
    store.prune(2)
    assert {"v0001", other, chain_end, "v0003"} <= set(store.ids())


def test_serving_a_missing_version_says_missing_not_corrupt(tiny_bundle):
    from mas3_edge.runtime.versions import rollback, version_rows
    (tiny_bundle / "SERVING").write_text("v0042\n")  # by hand, or the version was deleted
    with pytest.raises(UserError, match="v0042 cannot be served: it is missing") as e:
        bundle.check_servable(BundleStore(tiny_bundle).path("v0042"))
    assert "corrupt" not in str(e.value)
    with pytest.raises(UserError, match="SERVING names v0042, which is missing"):
        rollback(tiny_bundle)
    _, rows = version_rows(tiny_bundle)
    assert [r[:2] + r[5:6] for r in rows if r[1] == "v0042"] == [["!", "v0042", "missing"]]
    assert rollback(tiny_bundle, "v0001") == ("v0042", "v0001")


def test_every_pointer_write_is_seen_and_leaves_no_temp_files(tiny_bundle):
    store = BundleStore(tiny_bundle)
    stamp = store.pointer_stamp()
    store.set_serving("v0001")  # the same id again: a new write all the same
    assert store.pointer_stamp() != stamp and store.history()[-2:] == ["v0001", "v0001"]
    assert sorted(p.name for p in tiny_bundle.iterdir()) == ["SERVING", "SERVING.history", "versions"]


def test_keep_versions_is_validated_in_the_parent():
    from mas3_edge.runtime.scheduler import ScheduleConfig
    assert ScheduleConfig().keep_versions == 20
    with pytest.raises(UserError, match="keep_versions"):
        ScheduleConfig(keep_versions=-1)
