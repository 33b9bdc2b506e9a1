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
            "checks": [{"kind": "health", "passed": True}, {"kind": "gate", "passed": True}],
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
