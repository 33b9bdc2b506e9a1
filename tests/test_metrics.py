"""metrics and evaluate: IoU, mIoU, and the class subsets the SYNTHIA benchmarks score."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from mas3_edge import data, evaluate as ev
from mas3_edge.labels import SUBSETS
from mas3_edge.metrics import Confusion


def _confusion() -> Confusion:
    """Truth: classes 0 and 1 only (the rest ignored, as a 16-class SYNTHIA label is); the model
    calls a quarter of class 0 terrain (9), a class SYNTHIA-16 does not score."""
    label = np.array([0] * 8 + [1] * 8)
    pred = np.array([0] * 6 + [9] * 2 + [1] * 8)
    conf = Confusion()
    conf.update(pred, label)
    return conf


def test_miou_over_a_subset_leaves_the_excluded_classes_out():
    conf = _confusion()
    assert conf.miou() == pytest.approx((75 + 100 + 0) / 3)  # all 19: terrain counts as IoU 0
    assert conf.miou(SUBSETS["synthia16"]) == pytest.approx((75 + 100) / 2)
    summary = conf.summary(classes=SUBSETS["synthia16"])
    assert summary["classes_scored"] == 16 and "terrain" not in summary["per_class_iou"]
    assert summary["miou"] == pytest.approx(87.5)


def test_evaluate_scores_the_subset_a_synthia_dataset_was_opened_with(small_net, tmp_path, monkeypatch):
    root = tmp_path / "synthia"
    (root / "RGB").mkdir(parents=True), (root / "GT" / "LABELS").mkdir(parents=True)
    gt = np.zeros((64, 128, 3), np.uint16)
    gt[:32, :, 2], gt[32:, :, 2] = 3, 4  # SYNTHIA road (train id 0) above, sidewalk (1) below
    cv2.imwrite(str(root / "RGB" / "0.png"), np.zeros((64, 128, 3), np.uint8))
    cv2.imwrite(str(root / "GT" / "LABELS" / "0.png"), gt)
    pred = np.zeros((1, 64, 128), np.uint8)
    pred[:, 32:] = 1
    pred[:, :32, :32] = 9  # a quarter of the road called terrain
    monkeypatch.setattr(ev, "predict", lambda net, images: pred)
    res = ev.evaluate(small_net, data.open_dataset(root, "synthia", classes=16))
    assert res["miou"] == pytest.approx(87.5) and res["classes_scored"] == 16
    assert ev.evaluate(small_net, data.open_dataset(root, "synthia"))["miou"] == pytest.approx(175 / 3)
    explicit = ev.evaluate(small_net, data.open_dataset(root, "synthia"), classes=SUBSETS["synthia13"])
    assert explicit["miou"] == pytest.approx(87.5) and explicit["classes_scored"] == 13
