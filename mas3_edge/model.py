"""The segmentation network f = h ∘ ψ ∘ φ, split as the paper splits it.

φ (encoder): MobileNetV2-style inverted residuals, output stride 8 (the last stages dilate
instead of striding). ψ (decoder): a light ASPP that ends in a linear 1×1 conv to the
embedding z ∈ R^D. h (head): a 1×1 conv D → K. Only conv, batch norm, ReLU6, global average
pool and bilinear resize are used, so the graph exports to ONNX and TensorRT as it is.
"""
from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from . import bank
from .bank import DomainNorm
from .errors import UserError
from .gmmhead import GmmHead
from .labels import CITYSCAPES, LabelSet

M = TypeVar("M", bound=nn.Module)


def _ch(c: float, mult: float) -> int:
    return max(8, int(round(c * mult / 8)) * 8)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    layers = [nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False), DomainNorm(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, dilation: int = 1):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, dilation, groups=hidden),
                   conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# (channels, stride, dilation) per stage — MobileNetV2 with the stride-16/32 stages dilated instead
_STAGES = ((16, 1, 1), (24, 2, 1), (32, 2, 1), (64, 1, 2), (96, 1, 4))


class Encoder(nn.Module):
    """φ: image (B, 3, H, W) -> features (B, C, H/8, W/8)."""

    def __init__(self, width_mult: float, depth: tuple[int, ...], expansion: int):
        super().__init__()
        cin = _ch(32, width_mult)
        layers: list[nn.Module] = [conv_bn(3, cin, 3, stride=2)]
        for stage, ((c, s, d), n) in enumerate(zip(_STAGES, depth)):
            t = 1 if stage == 0 else expansion
            cout = _ch(c, width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, d))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_channels = cin
        self.recompute = 0  # > 0: keep only this many segments' inputs for backward (steps.recomputing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, H/8, W/8)
        if self.recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint_sequential
            return checkpoint_sequential(self.layers, self.recompute, x, use_reentrant=False)
        return self.layers(x)


class Decoder(nn.Module):
    """ψ: light ASPP (1×1, two dilated depthwise-separable branches, image pooling) -> z (B, D, h, w)."""

    def __init__(self, cin: int, channels: int, embed_dim: int, rates: tuple[int, ...] = (3, 6)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(cin, channels, 1)] + [
            nn.Sequential(conv_bn(cin, cin, 3, dilation=r, groups=cin), conv_bn(cin, channels, 1))
            for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn(cin, channels, 1))
        n = len(rates) + 2
        self.project = nn.Sequential(conv_bn(n * channels, channels, 1),
                                     conv_bn(channels, channels, 3, groups=channels), conv_bn(channels, channels, 1))
        self.embed = nn.Conv2d(channels, embed_dim, 1)  # linear: z is modelled by Gaussians

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = self.pool(x).expand(-1, -1, h, w)  # broadcast instead of resize: cheaper, exports cleanly
        feats = [b(x) for b in self.branches] + [pooled]
        return self.embed(self.project(torch.cat(feats, dim=1)))


class SegModel(nn.Module):
    """The contract every network meets (README "Adapt your own model"): uint8 frames are normalised
    with the model's mean and std; `features` maps the normalised batch (B, 3, H, W) to the embedding
    z (B, D, h, w) (φ and ψ, with batch-norm layers); `head`, a 1×1 Conv2d D -> K, is the linear
    classifier h; logits are h(z) resized to the input. Subclasses build their layers, then call
    `finish()`, which installs the bank of normalisation sets on the batch-norm layers."""

    head: nn.Conv2d  # h, set by each subclass before finish()
    mean: torch.Tensor  # (1, 3, 1, 1) on 0..255 pixel values, a buffer
    std: torch.Tensor

    def __init__(self, config: ModelConfig, labels: LabelSet = CITYSCAPES):
        super().__init__()
        if labels.num_classes != config.num_classes:
            raise UserError(f"label set {labels.id!r} has {labels.num_classes} classes but the model has "
                            f"{config.num_classes} outputs")
        self.config, self.labels = config, labels
        self.routing = True  # per-frame choice of normalisation statistics in eval (off while adapting)
        self.gmm: GmmHead | None = None  # the prototypes' classifier fused with h (gmmhead.py), when enabled
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255, persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        if not isinstance(getattr(self, "head", None), nn.Conv2d) or self.head.kernel_size != (1, 1):
            raise UserError(f"{self.config.arch}: the classifier h must be a 1x1 Conv2d")
        bank.install_bank(self, self.config.arch)
        k = self.config.multiple
        side = k * -(-64 // k)  # a small input of the sizes the network takes
        bank.check_router(self, self.features, torch.zeros(1, 3, side, side), self.config.arch)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB -> normalised float (B, 3, H, W)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"expected images of shape (B, H, W, 3), got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> z (B, D, h, w), each frame normalised with its routed set in eval."""
        return self.embed_route(x)[0]

    def embed_route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embed, and the set each frame was routed to (B,), None when no frame was (the working set)."""
        k = self.config.multiple
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % k or x.shape[3] % k:
            raise UserError(f"expected input (B, 3, H, W) with H and W multiples of {k}, got {tuple(x.shape)}")
        with bank.using_route(self, self.routing and not self.training):
            return self.features(x), bank.current_route(self)

    def scores(self, z: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """What the served model upsamples and takes the softmax of, at z's resolution (B, K, h, w):
        h(z), or with the fused classifier log((1 - w) softmax(h(z)) + w p_gmm), whose softmax after
        upsampling is the fused probability (the log-softmax only subtracts a per-pixel constant)."""
        logits = self.head(z)
        return logits if self.gmm is None else self.gmm.fuse(logits, z, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> logits (B, K, H, W); in eval, the served model's scores (the
        fused classifier's when there is one), so every evaluation scores what is served."""
        if self.training or self.gmm is None:
            return self.upsample(self.head(self.embed(x)), x.shape[-2:])  # (B, K, h, w) -> (B, K, H, W)
        return self.upsample(self.scores(*self.embed_route(x)), x.shape[-2:])

    def upsample(self, logits: torch.Tensor, size) -> torch.Tensor:
        """Logits at z's resolution -> at the input's (bilinear, as the network was trained)."""
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> the input h of the first norm layer, whose statistics route each frame
        (the network runs only up to that layer)."""
        h = bank.capture_stem(self, self.features, self.normalize(images))
        if h is None:
            raise UserError(f"{self.config.arch}: the input never reached its first batch-norm layer")
        return h

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """load_state_dict, sizing each bank of normalisation sets as the file's; a file that holds
        the fused classifier's tensors gets the head (a file without them, none)."""
        self.gmm = GmmHead.sized_as(state).to(self.head.weight.device) if "gmm.scale" in state else None
        self.load_state_dict(bank.size_banks(self, state))


class SegNet(SegModel):
    """The built-in network (presets tiny and edge): φ encoder, ψ light ASPP, z at stride 8."""

    def __init__(self, config: ModelConfig, labels: LabelSet = CITYSCAPES):
        super().__init__(config, labels)
        self.encoder = Encoder(config.width_mult, config.depth, config.expansion)
        self.decoder = Decoder(self.encoder.out_channels, config.aspp_channels, config.embed_dim)
        self.head = nn.Conv2d(config.embed_dim, config.num_classes, 1)
        self.finish()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Deployed(nn.Module):
    """What the runtime runs: uint8 RGB (B, H, W, 3) -> class ids uint8 (B, H, W), confidence (B, H, W).

    Normalisation, argmax and max-softmax live inside the graph, so the caller does no per-pixel work;
    so does the fused prototypes' classifier when the network has one (SegModel.scores).
    """

    def __init__(self, net: SegModel):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor):
        z, route = self.net.embed_route(self.net.normalize(images))
        logits = self.net.upsample(self.net.scores(z, route), images.shape[1:3])
        conf, classes = torch.softmax(logits, dim=1).max(dim=1)
        return classes.to(torch.uint8), conf


class PerSetFolded(nn.Module):
    """Deployed for a model with several normalisation sets, at one-set speed: one copy of the
    network per set with that set folded into its convs, and each frame runs through the copy of
    the set the stem routes it to (`route`, the same choice as SegNet.embed). The outputs are
    Deployed(net)'s up to float rounding. Worth it where the per-frame blend is not fused: PyTorch
    eager runs a routed model several times slower than a folded one."""

    def __init__(self, net: SegModel):
        super().__init__()
        self.net = net.eval()
        self.copies = nn.ModuleList(Deployed(fold_batchnorm(bank.one_set(net, s))).eval()
                                    for s in range(bank.count(net)))

    @torch.no_grad()
    def route(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> (B,) index of each frame's set."""
        route = bank.route(self.net, self.net.stem(images))
        assert route is not None, "self.net keeps its router: only the copies are folded"
        return route

    def forward(self, images: torch.Tensor):
        route = self.route(images)
        sets = route.unique().tolist()
        if len(sets) == 1:
            return self.copies[sets[0]](images)
        outs: list[torch.Tensor] | None = None
        for s in sets:  # a mixed batch: each set's frames through their copy, put back in order
            idx = (route == s).nonzero().squeeze(1)
            part = self.copies[s](images[idx])
            outs = outs or [p.new_empty((len(images), *p.shape[1:])) for p in part]
            for out, p in zip(outs, part):
                out[idx] = p
        assert outs is not None, "two sets or more: the loop ran"
        return tuple(outs)


@torch.no_grad()
def fold_batchnorm(module: M) -> M:
    """Inference only: fold every conv → batch-norm pair into the conv (weight and bias), in place;
    a DomainNorm whose sets differ stays (it picks per frame).

    One pass over each activation fewer, the same function (the BN statistics are frozen in eval).
    """
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) \
                    and not (isinstance(bn, DomainNorm) and bn.routed()):  # sets that differ: per-frame, cannot fold
                assert bn.running_mean is not None and bn.running_var is not None, "folding needs running statistics"
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
                seq[i + 1] = getattr(bn, "post", None) or nn.Identity()  # a BatchNormAct2d keeps its activation
    return module

