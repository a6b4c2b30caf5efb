"""Data-parallel training across processes launched by ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs).

The training loop asks this module four things: which process am I, average a number over processes,
agree on a flag that any process may raise (a stop request), and collect every process's RNG state for
the checkpoint. Outside ``torchrun`` (no ``WORLD_SIZE``) it is
a single process and every call is a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``rank`` among ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_rank() -> int:
    """The global rank from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group that torchrun set up (if any); returns the context and this rank's device.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` and NCCL; elsewhere gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    ctx = Distributed(rank=process_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world_size)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return ctx, device


def mean_over_processes(value: float, ctx: Distributed, device: torch.device) -> float:
    """``value`` averaged over every process (itself in a single process)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def max_over_processes(value: int, ctx: Distributed, device: torch.device) -> int:
    """The largest ``value`` of every process (itself in a single process): how all processes agree on a
    flag that any one of them may have raised, such as a stop request."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_rng_states(state: dict[str, torch.Tensor], ctx: Distributed) -> dict[str, torch.Tensor]:
    """Every process's RNG states in one dict for the checkpoint: rank 0's keys as they are, rank r's
    prefixed ``rank{r}/``. A collective call: every process must make it."""
    if not ctx.enabled:
        return state
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in state.items()})
    merged = dict(gathered[0])
    for r in range(1, ctx.world_size):
        merged.update({f"rank{r}/{k}": v for k, v in gathered[r].items()})
    return merged


def own_rng_states(saved: dict[str, torch.Tensor], ctx: Distributed) -> dict[str, torch.Tensor]:
    """This process's part of a dict written by ``gather_rng_states``.

    Raises ValueError when the checkpoint was written by a job of another size (its sampling cannot be
    continued exactly).
    """
    prefix = f"rank{ctx.rank}/"
    if ctx.rank == 0:
        own = {k: v for k, v in saved.items() if not k.startswith("rank")}
    else:
        own = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
    saved_world = 1 + max((int(k[4:].split("/", 1)[0]) for k in saved if k.startswith("rank")), default=0)
    if saved_world != ctx.world_size:
        raise ValueError(f"the checkpoint was written by {saved_world} process(es), this job has {ctx.world_size}; "
                         "resume with the same number of processes or start over")
    return own


def barrier(ctx: Distributed) -> None:
    """Wait until every process gets here."""
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: Distributed) -> None:
    """Leave the process group (at the end of training)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
