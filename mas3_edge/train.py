"""Source training (paper Eq. 1): pixel-wise cross-entropy, ignore 255, Adam, scale/crop/flip.

Seeded and resumable: a checkpoint (weights + Adam state as safetensors, step and RNG seed as
JSON) is written atomically every `ckpt_every` steps; `resume=True` continues from it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm


from .bundle import atomic_write, atomic_write_json, save_version
from . import bank, dist
from .config import ModelConfig
from .errors import UserError
from .arch import build
from .labels import CITYSCAPES, LabelSet
from .model import SegModel


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    scale: tuple[float, float] = (0.75, 1.5)
    seed: int = 0
    ckpt_every: int = 100

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("train needs steps >= 1, batch size >= 1 and lr > 0")


def augment(img: np.ndarray, lbl: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
            scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, random crop (padding labels with ignore), random horizontal flip."""
    h, w = size
    s = rng.uniform(*scale) * max(h / img.shape[0], w / img.shape[1])
    nh, nw = max(h, round(img.shape[0] * s)), max(w, round(img.shape[1] * s))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    lbl = cv2.resize(lbl, (nw, nh), interpolation=cv2.INTER_NEAREST)
    y, x = rng.integers(0, nh - h + 1), rng.integers(0, nw - w + 1)
    img, lbl = img[y:y + h, x:x + w], lbl[y:y + h, x:x + w]
    if rng.random() < 0.5:
        img, lbl = img[:, ::-1], lbl[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(lbl)


def _batch(dataset, idx, size, rng, scale) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = []
    for i in idx:
        img, lbl = dataset[int(i)]
        pairs.append(augment(img, lbl, size, rng, scale))
    return torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs]))


def _save_ckpt(ckpt: Path, net: SegModel, opt: torch.optim.Optimizer, step: int) -> None:
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        tensors.update({f"adam.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    atomic_write(ckpt / "last.safetensors", safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write_json(ckpt / "last.json", {"step": step, "architecture": net.config.to_dict()})


def _load_ckpt(ckpt: Path, net: SegModel, opt: torch.optim.Optimizer) -> int:
    try:
        info = json.loads((ckpt / "last.json").read_text())
        t = safetensors.torch.load_file(str(ckpt / "last.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot resume from {ckpt}: {e}") from None
    if ModelConfig.from_dict(info["architecture"]) != net.config:
        raise UserError(f"checkpoint in {ckpt} is for another architecture; remove it or drop --resume")
    net.load_weights({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    state = opt.state_dict()
    for key, v in t.items():
        if key.startswith("adam."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(state)
    return int(info["step"])


def train(dataset, model_cfg: ModelConfig, cfg: TrainConfig, bundle: Path, ckpt: Path,
          resume: bool = False, device: str = "cpu", source_name: str = "synthetic",
          labels: LabelSet = CITYSCAPES) -> Path | None:
    """Train on (image, label) pairs and write the first bundle version; returns its directory.

    Under torchrun each rank trains a DDP replica on its shard of the data, `batch_size` images a
    step (the global batch is world × batch_size); rank 0 alone logs, checkpoints and writes the
    version, and the other ranks return None."""
    if len(dataset) == 0:
        raise UserError("the training set is empty")
    with dist.session(device) as ctx:
        return _train(dataset, model_cfg, cfg, bundle, ckpt, resume, ctx.device, source_name, ctx, labels)


def _train(dataset, model_cfg: ModelConfig, cfg: TrainConfig, bundle: Path, ckpt: Path, resume: bool,
           device: str | torch.device, source_name: str, ctx: dist.Context, label_set: LabelSet) -> Path | None:
    torch.manual_seed(cfg.seed)
    net = build(model_cfg, label_set).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = _load_ckpt(ckpt, net, opt) if resume and (ckpt / "last.json").exists() else 0
    model = _replicate(net, ctx)  # after the resume: DDP starts every rank from rank 0's weights
    losses = []
    bar = tqdm(range(start, cfg.steps), desc="train", initial=start, total=cfg.steps, leave=False,
               disable=ctx.rank != 0)
    for step in bar:
        # per-step seed: a resumed run sees the same batches (under torchrun each rank its own crops)
        rng = np.random.default_rng([cfg.seed, step] + ([ctx.rank] if ctx.world > 1 else []))
        images, labels = _batch(dataset, _indices(len(dataset), step, cfg, ctx, rng),
                                model_cfg.input_size, rng, cfg.scale)
        for g in opt.param_groups:  # poly decay
            g["lr"] = cfg.lr * (1 - step / cfg.steps) ** 0.9
        net.train()
        logits = model(net.normalize(images.to(device)))
        loss = F.cross_entropy(logits, labels.long().to(device), ignore_index=label_set.ignore)
        seen = _mean_over_ranks(loss.detach(), ctx)
        if not torch.isfinite(seen):
            raise UserError(f"training loss became {seen.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(seen.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if (step + 1) % cfg.ckpt_every == 0 and ctx.rank == 0:
            _save_ckpt(ckpt, net, opt, step + 1)
    info: dict[str, Any] = {"kind": "source", "source": source_name,
                            "train": {**asdict(cfg), "final_loss": float(np.mean(losses[-50:])) if losses else None}}
    if ctx.world > 1:
        info["train"]["workers"] = ctx.world  # the global batch was workers × batch_size
    bank.mark_source(net)  # the trained statistics are the source set that adaptation keeps
    return save_version(bundle, net.cpu().eval(), info=info) if ctx.rank == 0 else None


def _replicate(net: SegModel, ctx: dist.Context) -> torch.nn.Module:
    """What a training step calls: DDP across torchrun's ranks, the network itself in one process.
    Plain DDP, not SyncBatchNorm: converting would swap our DomainNorm layers (BatchNorm2d with a
    bank of normalisation sets) for plain ones and drop the bank. So each rank normalises by its own
    batch, and DDP's default broadcast_buffers copies rank 0's buffers (running statistics, bank)
    to the others before every forward: the running statistics rank 0 saves are its own estimate
    (from its shard), not an average over the ranks."""
    if ctx.world == 1:
        return net
    return DistributedDataParallel(net, device_ids=[ctx.local_rank] if str(ctx.device).startswith("cuda") else None)


def _indices(n: int, step: int, cfg: TrainConfig, ctx: dist.Context, rng: np.random.Generator) -> np.ndarray:
    """The dataset indices of this step's batch. One process: drawn with replacement from the step's
    rng, as always. Under torchrun: the next `batch_size` places of this rank's run through
    DistributedSampler epochs (disjoint shards, reshuffled by set_epoch each epoch), located from the
    step alone so that a resumed run sees the same batches."""
    if ctx.world == 1:
        return rng.integers(0, n, cfg.batch_size)
    # the sampler reads only len() of its dataset: the indices are enough (torch annotates it Dataset)
    sampler: DistributedSampler[int] = DistributedSampler(range(n), num_replicas=ctx.world,  # type: ignore[arg-type]
                                                          rank=ctx.rank, seed=cfg.seed)
    per_epoch, first, last = len(sampler), step * cfg.batch_size, (step + 1) * cfg.batch_size
    out: list[int] = []
    for epoch in range(first // per_epoch, (last - 1) // per_epoch + 1):
        sampler.set_epoch(epoch)
        lo = epoch * per_epoch
        out += list(sampler)[max(first, lo) - lo: min(last, lo + per_epoch) - lo]
    return np.array(out)


def _mean_over_ranks(loss: torch.Tensor, ctx: dist.Context) -> torch.Tensor:
    """The loss averaged over ranks (itself in one process): one number for rank 0 to log, and a
    NaN on any rank reaches all of them, so all stop together instead of leaving the others
    waiting in DDP's gradient all-reduce."""
    if ctx.world == 1:
        return loss
    total = loss.clone()
    dist.all_reduce_([total])
    return total / ctx.world
