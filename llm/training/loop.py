"""The training loop: AdamW, warmup + cosine schedule, accumulation, clipping, evaluation, checkpoints.

``train`` is generic over where batches come from (token windows in ``llm.training.pretrain``, chat
examples in ``llm.training.finetune``). The loop never imports orchestration code: callers that track
experiments pass ``callbacks`` that receive ``(step, metrics)``.

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
from llm.model.checkpoint import (
    CheckpointError,
    TrainState,
    load_train_state,
    load_weights,
    recover_interrupted_swap,
    save_checkpoint,
    verify_checkpoint,
)
from llm.model.gpt import GPT
from llm.training.device import autocast, peak_flops, select_device, select_dtype, synchronize
from llm.training.distributed import (
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


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterator[Batch], device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss in nats per target token over ``batches`` (masked positions excluded)."""
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
    longer run; the schedule still follows ``max_steps``). Returns the final metrics.

    Raises TrainingDivergedError on a NaN/inf loss (before the optimizer step, so nothing is saved) and
    CheckpointError if the checkpoint to resume is unreadable or belongs to another model shape.
    """
    out_dir = Path(out_dir)
    callbacks = callbacks or []
    torch.manual_seed(params.seed)
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    dist, device = init_distributed(select_device(params.device))
    dtype = select_dtype(params.dtype, device)
    model.to(device).train()
    optimizer = build_optimizer(model, params, device)
    generator = torch.Generator().manual_seed(params.seed + dist.rank)  # each process draws its own batches
    step, history, elapsed = 0, [], 0.0
    recover_interrupted_swap(out_dir)
    if resume and (out_dir / "train_state").is_dir():
        saved = verify_checkpoint(out_dir)
        if saved["model"] != model.config.model_dump():
            raise CheckpointError(
                f"{out_dir}: holds a checkpoint of a different model shape; delete it or pass resume=False"
            )
        changed = _changed_params(saved.get("params", {}), params)
        if changed:
            raise CheckpointError(
                f"{out_dir}: holds a run with other params ({', '.join(changed)}); resuming would not reproduce "
                "either run. Delete it or pass resume=False (--no-resume) to start over"
            )
        load_weights(out_dir, model)
        state = load_train_state(out_dir)
        optimizer.load_state_dict(state.optimizer)
        try:
            _set_rng_state(own_rng_states(state.rng, dist), generator)
        except ValueError as err:
            raise CheckpointError(f"{out_dir}: {err}") from None
        step, history, elapsed = state.step, state.extra.get("history", []), state.extra.get("elapsed_s", 0.0)
        log.info("resuming from %s at step %d", out_dir, step)
    last_step = min(params.max_steps, until_step or params.max_steps)
    train_model = torch.compile(model) if params.compile else model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = model.num_parameters()
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device, dtype)
    tokens_per_step = params.batch_size * params.grad_accum_steps * model.config.context_length * dist.world_size
    log.info("model: %s parameters (%s without embeddings) on %s/%s", f"{n_params:,}",
             f"{model.num_parameters(exclude_embeddings=True):,}", device, str(dtype).removeprefix("torch."))

    def run_eval() -> dict[str, float]:
        loss = evaluate_loss(model, data.val_batches(), device, dtype)
        out = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        if data.tokens_per_byte:
            out["val/bpb"] = bits_per_byte(loss, data.tokens_per_byte)
        return out

    def write_checkpoint(metrics: dict[str, float]) -> None:
        rng = gather_rng_states(_rng_state(generator), dist)  # collective: every process takes part
        if not dist.is_main:
            return
        extra_files = {
            "metrics.json": json.dumps(metrics, indent=2, sort_keys=True) + "\n",
            "curve/train.csv": _curve_csv(history, ["step", "train/loss", "lr"]),
            "curve/val.csv": _curve_csv(history, ["step", "val/loss", "val/bpb"]),
        }
        save_checkpoint(
            out_dir, model, model.config, tokenizer,
            train_state=TrainState(step, optimizer.state_dict(), rng,
                                   {"history": history, "elapsed_s": elapsed}),
            metadata={"step": step, "params": params.model_dump(), **(metadata or {})},
            extra_files=extra_files,
        )

    def summary() -> dict[str, float]:
        vals = [h for h in history if "val/loss" in h]
        trains = [h["train/loss"] for h in history if "train/loss" in h][-params.log_interval:]
        perf = [h for h in history if "perf/tokens_per_s" in h]
        out: dict[str, float] = {"step": step, "params": n_params, "wall_time_s": round(elapsed, 2)}
        if trains:
            out["train/loss"] = sum(trains) / len(trains)
        if vals:
            out.update({k: v for k, v in vals[-1].items() if k.startswith("val/")})
            out["val/best_loss"] = min(h["val/loss"] for h in vals)
        if perf:
            out["perf/tokens_per_s"] = perf[-1]["perf/tokens_per_s"]
            out["perf/mfu"] = perf[-1]["perf/mfu"]
        return out

    progress = _progress(params.progress and step < last_step and dist.is_main)
    task = progress.add_task("train", total=last_step, completed=step, loss=float("nan"), tps=0.0)
    window_tokens, window_start = 0, time.perf_counter()
    with progress:
        while step < last_step:
            lr = lr_at(step, params)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(params.grad_accum_steps):
                batch = [t.to(device, non_blocking=True) for t in data.train_batch(generator)]
                mask = batch[2] if len(batch) > 2 else None
                # under DDP, gradients are averaged across processes once, on the last micro-batch
                sync = not dist.enabled or micro == params.grad_accum_steps - 1
                with contextlib.nullcontext() if sync else train_model.no_sync(), autocast(device, dtype):
                    loss = train_model(batch[0], batch[1], loss_mask=mask).loss
                (loss / params.grad_accum_steps).backward()
                loss_sum += loss.detach().item()
            train_loss = mean_over_processes(loss_sum / params.grad_accum_steps, dist, device)
            if not math.isfinite(train_loss):  # checked before the optimizer step: the weights stay good
                raise TrainingDivergedError(
                    f"loss became {train_loss} at step {step + 1} (lr {lr:.3g}); "
                    f"the last good checkpoint in {out_dir} is untouched. Lower learning_rate or check the data."
                )
            if params.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step
            row: dict[str, float] = {"step": step, "train/loss": train_loss, "lr": lr}
            if step % params.log_interval == 0 or step == last_step:
                synchronize(device)
                now = time.perf_counter()
                tps = window_tokens / (now - window_start)
                elapsed += now - window_start
                row["perf/tokens_per_s"] = tps
                row["perf/mfu"] = flops_per_token * tps / peak
                window_tokens = 0
                progress.update(task, loss=row["train/loss"], tps=tps)
            if step % params.eval_interval == 0 or step == params.max_steps:
                row.update(run_eval())
                log.info("step %d: train %.4f, val %.4f", step, row["train/loss"], row["val/loss"])
            history.append(row)
            progress.update(task, completed=step)
            for cb in callbacks if dist.is_main else []:
                cb(step, {k: v for k, v in row.items() if k != "step"})
            if step % params.checkpoint_interval == 0 or step == last_step:
                write_checkpoint(summary())
            if "perf/tokens_per_s" in row:
                window_start = time.perf_counter()  # checkpoint and eval time is not training throughput
    shutdown(dist)
    return TrainResult(out_dir=out_dir, step=step, metrics=summary(), history=history)


def _progress(enabled: bool):
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
