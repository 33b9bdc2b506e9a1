"""Factories for `--arch python:own_net:NAME` in the tests: a network we did not write."""
from __future__ import annotations

from torch import nn


def _body(bn: bool = True) -> list[nn.Module]:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return [nn.Conv2d(3, 16, 3, 2, 1, bias=not bn), norm(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, 2, 1, bias=not bn), norm(24), nn.ReLU(),
            nn.Conv2d(24, 12, 1)]  # the embedding z: 12 channels at stride 4


def small(num_classes: int):
    """The contract: (module, name of its 1×1 classifier); the module returns logits at stride 4."""
    return nn.Sequential(*_body(), nn.Conv2d(12, num_classes, 1)), "7"


def no_batchnorm(num_classes: int):
    return nn.Sequential(*_body(bn=False), nn.Conv2d(12, num_classes, 1)), "7"


def wide_classifier(num_classes: int):
    return nn.Sequential(*_body(), nn.Conv2d(12, num_classes, 3, padding=1)), "7"


def wrong_name(num_classes: int):
    return nn.Sequential(*_body(), nn.Conv2d(12, num_classes, 1)), "classifier"


class _LateFirst(nn.Module):
    """Its first-declared batch norm is the second one the input reaches."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.late = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.early = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.embed = nn.Conv2d(24, 12, 1)
        self.classifier = nn.Conv2d(12, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.embed(self.late(self.early(x))))


def late_first(num_classes: int):
    return _LateFirst(num_classes), "classifier"
