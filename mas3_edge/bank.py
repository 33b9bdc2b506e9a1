"""The bank of normalisation sets, as a transform on any network's batch-norm layers, and the one
API to it.

`install_bank(module)` turns every BatchNorm2d of a network into a DomainNorm: batch norm that keeps
a bank of sets (the source model's, one per adapted domain) beside its working set. The first norm
layer the input reaches (the first in module order: the network contract, docs/own-model.md)
routes each frame to the set whose statistics are nearest its own; every other layer normalises the
frame with that set. The network's convs and weights are untouched.

The functions below the layer are the bank's API, on a whole network: `select` (the set a round
adapts), `route`, `reset_affine`, `reset_statistics`, `source_path`, `one_set`, `add_set`,
`drop_set`, `count`, `mark_source` (each also moves the fused classifier's per-set class means,
`banked`), `ChunkDomain` (would a chunk route to a set made elsewhere?), and `export_set` /
`import_set` (one set by layer name: what
a fleet shares). Nothing outside this file touches the sets' tensors.
"""
from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeGuard, TypeVar

import numpy as np
import torch
from torch import nn

from .config import AdaptConfig
from .errors import UserError
from .torchutil import to_device

if TYPE_CHECKING:  # model.py builds on this file: the network's type, for the annotations only
    from .model import SegModel

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)


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


class BankedRows:
    """The set operations of a layer that keeps one row per normalisation set: `bank` (S, ...) holds
    the source's row (0) and the adapted domains' (1..), `working()` / `set_working()` the working
    set's. DomainNorm keeps its statistics and affine parameters so; the fused classifier
    (gmmhead.GmmHead) its class means, so that they follow every change of the sets."""

    bank: torch.Tensor

    def working(self) -> torch.Tensor:
        raise NotImplementedError

    def set_working(self, row: torch.Tensor) -> None:
        raise NotImplementedError

    def sets(self) -> torch.Tensor:
        """(S + 1, ...): the bank's rows, then the working set."""
        return torch.cat([self.bank, self.working()[None]])

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
    def mark_source(self) -> None:
        """One set: the working set becomes the source row, and the bank holds nothing else."""
        self.bank = self.working()[None].clone()


class DomainNorm(BankedRows, nn.BatchNorm2d):
    """Batch norm with a bank of sets beside its own. Its own set (running_mean/var, weight, bias)
    is the working set, the one training steps update; `bank` (S, 4, C) holds the mean, var, weight
    and bias of the source model (row 0) and of domains adapted before (rows 1..). In eval each
    frame is normalised with the set it was routed to (`state.route`: (B,) index into the bank's
    rows, then S for the working set), so adapting to a new domain costs neither the source nor the
    domains before it. The network's first norm layer (`lead`) makes that choice from the
    statistics of its own input, for the length of one forward pass (SegModel.using_route): a
    layer called on its own sees no route. Training (and no route) uses the working set."""

    bank: torch.Tensor  # (S, 4, C), a buffer
    running_mean: torch.Tensor  # always tracked (BatchNorm2d's are None without track_running_stats)
    running_var: torch.Tensor

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(channels, eps=eps, momentum=momentum)
        zeros, ones = torch.zeros(channels), torch.ones(channels)
        self.register_buffer("bank", torch.stack([zeros, ones, ones, zeros])[None])
        self.state: RouteState | None = None  # set by install_bank: shared by the network's norms
        self.lead = False
        self.post: nn.Module | None = None  # what a replaced BatchNormAct2d ran after its norm

    def working(self) -> torch.Tensor:
        return torch.stack([self.running_mean, self.running_var, self.weight, self.bias])  # (4, C)

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
    def set_working(self, row: torch.Tensor) -> None:
        """Copy a (4, C) set into the working set."""
        for field, value in zip((self.running_mean, self.running_var, self.weight, self.bias), row):
            field.copy_(value)

    def routed(self) -> bool:
        """Whether any banked set differs from the working set; otherwise it folds like plain batch norm."""
        return not all(torch.equal(row, self.working()) for row in self.bank)


def gaussian_kl(m: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(m, v) || N(mu, var)) per channel, summed: (B, C) against (S, C) -> (B, S)."""
    m, v = m[:, None], v[:, None]
    return 0.5 * (v / var + (m - mu) ** 2 / var - 1 + torch.log(var / v)).sum(-1)


def _replaceable(m: nn.Module) -> TypeGuard[nn.BatchNorm2d]:
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
                      "BatchNorm2d; they keep their statistics and are not adapted", stacklevel=2)
    for parent in list(module.modules()):
        for child_name, child in parent.named_children():
            if _replaceable(child):
                if not child.affine or not child.track_running_stats:
                    raise UserError(f"{name}: batch norm {child_name!r} has no affine parameters or no running "
                                    "statistics; mas3-edge adapts BatchNorm2d(affine=True, track_running_stats=True)")
                dn = DomainNorm(child.num_features, child.eps, child.momentum).to(child.weight.device)
                if type(child) is not nn.BatchNorm2d:
                    drop, act = child.get_submodule("drop"), child.get_submodule("act")  # _replaceable checked both
                    dn.post = nn.Sequential(drop, act)
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


# --- the bank's API, on a network whose batch norms install_bank replaced

def norms(net: nn.Module) -> list[DomainNorm]:
    return [m for m in net.modules() if isinstance(m, DomainNorm)]


def lead(net: nn.Module) -> DomainNorm | None:
    """The router: the first norm layer, or None once it was folded into its conv."""
    return next((m for m in norms(net) if m.lead), None)


def _router(net: nn.Module) -> DomainNorm:
    """lead(net), for the functions below that need a network whose bank is installed and unfolded."""
    first = lead(net)
    if first is None:
        raise ValueError("the network has no router: install_bank was not run on it, or its first norm was folded")
    return first


def count(net: nn.Module) -> int:
    """Sets of the network: the bank's rows and the working set."""
    return len(_router(net).sets())


def routed(net: nn.Module) -> bool:
    """Whether any layer holds sets that differ (otherwise the network folds like plain batch norm)."""
    return any(m.routed() for m in norms(net))


@contextmanager
def using_route(net: nn.Module, active: bool, capture: bool = False):
    """The first norm layer routes each frame inside the block (`active`); after it every norm
    uses its working set again: a route belongs to one batch and must not outlive its pass."""
    first = lead(net)
    state = first.state if first is not None else RouteState()
    assert state is not None, "install_bank gives the router its RouteState"
    state.active, state.capture, state.route = active, capture, None
    try:
        yield
    finally:
        state.active, state.capture, state.route = False, False, None


def current_route(net: nn.Module) -> torch.Tensor | None:
    """Inside `using_route`, after the first norm layer ran: each frame's set (B,), or None."""
    first = lead(net)
    return None if first is None or first.state is None else first.state.route


def banked(net: nn.Module) -> list:
    """Every layer that keeps one row per set: the norms, and the fused classifier's class means
    (model.SegModel.gmm) when the network has one, so its rows follow every change of the sets."""
    head = getattr(net, "gmm", None)
    return [*norms(net), *([head] if head is not None else [])]


def capture_stem(net: nn.Module, features, x: torch.Tensor) -> torch.Tensor | None:
    """Run `features(x)` up to the first norm layer and return that layer's input (None: never reached)."""
    try:
        with using_route(net, False, capture=True):
            features(x)
    except _Stem as stop:
        return stop.h
    return None


@torch.no_grad()
def stem_stats(net: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame channel mean and variance (B, C) of the first norm layer's input h."""
    return _router(net).input_stats(h)


def distances(net: nn.Module, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Gaussian KL of channel statistics (B, C) to each set of the first norm layer: (B, S + 1)."""
    return _router(net).distances(m, v)


@torch.no_grad()
def route(net: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """Per frame, the set (index into `sets()`) nearest the statistics of the stem output `h`: (B,).
    None (the working set everywhere) when the first norm was folded: it had one set."""
    first = lead(net)
    return None if first is None else first.choose(h)


@torch.no_grad()
def activate(net: nn.Module, row: int | None, keep: int) -> None:
    """Make bank row `row` (None: a fresh copy of the source row) the working set in every layer. The
    working set is banked only if it was adapted (differs from the source row somewhere), the same in
    every layer; past `keep` adapted sets the least recently used is dropped."""
    layers = banked(net)
    adapted = any(not torch.equal(m.bank[0], m.working()) for m in layers)
    for m in layers:
        m.activate(row, adapted, keep)


def add_set(net: nn.Module, keep: int) -> None:
    """Start a new set from the source's (the adapted working set is banked)."""
    activate(net, None, keep)


@torch.no_grad()
def drop_set(net: nn.Module, row: int) -> None:
    """Remove banked adapted set `row` (1..S-1) from every layer."""
    rows = len(_router(net).bank)
    if not 1 <= row < rows:
        raise UserError(f"no adapted normalisation set {row} to drop (the bank has {rows - 1})")
    for m in banked(net):
        m.bank = torch.cat([m.bank[:row], m.bank[row + 1:]])


@torch.no_grad()
def export_set(net: nn.Module, s: int = -1) -> dict[str, torch.Tensor]:
    """Set `s` of every layer (default: the working set, the one a round adapted), by layer name in
    module order (the router first): (4, C) each, mean, var, weight and bias, float32 on the CPU."""
    return {name: m.sets()[s].detach().float().cpu().clone()
            for name, m in net.named_modules() if isinstance(m, DomainNorm)}


@torch.no_grad()
def import_set(net: nn.Module, rows: dict[str, torch.Tensor], keep: int) -> None:
    """Add a set made elsewhere (`export_set` of a network of the same lineage) as the working set:
    the working set before it is banked if it was adapted, past `keep` adapted sets the least
    recently used is dropped. UserError when the layers or their widths differ."""
    layers = {name: m for name, m in net.named_modules() if isinstance(m, DomainNorm)}
    if list(rows) != list(layers):
        raise UserError(f"the set names {len(rows)} norm layers, the network has {len(layers)} others")
    bad = next((n for n, m in layers.items() if tuple(rows[n].shape) != (4, m.num_features)), None)
    if bad is not None:
        raise UserError(f"the set's layer {bad} is {tuple(rows[bad].shape)}, the network's {(4, layers[bad].num_features)}")
    add_set(net, keep)
    for name, m in layers.items():
        m.set_working(rows[name].to(m.weight))


@torch.no_grad()
def chunk_stats(net: SegModel, frames: np.ndarray, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, var, spread) of a chunk as the router sees it: its frames' stem statistics pooled,
    (1, C) each, and the median Gaussian KL of its frames around that pool."""
    net.eval()
    stats = [stem_stats(net, net.stem(to_device(frames[i:i + batch_size], net)))
             for i in range(0, len(frames), batch_size)]
    m, v = (torch.cat(t) for t in zip(*stats))  # (N, C) each
    mu = m.mean(0, keepdim=True)
    var = (v + m ** 2).mean(0, keepdim=True) - mu ** 2  # the chunk pooled: (1, C)
    return mu, var, float(gaussian_kl(m, v, mu, var).median())


def of_domain(dist: float, nearest_other: float, spread: float, same_domain: float) -> bool:
    """The bank's test that a chunk is of a set's domain: that set (at Gaussian KL `dist` from the
    chunk's pool) is nearer than the source set and every other set it is weighed against
    (`nearest_other`), and no farther than `same_domain` times the chunk's own spread."""
    return dist < nearest_other and dist <= same_domain * spread


@torch.no_grad()
def select(net: SegModel, frames: np.ndarray, keep: int, same_domain: float = AdaptConfig.same_domain,
           batch_size: int = 8) -> str:
    """Before a round that keeps the source set: make the set of this chunk's domain the working
    set, or start a new one from the source's. The chunk's pooled stem statistics are compared
    (Gaussian KL) with every set's: it is of the nearest adapted set's domain unless the source set
    is nearer still, or that set is farther than `same_domain` times the spread of the chunk's own
    frames around their pool (`of_domain`). Returns which it chose ("working", "banked N" or "new")."""
    mu, var, spread = chunk_stats(net, frames, batch_size)
    dist = distances(net, mu, var)[0]  # (S + 1,): source, banked adapted sets, the working set
    row: int | None = int(dist[1:].argmin()) + 1
    log.info("set distances %s, spread %.4f", [round(float(d), 4) for d in dist], spread)
    if not of_domain(float(dist[row]), float(dist[0]), spread, same_domain):
        row = None
    activate(net, row, keep)
    return "new" if row is None else "working" if row == len(dist) - 1 else f"banked {row}"


class ChunkDomain:
    """What the router makes of a chunk of frames, against the sets a network holds: enough to
    tell, from a set's router key alone (its first layer's mean and var), whether the chunk would
    route to that set were it added to the bank (`route_distance`)."""

    @torch.no_grad()
    def __init__(self, net: SegModel, frames: np.ndarray):
        self.mean, self.var, self.spread = chunk_stats(net, frames)
        self.eps = _router(net).eps
        self.nearest = float(distances(net, self.mean, self.var)[0].min())  # the source set's included

    @torch.no_grad()
    def route_distance(self, key_mean: np.ndarray, key_var: np.ndarray, same_domain: float) -> float | None:
        """The Gaussian KL from the chunk to a set with this router key when the chunk is of that set's
        domain by `select`'s test (the set nearer than every set held, and within `same_domain` times
        the chunk's spread); None otherwise."""
        mean, var = (torch.as_tensor(np.array(a, np.float32)).to(self.mean)[None] for a in (key_mean, key_var))
        if mean.shape != self.mean.shape or var.shape != self.var.shape:
            return None  # not this network's router: the judgement would refuse it anyway
        dist = float(gaussian_kl(self.mean, self.var, mean, var + self.eps)[0, 0])
        return dist if of_domain(dist, self.nearest, self.spread, same_domain) else None


@torch.no_grad()
def reset_affine(net: nn.Module) -> None:
    """The working set's affine parameters := the source's (its statistics stay): a refining
    round's steps then replace the last round's instead of adding to them."""
    for m in norms(net):
        m.weight.copy_(m.bank[0, 2]), m.bias.copy_(m.bank[0, 3])


@torch.no_grad()
def reset_statistics(net: nn.Module) -> None:
    """The working set's statistics := the source model's (kept in every layer along the lineage)."""
    for m in norms(net):
        m.running_mean.copy_(m.bank[0, 0]), m.running_var.copy_(m.bank[0, 1])


def mark_source(net: nn.Module) -> None:
    """One set: the current working set becomes the source set (a freshly trained or imported
    model, or a one-set baseline's round)."""
    for m in banked(net):
        m.mark_source()


@torch.no_grad()
def one_set(net: M, s: int) -> M:
    """A copy of `net` whose every layer holds set `s` of its sets() and nothing else."""
    net = copy.deepcopy(net)
    for m in banked(net):
        m.set_working(m.sets()[s])
        m.mark_source()
    return net


def source_path(net: M) -> M:
    """The network as it segments the source domain: its source set alone, in eval mode."""
    return one_set(net, 0).eval()


def size_banks(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Size each layer's bank as the weight file's, so that load_state_dict fits. A file of plain
    batch norms (no bank: the packaged bundle, a network's own weights) holds one set, its own."""
    state = dict(state)
    head = getattr(net, "gmm", None)
    if head is not None and "gmm.bank" in state:
        head.bank = torch.empty_like(state["gmm.bank"])
    for name, m in net.named_modules():
        if isinstance(m, DomainNorm):
            key, own = f"{name}.bank", [f"{name}.{k}" for k in ("running_mean", "running_var", "weight", "bias")]
            if key not in state and all(k in state for k in own):
                state[key] = torch.stack([state[k] for k in own])[None]
            if key in state:
                m.bank = torch.empty_like(state[key])
    return state


def check_router(net: nn.Module, features, x: torch.Tensor, name: str) -> None:
    """The router rule: the first norm layer in module order must be the first one the input
    reaches, or every frame would be routed on a layer's input that depends on the set chosen."""
    layers, seen, training = norms(net), [], net.training
    hooks = [m.register_forward_pre_hook(lambda mod, _args: seen.append(mod)) for m in layers]
    try:
        with torch.no_grad(), using_route(net, False):
            features(x.to(layers[0].weight.device)) if net.eval() else None
    finally:
        net.train(training)
        for h in hooks:
            h.remove()
    if seen and seen[0] is not layers[0]:
        names = {id(m): n for n, m in net.named_modules()}
        raise UserError(f"{name}: its first batch norm in module order ({names[id(layers[0])]}) is not the first the "
                        f"input reaches ({names[id(seen[0])]}); declare the layers in the order they run, so "
                        "that the first one can route each frame")
