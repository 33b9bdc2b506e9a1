"""Self-training inside the bank with denoised pseudo-labels (method mas3-st).

The teacher is the round's statistics-only model: the new set with its re-estimated statistics,
before any step, frozen for the whole round. Its pseudo-labels on the round's frames are denoised
twice before the student learns from them:

- class-balanced thresholds (CBST, Zou et al. 2018): of the pixels the teacher gives class c, only
  the `st_keep` most confident fraction is kept, a threshold per class, so that the classes a
  shift makes hard are not left out by one threshold that only the easy classes pass;
- prototype weights (ProDA, Zhang et al. 2021): each kept pixel weighs softmax_c(-|z - mu_c| / T)
  at its pseudo-label's class, so a pixel far from its class's prototype and near another's counts
  little. The prototypes mu_c are target-adapted: the mean teacher embedding of the pixels kept for
  class c on the round's frames, or the shipped GMM's mean for a class with fewer than
  min_class_pixels of them.

The student, the network with only the new set's normalisation affine parameters trained
(params="norm"), minimises the weighted cross-entropy; its statistics are re-estimated after the
steps (rounds.candidates). The weights live at the embedding's resolution, where the prototypes do.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import AdaptConfig
from .errors import UserError
from .model import SegModel
from .prototypes import Prototypes
from .steps import freeze, gradient_steps
from .torchutil import to_device


@torch.no_grad()
def teach(teacher: SegModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher on uint8 frames -> z (B, D, h, w), confidence (B, h, w), pseudo-label (B, h, w)."""
    z = teacher.embed(teacher.normalize(images))
    conf, label = torch.softmax(teacher.head(z), 1).max(1)
    return z, conf, label


def class_thresholds(conf: torch.Tensor, label: torch.Tensor, k: int, keep: float) -> torch.Tensor:
    """(K,) per class, the confidence above which the `keep` most confident fraction of the pixels
    labelled that class lie (CBST); +inf for a class no pixel has."""
    conf, label = conf.flatten(), label.flatten()
    out = torch.full((k,), float("inf"), device=conf.device)
    for c in label.unique().tolist():
        out[c] = torch.quantile(conf[label == c].float(), 1.0 - keep)
    return out


def kept(conf: torch.Tensor, label: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The pixels whose confidence reaches their class's threshold (a bool mask of conf's shape)."""
    return conf >= thresholds[label]


def proda_weights(z: torch.Tensor, label: torch.Tensor, means: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax over classes of -|z - mu_c| / temperature, at each pixel's label: z (N, D), label (N,),
    means (K, D) -> (N,) in [0, 1]."""
    d = torch.cdist(z.float(), means.float())  # (N, K)
    return torch.softmax(-d / temperature, 1).gather(1, label[:, None]).squeeze(1)


def flat(z: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B*h*w, D), the pixel order of conf.flatten()."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


@dataclass
class Denoiser:
    """What the frozen teacher makes of a round's frames: its class thresholds and prototypes."""

    teacher: SegModel
    thresholds: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D) target-adapted prototypes
    temperature: float
    adapted: int  # classes whose prototype is the target's (the others: the shipped GMM's mean)

    @classmethod
    @torch.no_grad()
    def fit(cls, net: SegModel, proto: Prototypes, frames: np.ndarray, cfg: AdaptConfig,
            batch_size: int = 8) -> Denoiser:
        """A frozen copy of `net` (the statistics-only model) as the teacher; two passes over the
        frames: the class thresholds, then the class means of the kept pixels' embeddings."""
        teacher = copy.deepcopy(net)
        freeze(teacher)
        teacher.routing = False  # the working set: the one the round adapts
        spans = range(0, len(frames), batch_size)
        outs = [teach(teacher, to_device(frames[i:i + batch_size], teacher))[1:] for i in spans]
        conf, label = (torch.cat([o[j].flatten() for o in outs]) for j in (0, 1))
        k = teacher.head.out_channels
        thresholds = class_thresholds(conf, label, k, cfg.st_keep)
        sums = torch.zeros(k, proto.d, dtype=torch.float64, device=conf.device)
        counts = torch.zeros(k, dtype=torch.float64, device=conf.device)
        for i in spans:
            z, c, y = teach(teacher, to_device(frames[i:i + batch_size], teacher))
            m = kept(c, y, thresholds).flatten()
            zk, yk = flat(z)[m].double(), y.flatten()[m]
            sums.index_add_(0, yk, zk)
            counts += torch.bincount(yk, minlength=k).double()
        means = proto.mean.to(sums.device, torch.float64).clone()
        enough = counts >= cfg.min_class_pixels
        means[enough] = sums[enough] / counts[enough, None]
        return cls(teacher, thresholds, means.float(), cfg.st_temperature, int(enough.sum()))

    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pseudo-label (B, h, w) and weight (B, h, w), 0 where the label is not kept."""
        z, conf, label = teach(self.teacher, images)
        w = proda_weights(flat(z), label.flatten(), self.means, self.temperature).view_as(conf)
        return label, w * kept(conf, label, self.thresholds)

    def loss(self, net: SegModel, images: torch.Tensor, _gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The weighted cross-entropy of the student on one batch: (loss, its parts)."""
        label, w = self.targets(images)
        logits = net.head(net.embed(net.normalize(images)))  # (B, K, h, w), the teacher's resolution
        ce = F.cross_entropy(logits, label, reduction="none")
        n_kept = int((w > 0).sum())
        value = (w * ce).sum() / max(n_kept, 1)
        if not torch.isfinite(value):
            raise UserError(f"the self-training loss became {value.item()}; lower --lr")
        return value, {"kept": n_kept / w.numel(), "weight": float(w.sum()) / max(n_kept, 1)}


def selftrain(net: SegModel, proto: Prototypes, frames: np.ndarray, cfg: AdaptConfig, progress=None) -> dict:
    """cfg.steps steps of denoised self-training in place on uint8 frames (N, H, W, 3); `net`
    enters as the statistics-only model, which becomes the teacher."""
    if len(frames) == 0:
        raise UserError("no frames to adapt on")
    denoiser = Denoiser.fit(net, proto, frames, cfg)
    out = gradient_steps(net, frames, cfg, denoiser.loss, progress)
    out["target_prototypes"] = denoiser.adapted
    return out
