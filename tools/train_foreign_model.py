"""Stands in for a team's own training code (README "Adapt your own model"): a torchvision LR-ASPP
with the 19 Cityscapes classes, trained with plain PyTorch, no mas3-edge, on a folder of images/ +
labels/ (train ids), and saved as a state dict for `mas3-edge import`.

    mas3-edge data synth --domain synthetic --n 64 --height 128 --width 256 --out source
    python tools/train_foreign_model.py source lraspp.pth --steps 300
"""
from __future__ import annotations

import argparse
import glob

import cv2
import numpy as np
import torch
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def load(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in sorted(glob.glob(f"{folder}/images/*.png"))]
    labels = [cv2.imread(p, cv2.IMREAD_UNCHANGED) for p in sorted(glob.glob(f"{folder}/labels/*.png"))]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD, torch.from_numpy(np.stack(labels)).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data"), ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    x, y = load(args.data)
    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=19)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(args.steps):
        i = torch.randint(0, len(x), (8,))
        loss = torch.nn.functional.cross_entropy(model(x[i])["out"], y[i], ignore_index=255)
        opt.zero_grad(), loss.backward(), opt.step()
    # MobileNetV3's batch norms average with momentum 0.01: after a short run their statistics lag the
    # weights, so they are re-estimated over the data once (precise BN) before the weights are saved
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats(), setattr(m, "momentum", None)
        for i in range(0, len(x), 8):
            model(x[i:i + 8])
    torch.save(model.state_dict(), args.out)
    print(f"final loss {loss.item():.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
