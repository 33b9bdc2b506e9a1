"""Label-free signals of a round that no adaptation method optimises: features for a measured gate.

Each is a float read on held-out uint8 frames (N, H, W, 3) that are consecutive in time (the
buffer's newest block); at most MAX_FRAMES of them, the newest, are read. Seeds are fixed, so two
models on the same frames see the same pixels, dropout masks and flow.

- ATC, average thresholded confidence (Garg et al., ICLR 2022): the share of pixels whose
  max-softmax confidence exceeds a threshold fitted on labelled source data (`fit_atc`), where
  that share equalled the pixel accuracy. An estimate of accuracy: higher is better.
- self-disagreement (after AETTA, 2024): how often the prediction changes when the embedding z
  is perturbed by dropout before the head h. Lower is better.
- temporal stability: agreement of frame t's labels with frame t-1's warped to t by dense optical
  flow (OpenCV DIS), on the pixels whose flow stays inside the image. Higher is better, but a
  model that predicts one class everywhere scores 1.0: read it beside the others.
- GMM log-likelihood: mean log N(z; μ_c, Σ_c) of the target embeddings under the component of
  their predicted class c (nats per pixel, not per dimension). Higher is better.
- agreements: pixel agreement with another model (gate.agreement); no direction by itself (1.0 is
  "nothing changed").

`round_signals(serving, new, frames, proto, plain=..., flow=...)` is what the round calls. It runs
each model once over the frames and returns these keys (None where a value cannot be computed:
no ATC threshold, no `plain`, fewer than two frames, no pixel of a fitted class):

    atc_new                    ATC of `new`                               higher is better
    atc_delta                  atc_new - ATC of `serving`                 higher is better
    self_disagreement_new      self-disagreement of `new`, in [0, 1]      lower is better
    self_disagreement_delta    ... minus that of `serving`                lower is better
    temporal_stability_new     temporal stability of `new`, in [0, 1]     higher is better
    temporal_stability_delta   ... minus that of `serving`                higher is better
    gmm_loglik_new             GMM log-likelihood of `new`                higher is better
    gmm_loglik_delta           ... minus that of `serving`                higher is better
    agreement_serving          `new` with `serving`                       no direction (1 = unchanged)
    agreement_source           `new` with its own source set (bank.source_path)  no direction
    agreement_plain            `new` with the statistics-only candidate   no direction (None without plain)

Cost, timed with a short script (one torch thread, 30 held-out frames, best of five runs):
one round_signals call with `plain` runs four models (serving, new, new's source path, plain) once
over 16 frames, against gate.consistency's four passes over 24. On the tests' small network
(64x128) it took 180 ms against consistency's 296 ms (0.6x; 0.46x without `plain`); on the tiny
preset (128x256) 504 ms against 1004 ms (0.5x). The DIS flow of 15 pairs is 2.5 ms and 9.6 ms of
that. The networks are expected in eval mode, as the round's candidates are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from . import gate
from .bank import source_path
from .errors import UserError
from .model import SegModel
from .prototypes import Prototypes
from .torchutil import to_device

MAX_FRAMES = 16  # the newest frames read (consecutive, for the flow)
MAX_PIXELS = 16384  # embeddings sampled for self-disagreement and the GMM likelihood
DROPOUT, DRAWS = 0.1, 4  # self-disagreement: dropout on z, perturbed copies
ATC_BINS = 1 << 16  # confidence histogram of fit_atc: the threshold to 1.5e-5
SEED = 0
KEYS = ("atc_new", "atc_delta", "self_disagreement_new", "self_disagreement_delta", "temporal_stability_new",
        "temporal_stability_delta", "gmm_loglik_new", "gmm_loglik_delta", "agreement_serving", "agreement_source",
        "agreement_plain")


@dataclass
class Outputs:
    """One pass of a model over the frames: what every signal reads."""

    pred: torch.Tensor  # (N, H, W) uint8 labels at the input resolution, on the CPU
    conf: torch.Tensor  # (N, H, W) max-softmax confidence, on the CPU
    z: torch.Tensor  # (P, D) embeddings at sampled positions of the stride grid, on the model's device
    zpred: torch.Tensor  # (P,) argmax h(z) of those embeddings


def newest(frames: np.ndarray, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """The newest `max_frames` frames (N, H, W, 3): consecutive, so the flow between them holds."""
    return frames[-max_frames:]


@torch.no_grad()
def outputs(net: SegModel, frames: np.ndarray, max_pixels: int = MAX_PIXELS, batch_size: int = 2,
            seed: int = SEED) -> Outputs:
    """Run `net` (in eval mode) over all of `frames`; the grid positions sampled for z depend only
    on the frames' shape and the seed, so two models are sampled alike."""
    gen = torch.Generator().manual_seed(seed)
    per_frame = max(1, math.ceil(max_pixels / max(len(frames), 1)))
    preds, confs, zs, zpreds = [], [], [], []
    for i in range(0, len(frames), batch_size):
        images = to_device(frames[i:i + batch_size], net)
        z = net.embed(net.normalize(images))  # (B, D, h, w)
        grid = net.head(z)  # (B, K, h, w)
        conf, pred = torch.softmax(net.upsample(grid, images.shape[1:3]), 1).max(1)  # (B, H, W)
        preds.append(pred.to(torch.uint8).cpu())  # K <= 255 (LabelSet)
        confs.append(conf.float().cpu())
        flat, gpred = z.flatten(2), grid.argmax(1).flatten(1)  # (B, D, h*w), (B, h*w)
        for b in range(len(images)):
            at = torch.randperm(flat.shape[2], generator=gen)[:per_frame].to(z.device)
            zs.append(flat[b, :, at].T)  # (p, D)
            zpreds.append(gpred[b, at])
    return Outputs(torch.cat(preds), torch.cat(confs), torch.cat(zs), torch.cat(zpreds))


# ATC ------------------------------------------------------------------------------------------

class Labelled(Protocol):
    """What prototypes.fit reads too: a sized, indexable set of (uint8 image (H, W, 3), label (H, W))."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...


@torch.no_grad()
def fit_atc(net: SegModel, dataset: Labelled, batch_size: int = 8, max_images: int | None = 256) -> float:
    """Factory side: on labelled source frames (the label set's ignore id, 255, is skipped), the
    confidence threshold t at which the share of valid pixels with max-softmax confidence > t
    equals their pixel accuracy. A streaming histogram, so any number of pixels; at most
    `max_images` images, evenly spaced (None: all). Fit it on held-out source frames where there
    are some: on the training frames the accuracy, and so t, is optimistic."""
    net.eval()
    ignore = net.labels.ignore
    hist = torch.zeros(ATC_BINS, dtype=torch.float64)
    correct, valid = 0, 0
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    chosen = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    for start in range(0, n, batch_size):
        items = [dataset[int(j)] for j in chosen[start:start + batch_size]]
        x = to_device(np.stack([img for img, _ in items]), net)
        conf, pred = torch.softmax(net(net.normalize(x)), 1).max(1)  # (B, H, W)
        lab = torch.from_numpy(np.stack([lbl for _, lbl in items])).to(pred.device).long()
        keep = lab != ignore
        correct += int((pred[keep] == lab[keep]).sum())
        valid += int(keep.sum())
        bins = (conf[keep].double() * ATC_BINS).long().clamp(0, ATC_BINS - 1)
        hist += torch.bincount(bins, minlength=ATC_BINS).double().cpu()
    if valid == 0:
        raise UserError("no labelled pixel in the source data: the ATC threshold needs labels")
    return _quantile(hist, 1 - correct / valid)


def _quantile(hist: torch.Tensor, q: float) -> float:
    """The value below which a share q of the histogram's mass lies (linear within a bin), on [0, 1]."""
    cum = hist.cumsum(0)
    target = q * float(cum[-1])
    # the first bin whose cumulative mass passes the target: for q = 0 the lowest non-empty bin
    i = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype), right=True).clamp(max=len(hist) - 1))
    below = float(cum[i - 1]) if i > 0 else 0.0
    inside = (target - below) / float(hist[i]) if hist[i] > 0 else 0.0
    return (i + min(max(inside, 0.0), 1.0)) / len(hist)


def atc(net: SegModel, frames: np.ndarray, threshold: float) -> float:
    """Device side: the share of pixels of the newest frames whose confidence exceeds the ATC
    threshold, an estimate of the pixel accuracy. Higher is better."""
    return _atc(outputs(net, newest(frames)), threshold)


def _atc(out: Outputs, threshold: float) -> float:
    return float((out.conf > threshold).float().mean())


# self-disagreement ----------------------------------------------------------------------------

def self_disagreement(net: SegModel, frames: np.ndarray, p: float = DROPOUT, draws: int = DRAWS) -> float:
    """Share of sampled embeddings whose class changes under dropout (rate p) on z before h,
    averaged over `draws` fixed masks. Lower is better (0: no perturbation moves a label)."""
    return _self_disagreement(net, outputs(net, newest(frames)), p, draws)


@torch.no_grad()
def _self_disagreement(net: SegModel, out: Outputs, p: float = DROPOUT, draws: int = DRAWS,
                       seed: int = SEED) -> float:
    gen = torch.Generator().manual_seed(seed + 1)
    z = out.z[:, :, None, None]  # (P, D, 1, 1): h is a 1x1 conv
    changed = 0.0
    for _ in range(draws):
        keep = (torch.rand(z.shape, generator=gen) >= p).to(z.device, z.dtype)  # drawn on the CPU
        changed += float((net.head(z * keep / (1 - p)).argmax(1).flatten() != out.zpred).float().mean())
    return changed / draws


# temporal stability ---------------------------------------------------------------------------

def flows(frames: np.ndarray, max_frames: int = MAX_FRAMES) -> list[np.ndarray]:
    """Backward optical flow (H, W, 2) of each consecutive pair of the newest frames: flows[i]
    takes frame i+1's pixel x to x + flow(x) in frame i. Computed once, shared by every model."""
    frames = newest(frames, max_frames)
    dis = cv2.DISOpticalFlow.create(cv2.DISOpticalFlow_PRESET_FAST)
    gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    out = []
    for t in range(1, len(gray)):
        buffer = np.zeros((*gray[t].shape, 2), np.float32)  # output only: DIS ignores it as an initial flow
        out.append(np.asarray(dis.calc(gray[t], gray[t - 1], buffer)))
    return out


def temporal_stability(net: SegModel, frames: np.ndarray, flow: list[np.ndarray] | None = None) -> float:
    """Agreement of each frame's labels with the previous frame's warped to it by the flow, on the
    pixels whose flow stays in the image; NaN with fewer than two frames. Higher is better."""
    frames = newest(frames)
    return _stability(outputs(net, frames).pred, flows(frames) if flow is None else flow)


def _stability(pred: torch.Tensor, flow: list[np.ndarray]) -> float:
    labels = pred.numpy()  # (N, H, W) uint8
    if len(flow) != len(labels) - 1:
        raise ValueError(f"{len(flow)} flows for {len(labels)} frames: pass flows() of the same frames")
    same, total = 0, 0
    for t in range(1, len(labels)):
        warped, valid = warp(labels[t - 1], flow[t - 1])
        same += int(((warped == labels[t]) & valid).sum())
        total += int(valid.sum())
    return same / total if total else float("nan")


def warp(labels: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (H, W) of frame t-1 at frame t's pixels (nearest), and where the flow is inside."""
    h, w = labels.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = gx + flow[..., 0], gy + flow[..., 1]  # (H, W) each
    valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    warped = cv2.remap(labels, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=255)
    return warped, valid


# agreement and GMM likelihood -----------------------------------------------------------------

def agreement(a: SegModel, b: SegModel, frames: np.ndarray) -> float:
    """Pixel agreement of two models on the newest frames (gate.agreement)."""
    return gate.agreement(a, b, newest(frames))


def source_agreement(net: SegModel, frames: np.ndarray) -> float:
    """Agreement of `net` with its own source normalisation set (bank.source_path) on the frames."""
    return agreement(source_path(net), net, frames)


def gmm_loglik(net: SegModel, proto: Prototypes, frames: np.ndarray, max_pixels: int = MAX_PIXELS) -> float:
    """Mean log-likelihood of sampled target embeddings under their predicted class's component;
    NaN when no pixel is predicted as a class the prototypes fitted. Higher is better."""
    return _gmm_loglik(proto, outputs(net, newest(frames), max_pixels))


def _gmm_loglik(proto: Prototypes, out: Outputs) -> float:
    fitted = (proto.alpha > 0).to(out.zpred.device)[out.zpred.long()]  # absent classes: identity placeholders
    if not fitted.any():
        return float("nan")
    return float(proto.log_prob(out.z[fitted], out.zpred[fitted]).mean())


# the round's entry point ----------------------------------------------------------------------

def round_signals(serving: SegModel, new: SegModel, frames: np.ndarray, proto: Prototypes, *,
                  plain: SegModel | None = None, atc_threshold: float | None = None,
                  flow: list[np.ndarray] | None = None) -> dict[str, float | None]:
    """The KEYS of the module docstring for candidate `new` against `serving` on held-out frames.
    `atc_threshold` defaults to the one stored with the prototypes; `flow` to flows(frames)."""
    frames = newest(frames)
    flow = flows(frames) if flow is None else flow
    threshold = proto.atc_threshold if atc_threshold is None else atc_threshold
    before, after = outputs(serving, frames), outputs(new, frames)

    def each(signal) -> tuple[float | None, float | None]:  # (new's value, its change from serving's)
        b, a = signal(before), signal(after)
        return _finite(a), _finite(a - b)

    out: dict[str, float | None] = dict.fromkeys(KEYS)
    if threshold is not None:
        out["atc_new"], out["atc_delta"] = each(lambda o: _atc(o, threshold))
    sd_new = _self_disagreement(new, after)  # the perturbation goes through each model's own head
    out["self_disagreement_new"], out["self_disagreement_delta"] = sd_new, sd_new - _self_disagreement(serving, before)
    if len(frames) > 1:
        out["temporal_stability_new"], out["temporal_stability_delta"] = each(lambda o: _stability(o.pred, flow))
    out["gmm_loglik_new"], out["gmm_loglik_delta"] = each(lambda o: _gmm_loglik(proto, o))
    out["agreement_serving"] = _agree(after, before)
    out["agreement_source"] = _agree(after, outputs(source_path(new), frames))
    if plain is not None:
        out["agreement_plain"] = _agree(after, outputs(plain, frames))
    return out


def _agree(a: Outputs, b: Outputs) -> float:
    """Pixel agreement of two passes: gate.agreement's figure (all pixels) without running the models again."""
    return float((a.pred == b.pred).float().mean())


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
