"""tools/bench_quality.py: corruption targets, the oracle, the floor checks, a smoke run of main and
`mas3-edge bench quality`."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mas3_edge import data, synth
from mas3_edge.cli import app, bench
from mas3_edge.errors import UserError
from mas3_edge.model import SegNet

from conftest import SMALL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_quality as bq  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
pytest.importorskip("imagecorruptions")


def test_corrupt_images_keeps_shape_and_dtype_and_changes_the_image():
    images = np.stack([synth.render("realistic", i, (32, 64))[0] for i in range(2)])
    out = data.corrupt_images(images, "gaussian_noise", 3, seed=1)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)
    assert np.array_equal(out, data.corrupt_images(images, "gaussian_noise", 3, seed=1))  # seeded: reproducible
    with pytest.raises(UserError, match="unknown corruption"):
        data.corrupt_images(images, "sunburn", 3)
    with pytest.raises(UserError, match="32x32"):
        data.corrupt_images(images[:, :16], "fog", 3)


def test_targets_parse_and_expand():
    assert bq.parse_target("realistic+fog@3") == ("realistic", "fog", 3)
    assert bq.parse_target("night") == ("night", None, 0)
    assert len(bq.resolve_targets("corruptions")) == 30 and len(bq.resolve_targets("all")) == 35
    assert bq.resolve_targets("synthetic,realistic,realistic+fog@5")[-2:] == ["label-shift", "realistic+fog@5"]
    for bad in ("realistic+sunburn@3", "realistic+fog@6", "moon", "realistic+fog"):
        with pytest.raises(UserError, match="unknown target"):
            bq.resolve_targets(bad)


def test_corruption_targets_keep_the_labels_of_their_base():
    d = bq.make_data(dict(n_train=1, n_adapt=2, n_val=2, workers=1), ["realistic+contrast@5"])
    for part in ("adapt", "val"):
        corrupted, base = d[f"realistic+contrast@5-{part}"], d[f"realistic-{part}"]
        assert np.array_equal(corrupted.y, base.y) and corrupted.x.shape == base.x.shape
        assert np.abs(corrupted.x.astype(int) - base.x).mean() > 5
    assert "night-adapt" not in d  # only the bases the targets need are rendered


def test_oracle_fine_tunes_the_source_model_not_a_fresh_one():
    torch.manual_seed(1)
    src = SegNet(SMALL)
    pairs = bq.Pairs([synth.render("realistic", i, SMALL.input_size) for i in range(4)])
    s = types.SimpleNamespace(src=types.SimpleNamespace(net=src), data={"t-adapt": pairs}, device="cpu")
    tuned = dict(bq.oracle(s, "t", steps=2).named_parameters())
    moved = max((tuned[k] - p).abs().max().item() for k, p in src.named_parameters())
    assert 0 < moved < 0.01  # two Adam steps at lr 2e-3 from the source weights; a fresh init is far away


def _results(gains_by_row: dict[str, list[float]]) -> dict:
    targets = ["a", "b", "c"]
    res = {"source-only": {t: {"target": 20.0, "source": 30.0} for t in targets}}
    for row, g in gains_by_row.items():
        res[row] = {t: {"target": 20.0 + x, "source": 30.0, "accepted": True} for t, x in zip(targets, g)}
    return res


def test_every_row_can_be_named_in_the_comma_separated_methods_list():
    for name in bq.METHODS:
        assert "," not in name and name.strip() == name


def test_floor_checks_pass_and_fail():
    bank = "tent (lr 1e-3 in the bank)"
    rows = {"bn": [1, 1, 1], bank: [2, 0, 1], "mas3 (zero steps)": [2, 0, 1], "mas3": [3, 0.5, 2.5]}
    ok = bq.floor_checks(_results(rows))
    assert [c["pass"] for c in ok] == [True, True, True]
    below = bq.floor_checks(_results({**rows, "mas3": [5, -0.4, 5]}))  # 0.4 under statistics alone on b
    assert [c["pass"] for c in below] == [True, False, True] and "b -0.40" in below[1]["detail"]
    behind = bq.floor_checks(_results({**rows, bank: [2.5, 1, 2], "mas3": [3, 1, 2]}))  # not 1 point above
    assert [c["pass"] for c in behind] == [False, True, True] and f"best {bank}" in behind[0]["detail"]
    assert "FAIL" in bq.format_checks(behind) and bq.floor_checks(_results({"bn": [1, 1, 1]})) == []
    assert "best bn" in bq.floor_checks(_results(rows), bank)[0]["detail"]  # a row is not its own baseline
    forgot = _results(rows)
    forgot["mas3"]["a"]["source"] = 28.5  # the source domain lost 1.5 points
    assert not bq.floor_checks(forgot)[-1]["pass"]


def test_report_split_has_other_shift_families_than_tuning():
    tuning, report = (set(bq.resolve_targets(bq.SPLITS[k])) for k in ("tuning", "report"))
    assert not tuning & report and bq.CAMERA in report
    families = lambda ts: {bq.parse_target(t)[1] for t in ts}  # noqa: E731
    assert not (families(tuning) - {None}) & families(report)


def test_report2_shares_no_target_with_the_other_splits():
    report2 = set(bq.resolve_targets(bq.SPLITS["report2"]))
    assert len(report2) == 5 and not report2 & set(bq.resolve_targets(bq.SPLITS["tuning"] + "," + bq.SPLITS["report"]))


def test_merge_joins_runs_on_split_targets_and_refuses_other_rows(tmp_path, capsys):
    rows = {"bn": [1, 1, 1], "mas3 (zero steps)": [2, 0, 1], "mas3": [3, 0.5, 2.5]}
    whole = _results(rows)
    for name, targets in (("a.json", ["a"]), ("b.json", ["b", "c"])):
        part = {r: {t: cell for t, cell in cells.items() if t in targets} for r, cells in whole.items()}
        (tmp_path / name).write_text(json.dumps({"preset": "small", "targets": targets, "results": part}))
    bq.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")])
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["targets"] == ["a", "b", "c"] and merged["results"] == whole
    assert "pass: mas3 never more than 0.3 below statistics alone" in capsys.readouterr().out
    (tmp_path / "b.json").write_text(json.dumps({"targets": ["b"], "results": {"source-only": {}}}))
    with pytest.raises(SystemExit, match="different rows"):
        bq.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")])


def test_table_marks_the_oracle_as_a_reference():
    text = bq.table(_results({"oracle": [10, 10, 10], "bn": [1, 1, 1]}))
    assert "| oracle (reference) |" in text and "(+10.00)" in text and "| bn |" in text and "+1.00 |" in text


def test_smoke_run_writes_json_and_pngs(tmp_path, capsys):
    out, target = tmp_path / "q.json", "realistic+fog@3"
    bq.main(["--preset", "smoke", "--device", "cpu", "--steps", "1", "--methods", "bn", "--targets", target,
             "--source-steps", "16", "--out", str(out), "--plot-dir", str(tmp_path / "png")])
    report = json.loads(out.read_text())
    assert report["source_steps"] == 16 and report["source_domain"] == "synthetic"
    assert report["targets"] == [target] and report["oracle"]["steps"] == bq.PRESETS["smoke"]["oracle_steps"]
    assert set(report["results"]) == {"source-only", "oracle", "bn"}
    for row in report["results"].values():
        assert set(row) == {target} and 0 <= row[target]["target"] <= 100
    for name in ("quality_miou.png", "quality_gain.png"):
        assert (tmp_path / "png" / name).read_bytes()[:8] == PNG
    assert "| oracle (reference) |" in capsys.readouterr().out


def test_cli_bench_quality_passes_help_through_and_says_when_tools_are_missing(monkeypatch):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "quality", "--help"])
    assert res.exit_code == 0, res.output
    assert "--targets" in res.output and "--oracle-steps" in res.output  # the script's own help
    res = runner.invoke(app, ["bench", "quality", "--methods", "nope"])
    assert res.exit_code == 2 and "unknown rows" in res.output  # arguments reach the script
    monkeypatch.setattr(bench, "tool_path", lambda name: Path("/nowhere/tools") / f"{name}.py")
    res = runner.invoke(app, ["bench", "quality"])
    assert isinstance(res.exception, UserError) and "source checkout" in str(res.exception)


def test_archs_run_side_by_side_on_the_same_data(tmp_path, capsys):
    pytest.importorskip("torchvision")
    out = tmp_path / "q.json"
    bq.main(["--preset", "smoke", "--device", "cpu", "--steps", "1", "--methods", "bn", "--targets", "realistic",
             "--oracle-steps", "0", "--arch", "tiny,python:own_net:small", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["archs"] == ["tiny", "python:own_net:small"]
    dims = {a: r["embed_dim"] for a, r in report["by_arch"].items()}
    assert dims == {"tiny": 19, "python:own_net:small": 12}
    for r in report["by_arch"].values():
        assert set(r["results"]) == {"source-only", "bn"} and r["source_miou"] >= 0
    text = capsys.readouterr().out
    assert "| tiny (19) |" in text and "| python:own_net:small (12) |" in text


def test_3d_targets_are_scored_with_a_model_of_their_own_source_domain(capsys):
    assert bq.parse_target("r3d-fog") == ("r3d-fog", None, 0) and bq.source_of("r3d-fog") == "r3d-source"
    assert bq.parse_target("r3d-texture+gaussian_noise@3") == ("r3d-texture", "gaussian_noise", 3)
    assert bq.source_of("realistic+fog@3") == "synthetic" and "r3d-source" not in bq.TARGETS_3D
    args = bq._args(["--targets", "r3d-fog,r3d-lowcam", "--methods", ""])  # "": the source-only row alone
    assert args.source_domain == "r3d-source" and args.methods == [] and args.targets == ["r3d-fog", "r3d-lowcam"]
    with pytest.raises(SystemExit):  # named targets of two families: refused, not silently dropped
        bq._args(["--targets", "r3d-fog,realistic"])
    assert "not of source domain" in capsys.readouterr().err
    args = bq._args(["--targets", "realistic"])
    assert args.source_domain == "synthetic" and args.targets == ["realistic"]


def test_make_data_renders_the_3d_source_and_targets_once(tmp_path, monkeypatch):
    pytest.importorskip("mitsuba")
    monkeypatch.setattr(bq, "RENDER_CACHE", tmp_path)
    d = bq.make_data(dict(n_train=1, n_adapt=1, n_val=1, workers=1), ["r3d-fog", "r3d-fog+contrast@5"], "r3d-source")
    assert len(list(tmp_path.glob("r3d-*.npz"))) == 4  # source train/val, fog adapt/val: the corruptions are cheap
    monkeypatch.setattr(bq, "_render", None)  # a second run reads the renders back, rendering nothing
    again = bq.make_data(dict(n_train=1, n_adapt=1, n_val=1, workers=1), ["r3d-fog"], "r3d-source")
    np.testing.assert_array_equal(again["r3d-fog-val"].x, d["r3d-fog-val"].x)
    assert set(d) == {"source-train", "source-val", "r3d-fog-adapt", "r3d-fog-val",
                      "r3d-fog+contrast@5-adapt", "r3d-fog+contrast@5-val"}
    assert d["source-train"].x.shape == (1, 128, 256, 3) and not np.array_equal(d["source-val"].x, d["r3d-fog-val"].x)
    np.testing.assert_array_equal(d["r3d-fog-val"].y, d["r3d-fog+contrast@5-val"].y)


def test_the_3d_looks_split_into_one_tuning_look_and_a_report_set():
    tuning, report3d = (set(bq.resolve_targets(bq.SPLITS[k])) for k in ("tuning", "report3d"))
    assert tuning & set(bq.TARGETS_3D) == {"r3d-dusk"} and report3d == set(bq.TARGETS_3D) - {"r3d-dusk"}
    args = bq._args(["--split", "tuning"])  # the 2-D source: the 3-D look is left out, the rest unchanged
    assert args.source_domain == "synthetic" and "r3d-dusk" not in args.targets and len(args.targets) == 7
    assert bq._args(["--split", "tuning", "--source-domain", "r3d-source"]).targets == ["r3d-dusk"]
    assert bq._args(["--split", "report3d"]).source_domain == "r3d-source"
