"""tools/gate_fit.py on a small made-up corpus: the fitted rule, its operating point, the floors."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gate_fit  # noqa: E402

from mas3_edge.decide import GateRule, features  # noqa: E402

HEALTH = {"swd": 1.0, "swd_class": 1.0, "entropy": 0.5, "prior_kl": 0.1}


def _round(rng, half: str, kind: str) -> dict:
    """A round whose atc_delta tells harm apart (noisily); every other signal is noise."""
    harmful = kind == "harmful"
    target = -2.0 if harmful else 2.0 if kind == "good" else 0.0
    return {"half": half, "effect": {"target": target, "source": 0.0, "sentinel": 0.0},
            "before": {"sentinel": 30.0}, "after": {"sentinel": 30.0 + (-3.0 if harmful else 1.0)},
            "health_before": HEALTH, "health_after": {k: v * (1 + rng.normal(0, 0.01)) for k, v in HEALTH.items()},
            "gate_before": {"consistency": 0.8}, "gate_after": {"consistency": 0.8 + rng.normal(0, 0.01),
                                                               "retained": 0.9, "source": 1.0},
            "checks": [{"kind": "health", "signal": "swd", "passed": True}, {"kind": "gate", "signal": "source", "passed": True}],
            "signals": {"atc_delta": (-0.1 if harmful else 0.05) + rng.normal(0, 0.03),
                        "gmm_loglik_delta": rng.normal(0, 1), "agreement_plain": None}}


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    rounds = [_round(rng, half, kind) for half in ("tuning", "report")
              for kind in ["harmful"] * 30 + ["good"] * 40 + ["neutral"] * 10]
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"rounds": rounds}))
    return path


def test_the_rule_is_fitted_on_tuning_and_judged_on_report(corpus, tmp_path, capsys):
    res = gate_fit.main(["--corpus", str(corpus), "--out", str(tmp_path / "fit.json"), "--rule", str(tmp_path / "r.json")])
    assert "atc_delta" in res["rule"]["inputs"] and "gmm_loglik_delta" not in res["rule"]["inputs"]  # noise dropped
    assert res["auroc"]["tuning"]["atc_delta"] < 0.1  # harm lowers ATC: far from 0.5
    tuning, report = res["rules"]["tuning"]["floors + fitted"], res["rules"]["report"]["floors + fitted"]
    assert tuning["harmful_accepted"] <= 0.05 and report["harmful"] == 30 and report["good"] == 40
    assert res["floors"]["fitted: harmful accepted <= 5%"] == (report["harmful_accepted"] <= 0.05)
    assert res["rule"]["sentinel_margin"] in gate_fit.SENTINEL_MARGINS and res["rule"]["sentinel_threshold"] is not None
    assert res["rules"]["report"]["floors + fitted + sentinel"]["harmful_accepted"] == 0
    rule = GateRule.load(tmp_path / "r.json")
    assert rule.inputs == tuple(res["rule"]["inputs"]) and "tuning half" in rule.note
    harmful = _round(np.random.default_rng(1), "report", "harmful")
    assert rule.harm(features(harmful)) > rule.harm(features(_round(np.random.default_rng(1), "report", "good")))
    assert "| atc_delta |" in capsys.readouterr().out


def test_auroc_and_outcomes():
    assert gate_fit.auroc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert gate_fit.auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert gate_fit.outcome({"effect": {"target": 1.0, "source": -1.5}}) == "harmful"
    assert gate_fit.outcome({"effect": {"target": 0.6, "source": -0.9}}) == "good"
    assert gate_fit.outcome({"effect": {"target": 0.2, "source": 0.0}}) == "neutral"


def test_a_missing_input_takes_its_mean_and_a_bad_rule_file_is_one_error(tmp_path):
    rule = GateRule(("atc_delta",), (0.0,), (1.0,), (2.0,), 0.0, 0.5)
    assert rule.harm({}) == pytest.approx(0.5) and not rule.check({}).passed  # 0.5 is not below 0.5
    (tmp_path / "bad.json").write_text("{}")
    from mas3_edge.errors import UserError
    with pytest.raises(UserError, match="cannot read the gate rule"):
        GateRule.load(tmp_path / "bad.json")


def test_the_3d_halves_join_the_fit_halves_and_need_their_own_source(capsys):
    import gate_corpus
    tuning, report = gate_corpus.specs("tuning3d", 3), gate_corpus.specs("report3d", 20)
    assert {s["half"] for s in tuning} == {"tuning"} and {s["half"] for s in report} == {"report"}
    assert {s["target"] for s in tuning} == {"r3d-dusk"} and "r3d-dusk" not in {s["target"] for s in report}
    assert tuning[0]["key"] == "tuning3d/0" != gate_corpus.specs("tuning", 1)[0]["key"]  # caches do not collide
    assert {s["row"] for s in report} == set(gate_corpus.BANK_ROWS)  # the hard case: rounds that keep the source set
    assert all(gate_corpus.BANK_ROWS[r].get("keep_source", True) for r in gate_corpus.BANK_ROWS)
    with pytest.raises(SystemExit) as e:
        gate_corpus.main(["--half", "report3d", "--out", "unused.json"])
    assert e.value.code == 2 and "needs --source" in capsys.readouterr().err


def _scored(target: float, sentinel: float, source_passed: bool = True, retained_passed: bool = True) -> dict:
    return {"effect": {"target": target, "source": 0.0}, "before": {"sentinel": 30.0}, "after": {"sentinel": 30.0 + sentinel},
            "checks": [{"kind": "gate", "signal": "source", "passed": source_passed},
                       {"kind": "gate", "signal": "retained", "passed": retained_passed}]}


def test_the_oracle_bound_and_the_gain_a_rule_throws_away():
    """Two harmful rounds gain 2 and lose 3 on their sentinel frames; the good ones gain 1, 4 and 5 on
    the target (sentinel +1, +4, +5): no margin keeps the +2 harmful round out and the +1 good one in."""
    recs = [_scored(-2.0, 2.0), _scored(-2.0, -3.0), _scored(1.0, 1.0), _scored(4.0, 4.0, retained_passed=False),
            _scored(5.0, 5.0)]
    constant = GateRule((), (), (), (), 0.0, 1.0)  # P(harm) 0.5 for every round: the margin decides
    bound = gate_fit.sentinel_bound(recs, constant)
    # the strictest margin that rejects as few: 4 (any from 2.25 keeps the +2 harmful round out)
    assert bound["no floor"] == {"good_rejected": pytest.approx(1 / 3), "margin": 4.0, "threshold": np.inf}
    assert bound["all floors"]["good_rejected"] == pytest.approx(2 / 3)  # retained throws the +4 round away too
    lost = gate_fit.lost_gain(recs, np.array([False, False, False, True, True]))
    assert lost == {"share_of_gain": pytest.approx(0.1), "rejected": 1, "rejected_under_2_points": 1}


def test_paired_sentinel_frames(tmp_path, capsys):
    rec = {**_scored(-2.0, 1.0), "key": "tuning3d/4", "half": "tuning"}
    rec["effect"]["sentinel"] = 1.0
    rec["before"]["sentinel_frames"], rec["after"]["sentinel_frames"] = [10.0, 20.0, 30.0, 40.0], [12.0, 21.0, 29.0, 42.0]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rounds": [rec]}))
    res = gate_fit.main(["--paired", "--corpus", str(path), "--out", str(tmp_path / "p.json")])
    (row,) = res["rounds"]
    d = np.array([2.0, 1.0, -1.0, 2.0])
    assert row["outcome"] == "harmful" and row["improved"] == 3 and row["frames_mean"] == 1.0
    assert row["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / 2))
    assert "| tuning3d/4 | harmful |" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["rounds"] == res["rounds"]
