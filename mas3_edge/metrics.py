"""Confusion matrix -> per-class IoU, mIoU, pixel accuracy (classes absent from both are skipped).

A benchmark that scores a subset of the classes (SYNTHIA's 16 or 13, labels.SUBSETS) passes
`classes`: the mIoU is then the mean over those classes only, and the others are not reported. A
class outside the subset still has predictions, so its IoU would be 0 and pull the mean down."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .labels import CLASSES, IGNORE


class Confusion:
    def __init__(self, num_classes: int = len(CLASSES)):
        self.k = num_classes
        self.matrix = np.zeros((num_classes, num_classes), np.int64)  # rows: truth, cols: prediction

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        valid = label != IGNORE
        t, p = label[valid].astype(np.int64), pred[valid].astype(np.int64)
        self.matrix += np.bincount(t * self.k + p, minlength=self.k * self.k).reshape(self.k, self.k)

    def iou(self, classes: Sequence[int] | None = None) -> np.ndarray:
        """Per-class IoU (K,); NaN where the class is neither present nor predicted, or not in `classes`."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
        if classes is not None:
            iou[np.setdiff1d(np.arange(self.k), np.asarray(classes, np.int64))] = np.nan
        return iou

    def miou(self, classes: Sequence[int] | None = None) -> float:
        """Mean IoU in percent over `classes` (None: all K)."""
        iou = self.iou(classes)
        return float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else 0.0

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.diag(self.matrix).sum() / total * 100) if total else 0.0

    def summary(self, names=CLASSES, classes: Sequence[int] | None = None) -> dict:
        """mIoU and per-class IoU over `classes` (None: all); the classes left out are absent."""
        iou, scored = self.iou(classes), range(self.k) if classes is None else classes
        name = lambda j: names[j] if j < len(names) else str(j)  # noqa: E731
        return {"miou": self.miou(classes), "pixel_accuracy": self.pixel_accuracy(), "classes_scored": len(scored),
                "per_class_iou": {name(j): (None if np.isnan(iou[j]) else float(iou[j] * 100)) for j in scored}}
