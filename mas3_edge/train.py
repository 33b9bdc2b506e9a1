"""Source training (paper Eq. 1): pixel-wise cross-entropy, ignore 255, Adam, scale/crop/flip.

Seeded and resumable: a checkpoint (weights + Adam state as safetensors, step and RNG seed as
JSON) is written atomically every `ckpt_every` steps; `resume=True` continues from it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .bundle import atomic_write, atomic_write_json, save_version
from .config import ModelConfig
from .errors import UserError
from .labels import IGNORE
from .model import SegNet


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
    pairs = [augment(*dataset[int(i)], size, rng, scale) for i in idx]
    return torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs]))


def _save_ckpt(ckpt: Path, net: SegNet, opt: torch.optim.Optimizer, step: int) -> None:
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        tensors.update({f"adam.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    atomic_write(ckpt / "last.safetensors", safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write_json(ckpt / "last.json", {"step": step, "architecture": net.config.to_dict()})


def _load_ckpt(ckpt: Path, net: SegNet, opt: torch.optim.Optimizer) -> int:
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
          resume: bool = False, device: str = "cpu", source_name: str = "synthetic") -> Path:
    """Train on (image, label) pairs and write the first bundle version; returns its directory."""
    if len(dataset) == 0:
        raise UserError("the training set is empty")
    torch.manual_seed(cfg.seed)
    net = SegNet(model_cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = _load_ckpt(ckpt, net, opt) if resume and (ckpt / "last.json").exists() else 0
    losses = []
    bar = tqdm(range(start, cfg.steps), desc="train", initial=start, total=cfg.steps, leave=False)
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])  # per-step seed: a resumed run sees the same batches
        images, labels = _batch(dataset, rng.integers(0, len(dataset), cfg.batch_size),
                                model_cfg.input_size, rng, cfg.scale)
        for g in opt.param_groups:  # poly decay
            g["lr"] = cfg.lr * (1 - step / cfg.steps) ** 0.9
        net.train()
        logits = net(net.normalize(images.to(device)))
        loss = F.cross_entropy(logits, labels.long().to(device), ignore_index=IGNORE)
        if not torch.isfinite(loss):
            raise UserError(f"training loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if (step + 1) % cfg.ckpt_every == 0:
            _save_ckpt(ckpt, net, opt, step + 1)
    info = {"kind": "source", "source": source_name, "train": {**asdict(cfg), "final_loss": float(np.mean(losses[-50:])) if losses else None}}
    net.mark_source()  # the trained statistics are the source set that adaptation keeps
    return save_version(bundle, net.cpu().eval(), info=info)
