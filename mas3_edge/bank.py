"""The bank of normalisation sets, as a transform on any network's batch-norm layers.

`install_bank(module)` turns every BatchNorm2d of a network into a DomainNorm: batch norm that keeps
a bank of sets (the source model's, one per adapted domain) beside its working set. The first norm
layer the input reaches (the first in module order: the network contract, README "Adapt your own
model") routes each frame to the set whose statistics are nearest its own; every other layer
normalises the frame with that set. The network's convs and weights are untouched.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import UserError


class RouteState:
    """Shared by a network's DomainNorms for one forward pass: whether the first norm layer routes
    each frame (`active`), the route it chose, and whether a caller only wants that layer's input
    (`capture`: SegModel.stem stops the pass there)."""

    def __init__(self) -> None:
        self.active, self.capture = False, False
        self.route: torch.Tensor | None = None


class _Stem(Exception):
    """Raised by the first norm layer when SegModel.stem wants its input and nothing after it."""

    def __init__(self, h: torch.Tensor):
        super().__init__("stem reached")
        self.h = h


class DomainNorm(nn.BatchNorm2d):
    """Batch norm with a bank of sets beside its own. Its own set (running_mean/var, weight, bias)
    is the working set, the one training steps update; `bank` (S, 4, C) holds the mean, var, weight
    and bias of the source model (row 0) and of domains adapted before (rows 1..). In eval each
    frame is normalised with the set it was routed to (`state.route`: (B,) index into the bank's
    rows, then S for the working set), so adapting to a new domain costs neither the source nor the
    domains before it. The network's first norm layer (`lead`) makes that choice from the
    statistics of its own input, for the length of one forward pass (SegModel.using_route): a
    layer called on its own sees no route. Training (and no route) uses the working set."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(channels, eps=eps, momentum=momentum)
        zeros, ones = torch.zeros(channels), torch.ones(channels)
        self.register_buffer("bank", torch.stack([zeros, ones, ones, zeros])[None])
        self.state: RouteState | None = None  # set by install_bank: shared by the network's norms
        self.lead = False
        self.post: nn.Module | None = None  # what a replaced BatchNormAct2d ran after its norm

    def working(self) -> torch.Tensor:
        return torch.stack([self.running_mean, self.running_var, self.weight, self.bias])  # (4, C)

    def sets(self) -> torch.Tensor:
        """(S + 1, 4, C): the bank's rows, then the working set."""
        return torch.cat([self.bank, self.working()[None]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.normalise(x)
        return y if self.post is None else self.post(y)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if self.lead and st is not None:
            if st.capture:
                raise _Stem(x)
            if st.active and not self.training:
                st.route = self.choose(x)
        route = None if st is None else st.route
        if self.training or route is None:
            return super().forward(x)
        mean, var, weight, bias = self.sets().unbind(1)  # each (S + 1, C)
        scale = weight * torch.rsqrt(var + self.eps)
        shift = bias - mean * scale
        return torch.addcmul(shift[route][:, :, None, None], x, scale[route][:, :, None, None])

    def input_stats(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame channel mean and variance (B, C) of this layer's input h (B, C, H, W)."""
        m = h.mean((2, 3))
        return m, ((h - m[:, :, None, None]) ** 2).mean((2, 3)) + self.eps

    def distances(self, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Gaussian KL of channel statistics (B, C) to each of this layer's sets: (B, S + 1)."""
        sets = self.sets()
        return gaussian_kl(m, v, sets[:, 0], sets[:, 1] + self.eps)

    def choose(self, h: torch.Tensor) -> torch.Tensor:
        """(B,) the set whose statistics are nearest each frame's (the route)."""
        with torch.no_grad():
            return self.distances(*self.input_stats(h)).argmin(1)

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


def _replaceable(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d or (type(m).__name__ == "BatchNormAct2d" and isinstance(m, nn.BatchNorm2d)
                                         and isinstance(getattr(m, "act", None), nn.Module)
                                         and isinstance(getattr(m, "drop", None), nn.Module))


@torch.no_grad()
def install_bank(module: nn.Module, name: str = "the network") -> list[DomainNorm]:
    """Replace every BatchNorm2d in `module` with a DomainNorm holding the same statistics and
    affine parameters (one set: the source), link them to one RouteState and make the first the
    router. Returns the norms in module order. UserError when `module` has no BatchNorm2d.

    Plain BatchNorm2d and timm's BatchNormAct2d (its dropout and activation run after the norm) are
    replaced; another subclass may do more in its forward, so it stays as it is, outside the bank,
    with a warning."""
    others = [type(m).__name__ for m in module.modules()
              if isinstance(m, nn.BatchNorm2d) and not (_replaceable(m) or isinstance(m, DomainNorm))]
    if others:
        warnings.warn(f"{name}: {len(others)} batch-norm layers of type {sorted(set(others))} are not plain "
                      "BatchNorm2d; they keep their statistics and are not adapted")
    for parent in list(module.modules()):
        for child_name, child in parent.named_children():
            if _replaceable(child):
                if not child.affine or not child.track_running_stats:
                    raise UserError(f"{name}: batch norm {child_name!r} has no affine parameters or no running "
                                    "statistics; mas3-edge adapts BatchNorm2d(affine=True, track_running_stats=True)")
                dn = DomainNorm(child.num_features, child.eps, child.momentum).to(child.weight.device)
                if type(child) is not nn.BatchNorm2d:
                    dn.post = nn.Sequential(child.drop, child.act)
                dn.load_state_dict(child.state_dict(), strict=False)
                dn.mark_source()
                setattr(parent, child_name, dn)
    norms = [m for m in module.modules() if isinstance(m, DomainNorm)]
    if not norms:
        raise UserError(f"{name} has no batch-norm layer: mas3-edge adapts a network through its BatchNorm2d "
                        "layers (their statistics and affine parameters) and cannot adapt this one")
    state = RouteState()
    for i, m in enumerate(norms):
        m.state, m.lead = state, i == 0
    return norms
