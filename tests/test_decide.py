"""The verdict on a round: each check with its value and limit, in order, and sentinel frames."""
import math

import pytest

from mas3_edge import decide, synth
from mas3_edge.config import RoundConfig
from mas3_edge.errors import UserError

BEFORE = {"swd": 1.0, "swd_class": 2.0, "entropy": 0.5, "prior_kl": 0.1}
GATE = {"consistency": 0.7, "retained": 0.6, "source": 1.0}


def test_every_check_carries_its_value_and_limit():
    checks = decide.health_checks(BEFORE, {**BEFORE, "entropy": 0.52}, 0.02) + decide.gate_checks(GATE, RoundConfig())
    assert [c.signal for c in checks] == ["swd", "swd_class", "entropy", "prior_kl", "retained", "source"]
    entropy = checks[2]
    assert entropy.kind == "health" and entropy.value == 0.52 and entropy.limit == pytest.approx(0.51 + 1e-6)
    assert not entropy.passed and "entropy got worse: 0.5000 -> 0.5200" == entropy.message
    retained = checks[4]
    assert retained.kind == "gate" and retained.limit == 0.3 and retained.passed and retained.message == ""


def test_the_first_failure_decides_in_order_health_gate_labels():
    bad_gate = decide.gate_checks({**GATE, "retained": 0.1, "source": 0.5}, RoundConfig())
    ok, why = decide.verdict(decide.health_checks(BEFORE, BEFORE, 0.02) + bad_gate)
    assert not ok and "kept their label" in why  # retained comes before source
    nan = decide.health_checks(BEFORE, {**BEFORE, "swd": math.nan}, 0.02)
    assert decide.verdict(nan + bad_gate) == (False, "swd is not finite after adaptation")
    labels = [decide.sentinel_check(40.0, 42.0, 3.0, 8)]  # a gain, but not by the margin
    ok, why = decide.verdict(decide.health_checks(BEFORE, BEFORE, 0.02) + decide.gate_checks(GATE, RoundConfig()) + labels)
    assert not ok and "not better enough on the 8 sentinel frames: mIoU 40.0 -> 42.0 (must gain 3)" in why


def test_a_passing_verdict_says_whether_labels_were_used():
    checks = decide.health_checks(BEFORE, BEFORE, 0.0) + decide.gate_checks(GATE, RoundConfig())
    assert decide.verdict(checks) == (True, "health signals and gate held")
    assert decide.verdict(checks + [decide.sentinel_check(40.0, 43.0, 3.0, 8)])[1].endswith("and the sentinel frames")
    assert decide.sentinel_check(40.0, 39.5, -1.0, 8).passed  # a negative margin lets it lose that much
    assert not decide.sentinel_check(40.0, math.nan, -1.0, 8).passed


def test_with_sentinel_frames_the_fitted_rule_has_its_own_threshold():
    rule = decide.GateRule(("retained",), (0.5,), (0.1,), (-1.0,), 0.0, 0.2, sentinel_threshold=0.4, sentinel_margin=3.0)
    report = {"gate_after": {"retained": 0.5}}
    assert rule.check(report).limit == 0.2 and rule.check(report, sentinel=True).limit == 0.4
    assert decide.GateRule(*(("retained",), (0.5,), (0.1,), (-1.0,), 0.0, 0.2)).check(report, sentinel=True).limit == 0.2
    shipped = decide.GateRule.load(decide.SHIPPED_RULE)  # gate_fit chose the pair on the tuning half
    assert shipped.sentinel_threshold is not None and shipped.sentinel_threshold > shipped.threshold


def test_sentinel_frames_score_a_model_and_an_empty_folder_is_refused(tmp_path, small_net):
    synth.write_folder(tmp_path / "s", "night", 3, seed=4, size=small_net.config.input_size)
    sentinel = decide.Sentinel(tmp_path / "s", small_net)
    assert len(sentinel) == 3 and 0 <= sentinel.miou(small_net) <= 100
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(UserError):
        decide.Sentinel(tmp_path / "empty", small_net)


def test_the_shipped_gate_rule_loads_and_names_its_inputs():
    rule = decide.GateRule.load(decide.rule_path("shipped"))
    assert rule.inputs and len(rule.inputs) == len(rule.weights) == len(rule.mean) == len(rule.std)
    assert 0 < rule.threshold < 1 and "tuning half" in rule.note
