"""Small torch helpers shared by the adaptation, its baselines, the health check and evaluation."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def to_device(frames: np.ndarray, net: nn.Module) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) as a tensor on the device of `net`'s weights."""
    return torch.from_numpy(np.ascontiguousarray(frames)).to(next(net.parameters()).device)
