"""tools/ablations.py: the GMM separation measure on hand-made prototypes, and a smoke run of main."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from mas3_edge.prototypes import Prototypes

_spec = importlib.util.spec_from_file_location("ablations", Path(__file__).parent.parent / "tools" / "ablations.py")
ablations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablations)


def _gmm(means: list[list[float]], scales: list[float], alpha: list[float] | None = None) -> Prototypes:
    k, d = len(means), len(means[0])
    chol = torch.stack([torch.eye(d) * s for s in scales])
    a = torch.tensor(alpha if alpha is not None else [1.0 / k] * k)
    return Prototypes(a, torch.tensor(means), chol, a * 1000)


def test_separation_has_the_closed_form_for_equal_covariances():
    # identity covariances: D_B = |Δμ|² / 8
    sep = ablations.separation(_gmm([[0.0, 0.0], [3.0, 4.0]], [1.0, 1.0]))
    assert sep["bhattacharyya_mean"] == pytest.approx(25 / 8) and sep["bhattacharyya_min"] == pytest.approx(25 / 8)
    assert sep["fisher"] == pytest.approx(6.25 / 2)  # between: each mean 2.5 from the centre; within: tr I = 2
    weighted = ablations.separation(_gmm([[0.0], [1.0]], [1.0, 1.0], [0.75, 0.25]))  # centre 0.25
    assert weighted["fisher"] == pytest.approx(0.75 * 0.25 ** 2 + 0.25 * 0.75 ** 2)


def test_separation_counts_a_covariance_gap_and_ignores_empty_components():
    # same mean, Σ = I and 4I in 2-D: ½ ln(det 2.5I / √(det I · det 4I)) = ½ ln 1.5625
    sep = ablations.separation(_gmm([[0.0, 0.0], [0.0, 0.0], [50.0, 50.0]], [1.0, 2.0, 1.0], [0.5, 0.5, 0.0]))
    assert sep["bhattacharyya_mean"] == pytest.approx(0.5 * math.log(1.5625))
    assert sep["fisher"] == pytest.approx(0.0, abs=1e-9)  # the far component has α = 0


def test_separated_components_score_higher_than_overlapping_ones():
    means = [[0.0] * 4, [1.0] * 4, [0.0, 2.0, 0.0, -2.0]]
    apart = ablations.separation(_gmm([[10 * v for v in m] for m in means], [1.0] * 3))
    close = ablations.separation(_gmm(means, [1.0] * 3))
    same = ablations.separation(_gmm([means[0]] * 3, [1.0] * 3))
    for key in ("bhattacharyya_mean", "bhattacharyya_min", "fisher"):
        assert apart[key] > close[key] > same[key]
    assert same["bhattacharyya_mean"] == pytest.approx(0.0, abs=1e-9) and same["fisher"] == pytest.approx(0.0, abs=1e-9)
    assert ablations.separation(_gmm([[1.0, 2.0]], [1.0]))["bhattacharyya_mean"] is None  # one component: no pair


def test_unknown_part_is_refused_before_any_work():
    with pytest.raises(SystemExit, match="unknown parts"):
        ablations.main(["--what", "tau,gamma"])


def _ok_or_failed(cell: dict) -> bool:
    return set(cell) == {"error"} or (set(cell) == {"target", "source"} and all(0 <= v <= 100 for v in cell.values()))


def test_smoke_run_writes_json_tables_and_pictures(tmp_path, capsys):
    # the smoke source model is barely trained: τ = 0.8 / 0.97 rounds may fail (no GMM sample passes)
    out = tmp_path / "abl.json"
    res = ablations.main(["--preset", "smoke", "--device", "cpu", "--steps", "1", "--out", str(out),
                          "--plot-dir", str(tmp_path / "png")])
    assert json.loads(out.read_text()) == res
    assert list(res["tau"]) == ["0.0", "0.8", "0.97"] and list(res["lam"]) == ["0.1", "0.5", "1.0", "2.0"]
    for row in [*res["tau"].values(), *res["lam"].values()]:
        assert all(_ok_or_failed(row[m]) for m in ablations.METHODS)
    zero = res["tau"]["0.0"]
    assert "target" in zero["mas3"] and "target" in zero["mas3-paper"]  # τ = 0 keeps every GMM sample
    assert zero["support_pixels"] > 0 and zero["classes"] >= 1 and zero["separation"]["fisher"] >= 0
    emb = res["embedding"]
    assert emb["projection"] in ("pca", "umap") and emb["points"]["target before"] == 4 * 16 * 32  # 4 frames, stride 8
    assert abs(emb["points"]["GMM samples"] - 3000) <= 19  # per-class rounding
    for name in ("embedding.png", "ablations.png"):
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| τ | support pixels" in printed and "| λ |" in printed and "| 0.97 |" in printed
