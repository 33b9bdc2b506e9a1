"""tools/bench_continual.py: the floors on hand-made numbers, and one real tiny stream end to end."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest

from mas3_edge import gate, bundle, health

_spec = importlib.util.spec_from_file_location("bench_continual",
                                               Path(__file__).parent.parent / "tools" / "bench_continual.py")
bench_continual = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_continual)

SOURCE_ONLY = [30.0, 30.5, 29.8, 30.2, 30.1]


def test_floors_pass_a_steady_method():
    steady = [31.0, 31.4, 31.2, 31.5, 31.3]
    assert all(bench_continual.floors(steady, SOURCE_ONLY, source_after=40.5, source_model=41.0).values())


def test_floor_b_compares_gains_so_harder_last_chunks_are_not_collapse():
    assert bench_continual.floors([31.0, 29.5], [30.0, 28.0], 41.0, 41.0)["b_last_round_not_below_first"]


@pytest.mark.parametrize("rounds, source_after, failed", [
    ([32.0, 31.0, 30.0, 29.0, 28.0], 41.0, {"a_no_round_below_source_only", "b_last_round_not_below_first"}),
    ([31.0, 31.0, 31.0, 31.0, 30.9], 41.0, {"b_last_round_not_below_first"}),  # a slow slide, nowhere near (a)
    ([31.0, 31.4, 31.2, 31.5, 31.3], 38.9, {"c_source_kept"}),  # target kept, source forgotten
])
def test_floors_fail_a_collapsing_method(rounds, source_after, failed):
    floors = bench_continual.floors(rounds, SOURCE_ONLY, source_after=source_after, source_model=41.0)
    assert {k for k, ok in floors.items() if not ok} == failed


def test_a_tiny_stream_end_to_end(tmp_path, monkeypatch, capsys):
    bq = bench_continual.bq
    # speed only: the health signals' SWD on 32768 pixels dominates a one-step round
    monkeypatch.setattr(health, "signals", functools.partial(health.signals, max_pixels=2048))
    # force the accepted path too (the smoke model's rounds are all rejected), so versions switch
    monkeypatch.setattr(health, "accept", lambda before, after, *tolerance: (True, "accepted by the test"))
    monkeypatch.setattr(gate, "gate_accept", lambda *args: (True, "accepted by the test"))
    left = []
    close = bq.Setup.close
    monkeypatch.setattr(bq.Setup, "close", lambda self: (left.append(bundle.version_ids(self.root)), close(self)))
    out = tmp_path / "c.json"
    report = bench_continual.main(["--preset", "smoke", "--rounds", "1", "--chunk", "2", "--steps", "1",
                                   "--methods", "mas3,bn", "--out", str(out), "--plot", str(tmp_path / "c.png")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert list(report["results"]) == ["source-only", "mas3", "bn"]  # source-only always runs, first
    for row in report["results"].values():
        assert [(c["round"], c["domain"]) for c in row["chunks"]] == [(1, d) for d in bench_continual.DOMAINS]
        assert len(row["rounds"]) == 1 and set(row["rounds"][0]["val"]) == set(bench_continual.DOMAINS)
        assert set(row["floors"]) == {"a_no_round_below_source_only", "b_last_round_not_below_first", "c_source_kept"}
    base, mas3, bn = (report["results"][k] for k in ("source-only", "mas3", "bn"))
    assert all(c["gap"] == 0.0 for c in base["chunks"]) and base["summary"]["worst_round_gap"] == 0.0
    assert all(base["floors"].values())
    # the smoke model is too weak for mas3's GMM filter: its rounds keep the re-estimated statistics alone
    assert mas3["summary"]["accepted"] == 4 and len({c["version"] for c in mas3["chunks"]}) == 4
    assert base["rounds"][0]["source"] == report["source_model"]["source-val"]
    # each chunk is predicted by the model adapted on the previous one, and only the source version is left
    assert bn["summary"]["accepted"] == 4 and len({c["version"] for c in bn["chunks"]}) == 4
    assert bn["chunks"][0]["version"] == base["chunks"][0]["version"] and left == [[base["chunks"][0]["version"]]]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| bn |" in printed and "floors for mas3: a_no_round_below_source_only pass" in printed


@pytest.mark.parametrize("argv, message", [(["--methods", "nope"], "unknown rows"), (["--rounds", "0"], "rounds")])
def test_bad_options_end_in_one_error_line_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_continual.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
