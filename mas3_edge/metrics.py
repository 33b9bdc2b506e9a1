"""Confusion matrix -> per-class IoU, mIoU, pixel accuracy (classes absent from both are skipped)."""
from __future__ import annotations

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

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN where the class is neither present nor predicted."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else 0.0

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.diag(self.matrix).sum() / total * 100) if total else 0.0

    def summary(self, names=CLASSES) -> dict:
        iou = self.iou()
        return {"miou": self.miou(), "pixel_accuracy": self.pixel_accuracy(),
                "per_class_iou": {n: (None if np.isnan(v) else float(v * 100)) for n, v in zip(names, iou)}}
