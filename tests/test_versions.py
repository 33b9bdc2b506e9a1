"""`versions` and `rollback` tell the truth about each version: corrupt weights, rounds that never
finished, and which version was served last."""
from __future__ import annotations

import json

import pytest
from test_scheduler import FAST, frames_dir, nan_round, perturbed_round, round_caught_exporting, wait_result

from mas3_edge import bundle
from mas3_edge.errors import UserError
from mas3_edge.runtime.scheduler import ScheduleConfig, Scheduler
from mas3_edge.runtime.versions import COLUMNS, rollback, version_rows


def rows_by_id(root) -> dict[str, dict]:
    cols, rows = version_rows(root)
    return {r[1]: dict(zip(cols, r)) for r in rows}


def corrupt(root, vid: str) -> None:
    weights = root / "versions" / vid / bundle.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:500])  # truncate -s 500


def test_rollback_refuses_corrupt_weights_and_versions_shows_them(tiny_bundle, small_net):
    v2 = bundle.save_version(tiny_bundle, small_net, parent=bundle.load_version(tiny_bundle), serve=False).name
    corrupt(tiny_bundle, v2)
    with pytest.raises(UserError, match=f"{v2} cannot be served.*corrupt"):
        rollback(tiny_bundle, v2)
    assert bundle.serving_id(tiny_bundle) == "v0001"
    bundle.set_serving(tiny_bundle, v2)  # moved by hand: `versions` must not vouch for it
    rows = rows_by_id(tiny_bundle)
    assert "state" in COLUMNS and rows[v2]["state"] == "corrupt" and rows[v2][""] == "!"
    assert rows[v2]["onnx"] == "-" and "sha256" in rows[v2]["note"]
    assert rows["v0001"]["state"] == "ok" and rows["v0001"][""] == ""


def test_rollback_command_is_one_line_and_exit_1(tiny_bundle, small_net):
    import subprocess
    import sys
    v2 = bundle.save_version(tiny_bundle, small_net, parent=bundle.load_version(tiny_bundle), serve=False).name
    corrupt(tiny_bundle, v2)
    res = subprocess.run([sys.executable, "-c", "from mas3_edge.cli import main; main()", "rollback", v2,
                          "--bundle", str(tiny_bundle)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "corrupt" in res.stderr, res.stderr
    assert bundle.serving_id(tiny_bundle) == "v0001"


def test_a_round_killed_after_writing_its_version_leaves_it_incomplete(tiny_bundle, tmp_path):
    s = round_caught_exporting(tiny_bundle, tmp_path)
    s.close()  # `run` stopped (or killed) mid-export
    row = rows_by_id(tiny_bundle)["v0002"]
    assert row["state"] == "incomplete" and "did not finish" in row["note"] and row[""] == ""
    with pytest.raises(UserError, match="did not finish"):
        rollback(tiny_bundle, "v0002")


def test_a_rejected_round_marks_its_version_and_an_accepted_one_is_clean(tiny_bundle, tmp_path):
    s = Scheduler(tiny_bundle, frames_dir(tmp_path), ScheduleConfig(**FAST), round_fn=nan_round)
    out = wait_result(s)
    assert out["outcome"] == "rejected"
    row = rows_by_id(tiny_bundle)[out["version"]]
    assert row["state"] == "incomplete" and "not finite" in row["note"]
    s.close()
    s = Scheduler(tiny_bundle, tmp_path / "frames", ScheduleConfig(**FAST), round_fn=perturbed_round)
    out = wait_result(s)
    s.close()
    assert out["outcome"] == "accepted" and bundle.serving_id(tiny_bundle) == out["version"]
    assert rows_by_id(tiny_bundle)[out["version"]]["state"] == "ok"
    assert not (tiny_bundle / "versions" / out["version"] / bundle.INCOMPLETE_FILE).exists()


def test_every_pointer_move_is_kept_in_a_short_history(tiny_bundle, small_net):
    v1 = bundle.load_version(tiny_bundle)
    v2 = bundle.save_version(tiny_bundle, small_net, parent=v1).name
    rollback(tiny_bundle, "v0001")
    (tiny_bundle / bundle.HISTORY_FILE).open("a").write("\x00\xff not json\n")
    for _ in range(bundle.HISTORY_KEEP + 5):
        bundle.set_serving(tiny_bundle, v2)
    history = bundle.served_history(tiny_bundle)
    assert len(history) == bundle.HISTORY_KEEP and history[-1] == v2
    lines = (tiny_bundle / bundle.HISTORY_FILE).read_text().splitlines()
    assert all("time" in json.loads(line) for line in lines)
    (tiny_bundle / "SERVING").write_text("v0001")  # moved by an old tool that keeps no history
    assert bundle.last_served(tiny_bundle) == v2 and bundle.serving_id(tiny_bundle) == "v0001"
