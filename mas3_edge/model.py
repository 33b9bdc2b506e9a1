"""The segmentation network f = h ∘ ψ ∘ φ, split as the paper splits it.

φ (encoder): MobileNetV2-style inverted residuals, output stride 8 (the last stages dilate
instead of striding). ψ (decoder): a light ASPP that ends in a linear 1×1 conv to the
embedding z ∈ R^D. h (head): a 1×1 conv D → K. Only conv, batch norm, ReLU6, global average
pool and bilinear resize are used, so the graph exports to ONNX and TensorRT as it is.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import UserError


def _ch(c: float, mult: float) -> int:
    return max(8, int(round(c * mult / 8)) * 8)


class DomainNorm(nn.BatchNorm2d):
    """Batch norm with a bank of sets beside its own. Its own set (running_mean/var, weight, bias)
    is the working set, the one training steps update; `bank` (S, 4, C) holds the mean, var, weight
    and bias of the source model (row 0) and of domains adapted before (rows 1..). In eval each
    frame is normalised with the set SegNet routed it to (`route`: (B,) index into the bank's rows,
    then S for the working set), so adapting to a new domain costs neither the source nor the
    domains before it. Training (and route None) uses the working set. `route` is set by
    SegNet.embed for the length of one forward pass only (`SegNet.using_route`): a layer called on its
    own sees None, never the route of an earlier batch."""

    def __init__(self, channels: int):
        super().__init__(channels)
        zeros, ones = torch.zeros(channels), torch.ones(channels)
        self.register_buffer("bank", torch.stack([zeros, ones, ones, zeros])[None])
        self.route: torch.Tensor | None = None

    def working(self) -> torch.Tensor:
        return torch.stack([self.running_mean, self.running_var, self.weight, self.bias])  # (4, C)

    def sets(self) -> torch.Tensor:
        """(S + 1, 4, C): the bank's rows, then the working set."""
        return torch.cat([self.bank, self.working()[None]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.route is None:
            return super().forward(x)
        mean, var, weight, bias = self.sets().unbind(1)  # each (S + 1, C)
        scale = weight * torch.rsqrt(var + self.eps)
        shift = bias - mean * scale
        return torch.addcmul(shift[self.route][:, :, None, None], x, scale[self.route][:, :, None, None])

    @torch.no_grad()
    def activate(self, row: int | None, bank_working: bool, keep: int) -> None:
        """Make bank row `row` (None: a fresh copy of the source row) the working set. The old
        working set is banked when `bank_working`; past `keep` adapted sets (working included)
        the least recently used is dropped."""
        if row == len(self.bank):  # the working set already
            return
        rows = list(self.bank) + ([self.working()] if bank_working else [])
        new = (rows[0] if row is None else rows.pop(row)).clone()
        rows = rows[:1] + rows[1:][max(0, len(rows) - keep):]
        self.bank = torch.stack(rows)
        self.set_working(new)

    @torch.no_grad()
    def set_working(self, row: torch.Tensor) -> None:
        """Copy a (4, C) set into the working set."""
        for field, value in zip((self.running_mean, self.running_var, self.weight, self.bias), row):
            field.copy_(value)

    @torch.no_grad()
    def mark_source(self) -> None:
        """One set: the working set becomes the source row, and the bank holds nothing else."""
        self.bank = self.working()[None].clone()

    def routed(self) -> bool:
        """Whether any banked set differs from the working set; otherwise it folds like plain batch norm."""
        return not all(torch.equal(row, self.working()) for row in self.bank)


def gaussian_kl(m: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(m, v) || N(mu, var)) per channel, summed: (B, C) against (S, C) -> (B, S)."""
    m, v = m[:, None], v[:, None]
    return 0.5 * (v / var + (m - mu) ** 2 / var - 1 + torch.log(var / v)).sum(-1)


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
        with self.using_route(route):
            return self.decoder(rest(stem[1:](h)))

    @contextmanager
    def using_route(self, route: torch.Tensor | None):
        """Every DomainNorm normalises with `route` (B,) inside the block, and with the working set
        after it: the route belongs to one batch, so it must not outlive that batch's forward pass."""
        norms = [m for m in self.modules() if isinstance(m, DomainNorm)]
        for m in norms:
            m.route = route
        try:
            yield
        finally:
            for m in norms:
                m.route = None

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> the stem conv's output h, whose statistics route each frame."""
        return self.encoder.layers[0][0](self.normalize(images))

    @torch.no_grad()
    def stem_stats(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame channel mean and variance (B, C) of the stem conv's output h (B, C, H/2, W/2)."""
        m = h.mean((2, 3))
        return m, ((h - m[:, :, None, None]) ** 2).mean((2, 3)) + self.encoder.layers[0][1].eps

    @torch.no_grad()
    def route(self, h: torch.Tensor) -> torch.Tensor | None:
        """Per frame, the set (index into the stem DomainNorm's `sets()`) whose statistics are
        closest (Gaussian KL) to the stem conv's output `h`: (B,). None (the working set everywhere)
        when the stem was folded for inference: it had one set."""
        if not isinstance(self.encoder.layers[0][1], DomainNorm):
            return None
        return self.set_distances(*self.stem_stats(h)).argmin(1)

    def set_distances(self, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Gaussian KL of channel statistics (B, C) to each set of the stem DomainNorm: (B, S + 1)."""
        bn = self.encoder.layers[0][1]
        sets = bn.sets()
        return gaussian_kl(m, v, sets[:, 0], sets[:, 1] + bn.eps)

    @torch.no_grad()
    def activate_set(self, row: int | None, keep: int) -> None:
        """Make one set the working set in every DomainNorm (`DomainNorm.activate`); the working set
        is banked only if it was adapted (differs from the source row somewhere), the same in every layer."""
        norms = [m for m in self.modules() if isinstance(m, DomainNorm)]
        adapted = any(not torch.equal(m.bank[0], m.working()) for m in norms)
        for m in norms:
            m.activate(row, adapted, keep)

    def mark_source(self) -> None:
        """Make the current statistics the source set (a freshly trained model)."""
        for m in self.modules():
            if isinstance(m, DomainNorm):
                m.mark_source()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """load_state_dict, sizing each bank as the file's, and accepting files written before the
        bank (a source set `source_*` beside the working one) or before DomainNorm (one set)."""
        state = dict(state)
        for name, m in self.named_modules():
            if isinstance(m, DomainNorm):
                key = f"{name}.bank"
                if key not in state:
                    working = [state[f"{name}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
                    source = [state.pop(f"{name}.source_{k}", w) for k, w in zip(("mean", "var", "weight", "bias"), working)]
                    state[key] = torch.stack(source)[None]
                m.bank = torch.empty_like(state[key])
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


class PerSetFolded(nn.Module):
    """Deployed for a model with several normalisation sets, at one-set speed: one copy of the
    network per set with that set folded into its convs, and each frame runs through the copy of
    the set the stem routes it to (`route`, the same choice as SegNet.embed). The outputs are
    Deployed(net)'s up to float rounding. Worth it where the per-frame blend is not fused: PyTorch
    eager runs a routed model several times slower than a folded one."""

    def __init__(self, net: SegNet):
        super().__init__()
        self.net = net.eval()
        self.copies = nn.ModuleList(Deployed(fold_batchnorm(_one_set(net, s))).eval()
                                    for s in range(len(net.encoder.layers[0][1].sets())))

    @torch.no_grad()
    def route(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> (B,) index of each frame's set."""
        return self.net.route(self.net.stem(images))

    def forward(self, images: torch.Tensor):
        route = self.route(images)
        sets = route.unique().tolist()
        if len(sets) == 1:
            return self.copies[sets[0]](images)
        outs = None
        for s in sets:  # a mixed batch: each set's frames through their copy, put back in order
            idx = (route == s).nonzero().squeeze(1)
            part = self.copies[s](images[idx])
            outs = outs or [p.new_empty((len(images), *p.shape[1:])) for p in part]
            for out, p in zip(outs, part):
                out[idx] = p
        return tuple(outs)


@torch.no_grad()
def _one_set(net: SegNet, s: int) -> SegNet:
    """A copy of `net` whose every DomainNorm holds set `s` of its sets() and nothing else."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, DomainNorm):
            m.set_working(m.sets()[s])
            m.mark_source()
    return net


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Inference only: fold every conv → batch-norm pair into the conv (weight and bias), in place;
    a DomainNorm whose sets differ stays (it picks per frame).

    One pass over each activation fewer, the same function (the BN statistics are frozen in eval).
    """
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) \
                    and not (isinstance(bn, DomainNorm) and bn.routed()):  # sets that differ: per-frame, cannot fold
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
                seq[i + 1] = nn.Identity()
    return module

