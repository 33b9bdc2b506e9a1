"""torchrun support for the factory commands (train, prototypes): one process per GPU (NCCL) or
per CPU worker (gloo).

Everything here reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). Without them
(WORLD_SIZE unset or 1) no process group is made and every helper is a no-op, so a plain process
runs exactly as it did before torchrun was supported.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import UserError


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank of world, and the device it computes on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str | torch.device = "cpu"


def _env(name: str) -> int:
    return int(os.environ.get(name, "1" if name == "WORLD_SIZE" else "0"))


def _joined() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init(device: str | torch.device = "cpu") -> Context:
    """Join torchrun's process group and pick this rank's device. The backend follows the device
    asked for: NCCL with cuda:LOCAL_RANK for a CUDA one, gloo on the CPU (so `--device cpu` on a
    GPU machine still works). One process: no group, and `device` exactly as given."""
    world = _env("WORLD_SIZE")
    if world <= 1:
        return Context(device=device)
    rank, local = _env("RANK"), _env("LOCAL_RANK")
    cuda = str(device).startswith("cuda")
    if cuda and local >= torch.cuda.device_count():
        raise UserError(f"torchrun started local rank {local} but this machine has "
                        f"{torch.cuda.device_count()} CUDA GPUs; lower --nproc_per_node or use --device cpu")
    if cuda:
        torch.cuda.set_device(local)  # before the group: NCCL binds each rank to the current device
    if not _joined():
        tdist.init_process_group("nccl" if cuda else "gloo")  # env://: MASTER_ADDR/PORT from torchrun
    return Context(rank, world, local, f"cuda:{local}" if cuda else "cpu")


@contextmanager
def session(device: str | torch.device = "cpu") -> Iterator[Context]:
    """init() for the length of a with-block; destroys the group only if it made it (a caller that
    joined one itself keeps it)."""
    made = _env("WORLD_SIZE") > 1 and not _joined()
    ctx = init(device)
    try:
        yield ctx
    finally:
        if made:
            cleanup()


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and reports. Read from the
    environment once the group is gone, so a command can ask after its work has finished."""
    return tdist.get_rank() == 0 if _joined() else _env("RANK") == 0


def shard(n: int, ctx: Context) -> range:
    """The items of 0..n-1 that this rank visits: every world-th one, from its rank."""
    return range(ctx.rank, n, ctx.world)


def all_reduce_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor in place over all ranks, keeping its dtype (float64 statistics stay float64).
    NCCL reduces CUDA tensors only, so a CPU tensor makes a round trip through this rank's GPU."""
    if not _joined():
        return
    nccl = tdist.get_backend() == "nccl"
    for t in tensors:
        buf = t.to(f"cuda:{torch.cuda.current_device()}") if nccl and not t.is_cuda else t
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)


def barrier() -> None:
    if _joined():
        nccl = tdist.get_backend() == "nccl"  # told its GPU, NCCL need not guess one (and warn)
        tdist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


def cleanup() -> None:
    if _joined():
        tdist.destroy_process_group()
