"""Evaluation on a labelled folder: confusion matrix -> IoU per class, mIoU, pixel accuracy.

Images and labels are brought to the model's input size (labels by nearest neighbour), the size
the runtime serves at.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from .data import write_png
from .errors import UserError
from .frames import resize
from .labels import colorize, overlay
from .metrics import Confusion
from .model import SegModel
from .torchutil import to_device


@torch.no_grad()
def predict(net: SegModel, images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) at the model's input size -> class ids uint8 (B, H, W)."""
    logits = net(net.normalize(to_device(images, net)))
    return logits.argmax(1).to(torch.uint8).cpu().numpy()


def _pairs(dataset, size: tuple[int, int]):
    for i in range(len(dataset)):
        img, lbl = dataset[i]
        h, w = size
        yield resize(img, size), (lbl if lbl.shape == (h, w) else cv2.resize(lbl, (w, h), interpolation=cv2.INTER_NEAREST))


def _chunks(iterable, n: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_label_set(dataset, labels) -> None:
    """Scoring a model against labels of another label set would compare unrelated class ids."""
    theirs = getattr(dataset, "label_set", None)
    if theirs is not None and (theirs.id, theirs.num_classes) != (labels.id, labels.num_classes):
        raise UserError(f"the data was opened for label set {theirs.id!r} ({theirs.num_classes} classes) but "
                        f"the model predicts {labels.id!r} ({labels.num_classes} classes); open it with the "
                        "model's label set")


def evaluate(net: SegModel, dataset, batch_size: int = 8, overlays: Path | None = None,
             max_overlays: int = 16, classes: Sequence[int] | None = None) -> dict:
    """mIoU etc. of `net` over a dataset of (image, label) pairs; optional PNG overlays
    (image | ground truth | prediction) in the colours of the model's label set. `classes`: the
    class ids scored (labels.SUBSETS, e.g. SYNTHIA's 16); None: the dataset's own `classes` where
    it has them (open_dataset(classes=16)), else all of the model's label set."""
    classes = getattr(dataset, "classes", None) if classes is None else classes
    labels = net.labels
    _check_label_set(dataset, labels)
    net.eval()
    conf = Confusion(labels)
    written = 0
    for batch in _chunks(_pairs(dataset, net.config.input_size), batch_size):
        preds = predict(net, np.stack([img for img, _ in batch]))
        for (img, lbl), pred in zip(batch, preds):
            conf.update(pred, lbl)
            if overlays is not None and written < max_overlays:
                write_png(Path(overlays) / f"{written:04d}.png",
                          np.concatenate([img, colorize(lbl, labels.palette),
                                          overlay(img, pred, palette=labels.palette)], axis=1))
                written += 1
    return {**conf.summary(classes=classes), "images": len(dataset)}
