"""Training across processes launched by ``torchrun`` (NCCL on GPUs, gloo on CPUs): DDP or FSDP2.

The training loop asks this module which process it is, to average a number over processes, to agree on a
flag that any process may raise (a stop request), and to collect every process's RNG state for the
checkpoint. Outside ``torchrun`` (no ``WORLD_SIZE``) it is a single process and every call is a no-op, so
the loop reads the same either way.

Every process draws the same sequence of micro-batches and trains on its own share of each step's
(``own_micro_batches``), so a step sees the same data whether ``world_size * grad_accum_steps`` micro-batches
are spread over processes or accumulated in one.

``strategy: fsdp`` shards the model and the optimizer state over the processes with FSDP2 (``shard_model``:
``fully_shard`` per block, then the root). Its train state goes through ``torch.distributed.checkpoint``
(``save_sharded_state`` / ``load_sharded_state``), which reshards on load, so a job of another size resumes
it; the weights are also gathered whole (``full_model_state``) into the checkpoint's ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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


def job_world_size() -> int:
    """The number of processes in this job from torchrun's environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    if device.type == "cuda":  # more processes than GPUs (a smoke test on one GPU) share them round robin
        device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
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
    """This process's part of a dict written by ``gather_rng_states``: its own states when the job has as
    many processes as the one that wrote it, else rank 0's (every process draws the same batches, so the
    batch sampler continues exactly; only dropout's random stream differs from a job of the old size)."""
    saved_world = 1 + max((int(k[4:].split("/", 1)[0]) for k in saved if k.startswith("rank")), default=0)
    rank = ctx.rank if saved_world == ctx.world_size else 0
    if rank == 0:
        return {k: v for k, v in saved.items() if not k.startswith("rank")}
    prefix = f"rank{rank}/"
    return {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}


def own_micro_batches(draw: Iterator[Any], ctx: Distributed, grad_accum_steps: int) -> list[Any]:
    """This process's ``grad_accum_steps`` micro-batches of one step: every process takes the step's
    ``world_size * grad_accum_steps`` micro-batches from ``draw`` (the same sequence everywhere) and keeps
    the block of its rank, so the step's data does not depend on how it is split over processes."""
    batches = [next(draw) for _ in range(ctx.world_size * grad_accum_steps)]
    return batches[ctx.rank * grad_accum_steps:(ctx.rank + 1) * grad_accum_steps]


def shard_model(model: torch.nn.Module, blocks: Sequence[torch.nn.Module], device: torch.device,
                dtype: torch.dtype) -> None:
    """Shard ``model`` in place over the processes with FSDP2: each of ``blocks`` is one unit (its weights
    gathered for its forward and backward only), the root holds the rest (embeddings, head, final norm).
    On CUDA with bf16, weights are gathered and computed in bf16 and gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
              if device.type == "cuda" and dtype != torch.float32 else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context in which backward reduces gradients over processes only if ``enabled`` (the last micro-batch
    of a step): DDP's ``no_sync`` or FSDP2's ``set_requires_gradient_sync``; nothing to do otherwise."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole, any other as it is: a collective for a DTensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights whole, on the CPU, on the main process (empty elsewhere), each tied weight once (under
    its first name): a collective for a sharded model, every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - names
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def save_sharded_state(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], folder: Path) -> None:
    """Write the weights and optimizer state of every process to ``folder`` with ``torch.distributed.checkpoint``
    (each process its shards, the main process the metadata). A collective: every process must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, list(optimizers))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder,
             no_dist=not dist.is_initialized())


def load_sharded_state(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], folder: Path) -> None:
    """Load a ``save_sharded_state`` folder into ``model`` and ``optimizers``, resharded for this job's processes
    (any number, one included). A collective. Raises what ``torch.distributed.checkpoint.load`` raises."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, list(optimizers))
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_state_dict(model, list(optimizers), model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def barrier(ctx: Distributed) -> None:
    """Wait until every process gets here."""
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: Distributed) -> None:
    """Leave the process group (at the end of training)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
