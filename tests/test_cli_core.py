"""The factory → device workflow through the real CLI: train, prototypes, adapt, eval, and bad input."""
import json
from pathlib import Path
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mas3_edge import bundle, synth
from mas3_edge.decide import SHIPPED_RULE, GateRule
from mas3_edge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    synth.write_folder(root / "src", "synthetic", 6, seed=1)
    synth.write_folder(root / "frames", "fog", 6, seed=2, labels=False)
    b = root / "bundle"
    for args in (["train", "--data", root / "src", "--bundle", b, "--steps", "3", "--batch-size", "2", "--device", "cpu"],
                 ["prototypes", "--data", root / "src", "--bundle", b, "--tau", "0.0", "--min-count", "1", "--device", "cpu"]):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
    return root


def test_train_and_prototypes_write_a_served_version(workflow):
    v = bundle.load_version(workflow / "bundle")
    assert v.id == "v0001" and v.prototypes_path.is_file()


def test_adapt_then_eval(workflow):
    b = workflow / "bundle"
    res = runner.invoke(app, ["adapt", "--buffer", str(workflow / "frames"), "--bundle", str(b), "--steps", "2",
                              "--tau", "0", "--no-guard", "--swd-pixels", "256"])
    assert res.exit_code == 0, res.output
    assert bundle.serving_id(b) == "v0002" and "swd (lower is better)" in res.output and "gate: retained" in res.output
    out = workflow / "eval.json"
    res = runner.invoke(app, ["eval", "--data", str(workflow / "src"), "--bundle", str(b), "--out", str(out),
                              "--overlays", str(workflow / "ov")])
    assert res.exit_code == 0, res.output
    figures = json.loads(out.read_text())
    assert figures["version"] == "v0002" and 0 <= figures["miou"] <= 100 and len(list((workflow / "ov").iterdir())) == 6


def test_a_rejected_round_exits_3_through_the_console_script_and_says_why(workflow):
    """The installed script, not CliRunner: main() once dropped typer.Exit's code and exited 0."""
    b = workflow / "bundle"
    versions, serving = bundle.version_ids(b), bundle.serving_id(b)
    script = Path(sys.executable).parent / "mas3-edge"
    res = subprocess.run([str(script), "adapt", "--buffer", str(workflow / "frames"), "--bundle", str(b), "--steps", "2",
                          "--tau", "0", "--swd-pixels", "256", "--one-set", "--source-floor", "1", "--version", "v0001",
                          "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    out = json.loads(res.stdout)
    assert out["accepted"] is False and out["method"] == "mas3" and out["version"] is None
    assert set(out["gate_after"]) == {"consistency", "retained", "source"} and out["choice"]["kept"]
    assert out["reason"] and f"rejected: {out['reason']}" in res.stderr
    assert bundle.version_ids(b) == versions and bundle.serving_id(b) == serving


def test_sentinel_frames_join_the_decision_and_the_report_says_labels_were_used(workflow):
    b = workflow / "bundle"
    script = Path(sys.executable).parent / "mas3-edge"
    res = subprocess.run([str(script), "adapt", "--buffer", str(workflow / "frames"), "--bundle", str(b), "--steps", "1",
                          "--tau", "0", "--swd-pixels", "256", "--sentinel", str(workflow / "src"), "--no-guard",
                          "--no-serve", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["used_labels"] is True and out["sentinel"]["frames"] == 6
    check = next(c for c in out["checks"] if c["signal"] == "sentinel_miou")
    rule = GateRule.load(SHIPPED_RULE)  # with sentinel frames: the rule's margin and its own threshold
    assert check["kind"] == "labels" and check["limit"] == pytest.approx(out["sentinel"]["serving_miou"] + rule.sentinel_margin)
    assert next(c for c in out["checks"] if c["signal"] == "fitted_gate")["limit"] == pytest.approx(rule.sentinel_threshold)
    assert [c["kind"] for c in out["checks"]][:4] == ["health"] * 4
    bad = _cli("adapt", "--buffer", workflow / "frames", "--bundle", b, "--sentinel", workflow / "nowhere")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "sentinel folder" in bad.stderr


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mas3_edge", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["adapt", "--buffer", "{root}/nowhere", "--bundle", "{root}/bundle"], "no such folder"),
    (["adapt", "--buffer", "{root}/frames", "--bundle", "{root}/nobundle"], "does not exist"),
    (["adapt", "--buffer", "{root}/frames", "--bundle", "{root}/bundle", "--method", "magic"], "unknown method"),
    (["adapt", "--buffer", "{root}/frames", "--bundle", "{root}/bundle", "--tau", "1.5"], "tau must be"),
    (["adapt", "--buffer", "{root}/frames", "--bundle", "{root}/bundle", "--target-conf", "1"], "target confidence"),
    (["adapt", "--buffer", "{root}/frames", "--bundle", "{root}/bundle", "--max-sets", "0"], "max sets must be >= 1"),
    (["adapt", "--buffer", "{root}/frames", "--bundle", "{root}/bundle", "--choice-margin", "-0.1"], "choice margin"),
    (["adapt", "--buffer", "{root}/frames", "--bundle", "{root}/bundle", "--batch-stats", "--batch-size", "1"],
     "--batch-size must be"),
    (["eval", "--data", "{root}/frames", "--bundle", "{root}/bundle"], "label missing"),
    (["train", "--data", "{root}/src", "--bundle", "{root}/b2", "--arch", "huge"], "unknown --arch 'huge'"),
    (["prototypes", "--data", "{root}/src", "--bundle", "{root}/bundle", "--covariance", "dense"], "covariance"),
])
def test_bad_input_is_one_line_and_nonzero(workflow, args, message):
    versions = bundle.version_ids(workflow / "bundle")
    res = _cli(*[a.format(root=workflow) for a in args])
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error:") and message in res.stderr
    assert bundle.version_ids(workflow / "bundle") == versions  # nothing new written


def test_prototypes_of_another_model_are_refused(workflow, tmp_path):
    other = tmp_path / "other"
    res = runner.invoke(app, ["train", "--data", str(workflow / "src"), "--bundle", str(other), "--steps", "1",
                              "--batch-size", "2", "--seed", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    src = bundle.load_version(workflow / "bundle", "v0001").prototypes_path
    dst = bundle.load_version(other).prototypes_path
    dst.write_bytes(src.read_bytes())
    res = _cli("adapt", "--buffer", workflow / "frames", "--bundle", other)
    assert res.returncode == 1 and "fitted for another model" in res.stderr
