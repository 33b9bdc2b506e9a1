"""Confusion matrix -> per-class IoU, mIoU, pixel accuracy (classes absent from both are skipped).

A benchmark that scores a subset of the classes (SYNTHIA's 16 or 13, labels.SUBSETS) passes
`classes`: the mIoU is then the mean over those classes only, and the others are not reported. A
class outside the subset still has predictions, so its IoU would be 0 and pull the mean down."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import UserError
from .labels import CITYSCAPES, LabelSet


class Confusion:
    """Confusion matrix over the K classes of a label set; its ignore id is not counted."""

    def __init__(self, labels: LabelSet = CITYSCAPES):
        self.labels, self.k, self.ignore = labels, labels.num_classes, labels.ignore
        self.matrix = np.zeros((self.k, self.k), np.int64)  # rows: truth, cols: prediction

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        valid = label != self.ignore
        t, p = label[valid].astype(np.int64), pred[valid].astype(np.int64)
        # an id past K would land in another cell of the flattened matrix, or fail the reshape
        if t.size and max(t.max(), p.max()) >= self.k:
            raise UserError(f"label or prediction id {max(t.max(), p.max())} is not a class of label set "
                            f"{self.labels.id!r} (ids 0..{self.k - 1}, {self.ignore} = ignore); "
                            "are the labels in this model's label set?")
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

    def summary(self, classes: Sequence[int] | None = None) -> dict:
        """mIoU and per-class IoU, by the label set's class names, over `classes` (None: all); the
        classes left out are absent."""
        iou, scored, names = self.iou(classes), range(self.k) if classes is None else classes, self.labels.names
        return {"label_set": self.labels.id, "miou": self.miou(classes), "pixel_accuracy": self.pixel_accuracy(),
                "classes_scored": len(scored),
                "per_class_iou": {names[j]: (None if np.isnan(iou[j]) else float(iou[j] * 100)) for j in scored}}
