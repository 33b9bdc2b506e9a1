"""The segmentation network f = h ∘ ψ ∘ φ, split as the paper splits it.

φ (encoder): MobileNetV2-style inverted residuals, output stride 8 (the last stages dilate
instead of striding). ψ (decoder): a light ASPP that ends in a linear 1×1 conv to the
embedding z ∈ R^D. h (head): a 1×1 conv D → K. Only conv, batch norm, ReLU6, global average
pool and bilinear resize are used, so the graph exports to ONNX and TensorRT as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import UserError


def _ch(c: float, mult: float) -> int:
    return max(8, int(round(c * mult / 8)) * 8)


class DomainNorm(nn.BatchNorm2d):
    """Batch norm that keeps two sets: the source model's statistics and affine parameters
    (source_*) and the adapted ones (running_mean/var, weight, bias). In eval each frame is
    normalised with the set SegNet routed it to (`route`: (B, 1, 1, 1), 1 = adapted), so adapting
    to a new domain does not cost the old one. Training (and route None) uses the adapted set."""

    SETS = (("source_mean", "running_mean"), ("source_var", "running_var"), ("source_weight", "weight"),
            ("source_bias", "bias"))

    def __init__(self, channels: int):
        super().__init__(channels)
        for src, _ in self.SETS:
            self.register_buffer(src, torch.ones(channels) if src in ("source_var", "source_weight")
                                 else torch.zeros(channels))
        self.route: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.route is None:
            return super().forward(x)
        (s_scale, s_shift), (a_scale, a_shift) = (self._affine(*(getattr(self, pair[i]) for pair in self.SETS))
                                                   for i in (0, 1))  # each (C,): source, adapted
        w, view = self.route, (1, -1, 1, 1)  # w is 0 or 1, so the blend is exact
        scale = s_scale.view(view) * (1 - w) + a_scale.view(view) * w  # (B, C, 1, 1): the frame's set
        shift = s_shift.view(view) * (1 - w) + a_shift.view(view) * w
        return torch.addcmul(shift, x, scale)

    def _affine(self, mean, var, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
        scale = weight * torch.rsqrt(var + self.eps)
        return scale, bias - mean * scale

    @torch.no_grad()
    def mark_source(self) -> None:
        for s, a in self.SETS:
            getattr(self, s).copy_(getattr(self, a))

    def routed(self) -> bool:
        """Whether the two sets differ (an adapted model); equal sets fold like plain batch norm."""
        return not all(torch.equal(getattr(self, s), getattr(self, a)) for s, a in self.SETS)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class SegNet(nn.Module):
    """f = h ∘ ψ ∘ φ. `forward` returns logits at input size; `embed` returns z at stride 8."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.width_mult, config.depth, config.expansion)
        self.decoder = Decoder(self.encoder.out_channels, config.aspp_channels, config.embed_dim)
        self.head = nn.Conv2d(config.embed_dim, config.num_classes, 1)
        self.routing = True  # per-frame choice of normalisation statistics in eval (off while adapting)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255, persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB -> normalised float (B, 3, H, W)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"expected images of shape (B, H, W, 3), got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> z (B, D, H/8, W/8)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % 8 or x.shape[3] % 8:
            raise UserError(f"expected input (B, 3, H, W) with H and W multiples of 8, got {tuple(x.shape)}")
        stem, rest = self.encoder.layers[0], self.encoder.layers[1:]
        h = stem[0](x)  # the stem conv, run once: its output also routes the frame
        route = self.route(h) if self.routing and not self.training else None
        for m in self.modules():
            if isinstance(m, DomainNorm):
                m.route = route
        return self.decoder(rest(stem[1:](h)))

    @torch.no_grad()
    def route(self, h: torch.Tensor) -> torch.Tensor | None:
        """Per frame, 1 if the stem conv's output `h` (B, C, H/2, W/2) has channel statistics at
        least as close (Gaussian KL) to the adapted set as to the source set, else 0: (B, 1, 1, 1).
        None (the adapted set everywhere) when the stem was folded for inference: its sets were equal."""
        bn = self.encoder.layers[0][1]
        if not isinstance(bn, DomainNorm):
            return None
        m = h.mean((2, 3))
        v = ((h - m[:, :, None, None]) ** 2).mean((2, 3)) + bn.eps

        def kl(mu, var):  # KL(N(m, v) || N(mu, var)), summed over channels
            var = var + bn.eps
            return 0.5 * (v / var + (m - mu) ** 2 / var - 1 + torch.log(var / v)).sum(1)
        adapted = kl(bn.running_mean, bn.running_var) <= kl(bn.source_mean, bn.source_var)
        return adapted.to(h.dtype).view(-1, 1, 1, 1)

    def mark_source(self) -> None:
        """Make the current statistics the source set (a freshly trained model)."""
        for m in self.modules():
            if isinstance(m, DomainNorm):
                m.mark_source()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """load_state_dict, accepting files written before DomainNorm (no source set: it is the current one)."""
        renames = {f".{src}": f".{adapted}" for src, adapted in DomainNorm.SETS}
        for key in self.state_dict():
            suffix = "." + key.rsplit(".", 1)[-1]
            old = key[: -len(suffix)] + renames.get(suffix, suffix)
            if suffix in renames and key not in state and old in state:
                state = {**state, key: state[old]}
        self.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> logits (B, K, H, W)."""
        logits = self.head(self.embed(x))  # (B, K, H/8, W/8)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class Deployed(nn.Module):
    """What the runtime runs: uint8 RGB (B, H, W, 3) -> class ids uint8 (B, H, W), confidence (B, H, W).

    Normalisation, argmax and max-softmax live inside the graph, so the caller does no per-pixel work.
    With `with_embedding` the stride-8 embedding (B, D, H/8, W/8) is returned too (drift monitoring).
    """

    def __init__(self, net: SegNet, with_embedding: bool = False):
        super().__init__()
        self.net = net
        self.with_embedding = with_embedding

    def forward(self, images: torch.Tensor):
        z = self.net.embed(self.net.normalize(images))
        logits = F.interpolate(self.net.head(z), size=images.shape[1:3], mode="bilinear", align_corners=False)
        conf, classes = torch.softmax(logits, dim=1).max(dim=1)
        outputs = (classes.to(torch.uint8), conf)
        return outputs + (z,) if self.with_embedding else outputs


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Inference only: fold every conv → batch-norm pair into the conv (weight and bias), in place;
    a DomainNorm with two different sets stays (it picks per frame).

    One pass over each activation fewer, the same function (the BN statistics are frozen in eval).
    """
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) \
                    and not (isinstance(bn, DomainNorm) and bn.routed()):  # two sets: per-frame, cannot fold
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
                seq[i + 1] = nn.Identity()
    return module

