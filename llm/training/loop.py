"""The training loop: AdamW, warmup + cosine schedule, accumulation, clipping, evaluation, checkpoints.

``train`` is generic over where batches come from (token windows in ``llm.training.pretrain``, chat
examples in ``llm.training.finetune``). It settles the device, the processes and the run's state once
(``RunState``), resumes a checkpoint if there is one, then loops over its phases, one small function
each: ``_train_step`` (micro-batches, clipping, optimizer step), ``_validate``, ``_write_checkpoint``
and ``_summary``. The loop never imports orchestration code: callers that track experiments pass
``callbacks`` that receive ``(step, metrics)``.

Exact resume: the checkpoint stores weights, optimizer moments, the step, every RNG that the loop draws
from (torch CPU/CUDA for dropout, the batch sampler's generator) and the metric history, so a run
stopped at step k and resumed replays the same batches and produces the same losses.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llm.config import PretrainParams
from llm.data.tokenizer import Tokenizer
from llm.data.tokens import bits_per_byte
from llm.io import recover_interrupted_swap
from llm.model.checkpoint import (
    CheckpointError,
    TrainState,
    load_train_state,
    load_weights,
    save_checkpoint,
    verify_checkpoint,
)
from llm.model.gpt import GPT
from llm.training.device import autocast, peak_flops, select_device, select_dtype, synchronize
from llm.training.distributed import (
    Distributed,
    gather_rng_states,
    init_distributed,
    mean_over_processes,
    own_rng_states,
    shutdown,
)

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]  # (inputs, targets) or (inputs, targets, loss_mask)
Callback = Callable[[int, dict[str, float]], None]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class BatchSource(Protocol):
    """Where the loop gets data: random training batches and a deterministic validation pass."""

    tokens_per_byte: float | None

    def train_batch(self, generator: torch.Generator) -> Batch: ...

    def val_batches(self) -> Iterator[Batch]: ...


@dataclass
class TrainResult:
    """What a finished (or paused) training run returns."""

    out_dir: Path
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def lr_at(step: int, params: PretrainParams) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    peak = params.learning_rate
    if step < params.warmup_steps:
        return peak * (step + 1) / params.warmup_steps
    span = max(1, params.max_steps - params.warmup_steps)
    progress = min(1.0, (step - params.warmup_steps) / span)
    floor = peak * params.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, params: PretrainParams, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) and none on biases and norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": params.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=params.learning_rate,
        betas=(params.beta1, params.beta2),
        fused=device.type == "cuda",
    )


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterator[Batch], device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss in nats per target token over ``batches`` (masked positions excluded).

    Raises ValueError when the batches hold no target token.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        x, y = batch[0].to(device), batch[1].to(device)
        mask = batch[2].to(device) if len(batch) > 2 else None
        with autocast(device, dtype):
            out = model(x, y, loss_mask=mask)
        n = int(mask.sum()) if mask is not None else y.numel()
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("validation produced no target tokens")
    return total / count


@dataclass
class RunState:
    """One training run: what it trains on and with (settled once before the loop) and how far it got."""

    model: GPT
    tokenizer: Tokenizer
    data: BatchSource
    params: PretrainParams
    out_dir: Path
    metadata: dict[str, Any]
    dist: Distributed
    device: torch.device
    dtype: torch.dtype
    optimizer: torch.optim.AdamW
    generator: torch.Generator
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0  # seconds spent training, without evaluation and checkpoints


def train(
    model: GPT,
    tokenizer: Tokenizer,
    data: BatchSource,
    params: PretrainParams,
    out_dir: str | Path,
    *,
    resume: bool = True,
    until_step: int | None = None,
    callbacks: list[Callback] | None = None,
    metadata: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` and keep an up-to-date checkpoint folder at ``out_dir``.

    Checkpoints are written every ``checkpoint_interval`` steps and at the end; with ``resume`` an existing
    checkpoint in ``out_dir`` is continued exactly. ``until_step`` stops early (a time-boxed slice of a
    longer run; the schedule still follows ``max_steps``). ``callbacks`` get ``(step, metrics)`` after each
    step on the main process; ``metadata`` goes into the checkpoint's config. Returns the final metrics,
    the step reached and the metric history.

    Raises TrainingDivergedError on a NaN/inf loss (before the optimizer step, so nothing is saved) and
    CheckpointError if the checkpoint to resume is unreadable, belongs to another model shape, was made
    with other params or by a job with another number of processes.
    """
    run = _start_run(model, tokenizer, data, params, Path(out_dir), metadata or {})
    recover_interrupted_swap(run.out_dir)
    if resume and (run.out_dir / "train_state").is_dir():
        _resume(run)
    last_step = min(params.max_steps, until_step or params.max_steps)
    train_model = _wrap_model(run)
    log.info("model: %s parameters (%s without embeddings) on %s/%s", f"{model.num_parameters():,}",
             f"{model.num_parameters(exclude_embeddings=True):,}", run.device, str(run.dtype).removeprefix("torch."))
    callbacks = (callbacks or []) if run.dist.is_main else []  # one process reports for the job
    meter = _Throughput(
        tokens_per_step=params.batch_size * params.grad_accum_steps * model.config.context_length * run.dist.world_size,
        flops_per_token=model.flops_per_token(),
        peak_flops=peak_flops(run.device, run.dtype),
    )
    progress = _progress(params.progress and run.step < last_step and run.dist.is_main)
    task = progress.add_task("train", total=last_step, completed=run.step, loss=float("nan"), tps=0.0)
    meter.restart()
    with progress:
        while run.step < last_step:
            # forward/backward over the micro-batches, then one optimizer step at this step's learning rate
            lr = lr_at(run.step, params)
            train_loss = _train_step(run, train_model, lr)
            run.step += 1
            row: dict[str, float] = {"step": run.step, "train/loss": train_loss, "lr": lr}
            # throughput since the last log line
            meter.count_step()
            if run.step % params.log_interval == 0 or run.step == last_step:
                seconds, perf = meter.measure(run.device)
                run.elapsed += seconds
                row.update(perf)
                progress.update(task, loss=train_loss, tps=perf["perf/tokens_per_s"])
            # validation loss
            if run.step % params.eval_interval == 0 or run.step == params.max_steps:
                row.update(_validate(run))
                log.info("step %d: train %.4f, val %.4f", run.step, train_loss, row["val/loss"])
            # record and report the step
            run.history.append(row)
            progress.update(task, completed=run.step)
            for cb in callbacks:
                cb(run.step, {k: v for k, v in row.items() if k != "step"})
            # checkpoint
            if run.step % params.checkpoint_interval == 0 or run.step == last_step:
                _write_checkpoint(run, _summary(run))
            if "perf/tokens_per_s" in row:
                meter.restart()  # checkpoint and eval time is not training throughput
    shutdown(run.dist)
    return TrainResult(out_dir=run.out_dir, step=run.step, metrics=_summary(run), history=run.history)


def _start_run(
    model: GPT, tokenizer: Tokenizer, data: BatchSource, params: PretrainParams, out_dir: Path, metadata: dict[str, Any]
) -> RunState:
    """Seed, join the processes, pick device and dtype, move the model there and build the optimizer."""
    torch.manual_seed(params.seed)
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    dist, device = init_distributed(select_device(params.device))
    dtype = select_dtype(params.dtype, device)
    model.to(device).train()
    return RunState(
        model=model, tokenizer=tokenizer, data=data, params=params, out_dir=out_dir, metadata=metadata,
        dist=dist, device=device, dtype=dtype, optimizer=build_optimizer(model, params, device),
        generator=torch.Generator().manual_seed(params.seed + dist.rank),  # each process draws its own batches
    )


def _resume(run: RunState) -> None:
    """Load the checkpoint in ``run.out_dir`` into ``run``: weights, optimizer moments, RNGs, step, history.

    Raises CheckpointError when it is unreadable, holds another model shape, was made with other params
    or by a job with another number of processes: continuing it would reproduce neither run.
    """
    out_dir = run.out_dir
    saved = verify_checkpoint(out_dir)
    if saved["model"] != run.model.config.model_dump():
        raise CheckpointError(
            f"{out_dir}: holds a checkpoint of a different model shape; delete it or pass resume=False"
        )
    changed = _changed_params(saved.get("params", {}), run.params)
    if changed:
        raise CheckpointError(
            f"{out_dir}: holds a run with other params ({', '.join(changed)}); resuming would not reproduce "
            "either run. Delete it or pass resume=False (--no-resume) to start over"
        )
    load_weights(out_dir, run.model)
    state = load_train_state(out_dir)
    run.optimizer.load_state_dict(state.optimizer)
    try:
        _set_rng_state(own_rng_states(state.rng, run.dist), run.generator)
    except ValueError as err:
        raise CheckpointError(f"{out_dir}: {err}") from None
    run.step, run.history = state.step, state.extra.get("history", [])
    run.elapsed = state.extra.get("elapsed_s", 0.0)
    log.info("resuming from %s at step %d", out_dir, run.step)


def _wrap_model(run: RunState) -> torch.nn.Module:
    """The module the steps run through: ``run.model`` compiled and/or in DDP as the params ask.

    Evaluation and checkpoints keep using ``run.model``, which shares the weights.
    """
    model = run.model
    train_model = torch.compile(model) if run.params.compile else model
    if run.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [run.device.index] if run.device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    return train_model


def _train_step(run: RunState, train_model: torch.nn.Module, lr: float) -> float:
    """One optimizer step at learning rate ``lr`` over ``grad_accum_steps`` micro-batches, gradients clipped.

    Returns the training loss, averaged over micro-batches and processes. Raises TrainingDivergedError
    when it is NaN or infinite, before the optimizer step, so the weights stay good.
    """
    params = run.params
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for micro in range(params.grad_accum_steps):
        batch = [t.to(run.device, non_blocking=True) for t in run.data.train_batch(run.generator)]
        mask = batch[2] if len(batch) > 2 else None
        # under DDP, gradients are averaged across processes once, on the last micro-batch
        sync = not run.dist.enabled or micro == params.grad_accum_steps - 1
        with contextlib.nullcontext() if sync else train_model.no_sync(), autocast(run.device, run.dtype):
            loss = train_model(batch[0], batch[1], loss_mask=mask).loss
        (loss / params.grad_accum_steps).backward()
        loss_sum += loss.detach().item()
    train_loss = mean_over_processes(loss_sum / params.grad_accum_steps, run.dist, run.device)
    if not math.isfinite(train_loss):
        raise TrainingDivergedError(
            f"loss became {train_loss} at step {run.step + 1} (lr {lr:.3g}); "
            f"the last good checkpoint in {run.out_dir} is untouched. Lower learning_rate or check the data."
        )
    if params.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), params.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return train_loss


def _validate(run: RunState) -> dict[str, float]:
    """Validation loss, perplexity and (when the data knows its bytes) bits per byte."""
    loss = evaluate_loss(run.model, run.data.val_batches(), run.device, run.dtype)
    out = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
    if run.data.tokens_per_byte:
        out["val/bpb"] = bits_per_byte(loss, run.data.tokens_per_byte)
    return out


def _write_checkpoint(run: RunState, metrics: dict[str, float]) -> None:
    """Save weights, train state, ``metrics.json`` and the loss curves to ``run.out_dir`` (main process)."""
    rng = gather_rng_states(_rng_state(run.generator), run.dist)  # collective: every process takes part
    if not run.dist.is_main:
        return
    extra_files = {
        "metrics.json": json.dumps(metrics, indent=2, sort_keys=True) + "\n",
        "curve/train.csv": _curve_csv(run.history, ["step", "train/loss", "lr"]),
        "curve/val.csv": _curve_csv(run.history, ["step", "val/loss", "val/bpb"]),
    }
    save_checkpoint(
        run.out_dir, run.model, run.model.config, run.tokenizer,
        train_state=TrainState(run.step, run.optimizer.state_dict(), rng,
                               {"history": run.history, "elapsed_s": run.elapsed}),
        metadata={"step": run.step, "params": run.params.model_dump(), **run.metadata},
        extra_files=extra_files,
    )


def _summary(run: RunState) -> dict[str, float]:
    """The run's metrics so far: recent train loss, last and best validation, last throughput."""
    vals = [h for h in run.history if "val/loss" in h]
    trains = [h["train/loss"] for h in run.history if "train/loss" in h][-run.params.log_interval:]
    perf = [h for h in run.history if "perf/tokens_per_s" in h]
    out: dict[str, float] = {"step": run.step, "params": run.model.num_parameters(),
                             "wall_time_s": round(run.elapsed, 2)}
    if trains:
        out["train/loss"] = sum(trains) / len(trains)
    if vals:
        out.update({k: v for k, v in vals[-1].items() if k.startswith("val/")})
        out["val/best_loss"] = min(h["val/loss"] for h in vals)
    if perf:
        out["perf/tokens_per_s"] = perf[-1]["perf/tokens_per_s"]
        out["perf/mfu"] = perf[-1]["perf/mfu"]
    return out


@dataclass
class _Throughput:
    """Tokens per second and model FLOPs utilisation over the steps since ``restart``."""

    tokens_per_step: int
    flops_per_token: float
    peak_flops: float
    tokens: int = 0
    start: float = 0.0

    def restart(self) -> None:
        self.start = time.perf_counter()

    def count_step(self) -> None:
        self.tokens += self.tokens_per_step

    def measure(self, device: torch.device) -> tuple[float, dict[str, float]]:
        """Seconds since ``restart`` and ``perf/tokens_per_s``, ``perf/mfu``; starts counting tokens anew."""
        synchronize(device)  # queued kernels belong to the steps being timed
        seconds = time.perf_counter() - self.start
        tps = self.tokens / seconds
        self.tokens = 0
        return seconds, {"perf/tokens_per_s": tps, "perf/mfu": self.flops_per_token * tps / self.peak_flops}


def _progress(enabled: bool):
    """The one progress bar: step, loss, tokens/s and time left; draws nothing unless ``enabled``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state(), "batch_sampler": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch_cpu"])
    generator.set_state(state["batch_sampler"])
    cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# keys that change how a run is executed or displayed, not what it computes
_RESUME_FREE_KEYS = {"progress", "log_interval", "checkpoint_interval", "device", "num_threads", "compile"}


def _changed_params(saved: dict[str, Any], params: PretrainParams) -> list[str]:
    now = params.model_dump()
    return sorted(k for k in now if k not in _RESUME_FREE_KEYS and saved.get(k) != now[k])


def _curve_csv(history: list[dict[str, float]], keys: list[str]) -> str:
    rows = [h for h in history if keys[1] in h]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([k.replace("/", "_") for k in keys])
    for h in rows:
        writer.writerow([h.get(k, "") for k in keys])
    return buf.getvalue()
