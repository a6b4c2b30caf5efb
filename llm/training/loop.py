"""The training loop: AdamW or Muon, warmup + cosine schedule, accumulation, clipping, evaluation, checkpoints.

``train`` is generic over where batches come from (token windows in ``llm.training.pretrain``, chat
examples in ``llm.training.finetune``). It settles the device, the processes and the run's state once
(``RunState``), resumes a checkpoint if it belongs to the same run, then loops over its phases, one small
function each: ``_train_step`` (micro-batches, clipping, optimizer step), ``_validate``,
``_write_checkpoint`` and ``_summary``. The loop never imports orchestration code: callers that track
experiments pass ``callbacks`` that receive ``(step, metrics)``.

Exact resume: the checkpoint stores weights, optimizer moments, the step, every RNG that the loop draws
from (torch CPU/CUDA for dropout, the batch sampler's random generator) and the metric history, so a run
stopped at step k and resumed replays the same batches and produces the same losses.

Run identity: a checkpoint records what its run trains on and from (hashes of the data, tokenizer and base
model), the model config and every param that changes the result (``run_identity``; its digest is the
``run_identity`` key of ``config.json``). A checkpoint of the same run is resumed; one of another run
(a changed ``max_steps`` or learning rate, new data) is left in place until the new run, started from
fresh weights, writes its first checkpoint over it.

Interruption: SIGINT and SIGTERM stop the loop at the next step boundary (every process of a ``torchrun``
job at the same step), write a checkpoint and raise ``TrainingInterrupted``; a second signal acts at once.
A gradient norm or loss that is NaN or infinite stops training before the optimizer step, and a checkpoint
is never written from non-finite weights.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llm.config import ModelConfig, PretrainParams
from llm.data.tokenizer import Tokenizer
from llm.data.tokens import bits_per_byte
from llm.io import folder_lock
from llm.model.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    TrainState,
    has_checkpoint,
    load_train_state,
    load_weights,
    recover_checkpoint_folder,
    save_checkpoint,
    verify_checkpoint,
)
from llm.model.gpt import GPT
from llm.training.device import autocast, peak_flops, select_device, select_dtype, synchronize
from llm.training.distributed import (
    Distributed,
    barrier,
    full_model_state,
    gather_rng_states,
    gradient_sync,
    init_distributed,
    job_world_size,
    load_sharded_state,
    local,
    max_over_processes,
    mean_over_processes,
    own_micro_batches,
    own_rng_states,
    save_sharded_state,
    shard_model,
    shutdown,
    whole,
)

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]  # (inputs, targets) or (inputs, targets, loss_mask)
Callback = Callable[[int, dict[str, float]], None]
# told the tracking run that the resumed checkpoint records (None: a fresh start); returns the one to record
# told the config of the checkpoint that training resumes (None: it starts over); returns what the checkpoints it
# writes record about the tracking (the run id under TRACKING_RUN_KEY, the other loggers' runs)
StartTracking = Callable[[Mapping[str, Any] | None], Mapping[str, Any]]


class TrainingDivergedError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite; the last good checkpoint is left as
    it was."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training at a step boundary, after writing a checkpoint.

    A KeyboardInterrupt, so whatever records the run (the MLflow stage run) ends it as KILLED. ``signum`` is
    the signal, ``step`` the step reached and ``checkpoint`` the folder that holds it (None when the run was
    stopped before its first step and nothing was saved); ``exit_code`` is the shell's 128 + signal number.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = (f"the checkpoint in {checkpoint} is at step {step}" if checkpoint is not None
                 else "no step was trained, so there is no checkpoint")
        super().__init__(f"{signal.Signals(signum).name} stopped training at step {step}: {where}")

    def __reduce__(self):
        return type(self), (self.signum, self.step, self.checkpoint)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class BatchSource(Protocol):
    """Where the loop gets data: random training batches and a deterministic validation pass."""

    tokens_per_byte: float | None

    def train_batch(self, rng: torch.Generator) -> Batch: ...

    def val_batches(self) -> Iterator[Batch]: ...


@dataclass
class TrainResult:
    """What a finished (or paused) training run returns."""

    out_dir: Path
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    run_identity: str = ""  # the digest recorded in the checkpoint (see ``run_identity``)


def lr_at(step: int, params: PretrainParams) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    peak = params.learning_rate
    if step < params.warmup_steps:
        return peak * (step + 1) / params.warmup_steps
    span = max(1, params.max_steps - params.warmup_steps)
    progress = min(1.0, (step - params.warmup_steps) / span)
    floor = peak * params.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: GPT, params: PretrainParams, device: torch.device) -> Optimizer:
    """The optimizer that ``params.optimizer`` names, over every trainable parameter of ``model``.

    adamw: AdamW with weight decay on matrices (linear and embedding weights) and none on biases and norms.
    muon: Muon (Jordan et al., 2024; ``torch.optim.Muon``) for the blocks' matrices, whose updates it
    orthogonalises, at ``muon_lr``; AdamW as above for the embeddings, the head, norms and biases, which Muon is
    not made for. Each group's learning rate follows the schedule in proportion (``lr_scale``).
    """
    hidden = {id(p) for block in model.blocks for p in block.parameters() if p.requires_grad and p.dim() == 2}
    decay, no_decay, matrices = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if params.optimizer == "muon" and id(p) in hidden:
                matrices.append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": params.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=params.learning_rate, betas=(params.beta1, params.beta2),
                              fused=device.type == "cuda")
    if not matrices:
        return adamw
    # "original": Keller Jordan's scaling, sqrt(max(1, rows / cols)), so a tall matrix moves as far as a square one
    muon = torch.optim.Muon([{"params": matrices, "lr_scale": params.muon_lr / params.learning_rate}],
                            lr=params.muon_lr, weight_decay=params.weight_decay, momentum=params.muon_momentum,
                            adjust_lr_fn="original")
    return OptimizerChain(muon, adamw)


class OptimizerChain:
    """Several optimizers over disjoint parameters, stepped as one: what the loop and the checkpoint see.

    ``param_groups`` lists every optimizer's groups (the same dicts, so setting a group's ``lr`` reaches its
    optimizer); ``state_dict`` is the standard layout (``state`` by parameter index, ``param_groups`` with
    indices) over the optimizers' parameters in order, so a checkpoint stores it like any optimizer's.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            part = opt.state_dict()
            state.update({index + offset: value for index, value in part["state"].items()})
            groups += [{**g, "params": [index + offset for index in g["params"]]} for g in part["param_groups"]]
            offset += sum(len(g["params"]) for g in part["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Split a ``state_dict`` of this chain back over its optimizers. Raises ValueError when its groups do not
        match theirs (a checkpoint of another optimizer)."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the optimizer state does not match this optimizer's parameter groups")
        offset = 0
        for opt in self.optimizers:
            own, groups = groups[: len(opt.param_groups)], groups[len(opt.param_groups):]
            indices = [index for g in own for index in g["params"]]
            saved = state_dict["state"]
            opt.load_state_dict({
                "state": {index - offset: saved[index] for index in indices if index in saved},
                "param_groups": [{**g, "params": [index - offset for index in g["params"]]} for g in own],
            })
            offset += len(indices)


Optimizer = torch.optim.Optimizer | OptimizerChain


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


# params that change how a run is executed or displayed, not what it computes: not part of its identity
_RESUME_FREE_KEYS = {"progress", "log_interval", "checkpoint_interval", "device", "num_threads", "compile", "tracking",
                     "launch"}


def run_identity(params: PretrainParams, model_config: ModelConfig, inputs: Mapping[str, Any],
                 world_size: int | None = None) -> dict[str, Any]:
    """The identity of a training run: ``inputs`` (what it trains on and from: hashes of its data, its
    tokenizer, for finetuning its base model, and the code that computes it: ``code_digests``), the model
    config and every param that changes the result.

    ``grad_accum_steps`` counts as the micro-batches of a step over the job's ``world_size`` processes (default:
    this job's), so 2 processes accumulating 1 and 1 process accumulating 2 are the same run. Two attempts with
    equal identities are the same run, so the later one resumes the earlier one's checkpoint.
    """
    kept = {k: v for k, v in params.model_dump().items() if k not in _RESUME_FREE_KEYS}
    kept["grad_accum_steps"] *= job_world_size() if world_size is None else world_size
    return {"inputs": dict(inputs), "model": model_config.model_dump(), "params": kept}


def code_digests(*modules: str) -> dict[str, str]:
    """The code of the named modules for a run identity: per module, the sha256 of its syntax tree without
    docstrings, so that editing a comment, a docstring or the formatting does not start a run over but
    changing what the code computes does (``dvc repro`` reruns a stage when its code changes; a resumed
    finished run would otherwise hand back weights the old code made)."""
    return {name: _code_digest(inspect.getsource(importlib.import_module(name))) for name in modules}


def _code_digest(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def identity_digest(identity: Mapping[str, Any]) -> str:
    """Hex sha256 of an identity's canonical JSON: the ``run_identity`` that checkpoints record in ``config.json``."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class RunState:
    """One training run: what it trains on and with (settled once before the loop) and how far it got."""

    model: GPT
    tokenizer: Tokenizer
    data: BatchSource
    params: PretrainParams
    out_dir: Path
    metadata: dict[str, Any]
    identity: dict[str, Any]
    dist: Distributed
    device: torch.device
    dtype: torch.dtype
    optimizer: Optimizer
    rng: torch.Generator
    step: int = 0
    saved_step: int | None = None  # the step of this run's checkpoint in out_dir, None before the first
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0  # seconds spent training, without evaluation and checkpoints

    @property
    def identity_digest(self) -> str:
        return identity_digest(self.identity)


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
    inputs: Mapping[str, Any] | None = None,
    start_tracking: StartTracking | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` and keep an up-to-date checkpoint folder at ``out_dir``.

    Checkpoints are written every ``checkpoint_interval`` steps and at the end. ``inputs`` names what the run trains
    on and from (hashes of its data, tokenizer and base model; see ``run_identity``): with ``resume``, a checkpoint
    in ``out_dir`` of the same run is continued exactly, and one of another run is replaced by this run's first
    checkpoint (a log line says what differs). ``until_step`` stops early (the schedule still follows
    ``max_steps``). ``callbacks`` get ``(step, metrics)`` after each step on the main process; ``metadata`` goes
    into the checkpoint's config; ``start_tracking`` is told the tracking run of the resumed checkpoint once resume
    is decided. Returns the final metrics, the step reached, the metric history and the run identity's digest.

    SIGINT and SIGTERM (main thread only; the previous handlers are restored on return) stop training at the next
    step boundary with a checkpoint and raise TrainingInterrupted; a second signal gets the previous handler at
    once. Raises TrainingDivergedError on a NaN/inf loss or gradient norm (before the optimizer step) or non-finite
    weights (before a checkpoint), leaving the last good checkpoint as it was, CheckpointError if the checkpoint to
    resume is unreadable or was written by a job with another number of processes, and FolderLocked (at once,
    touching nothing) when another process is writing ``out_dir``.
    """
    run = _start_run(model, tokenizer, data, params, Path(out_dir), metadata or {}, inputs or {})
    with _StopSignals() as stop, folder_lock(run.out_dir) if run.dist.is_main else contextlib.nullcontext():
        _settle_checkpoint_folder(run, resume, start_tracking)
        last_step = min(params.max_steps, until_step or params.max_steps)
        train_model = _wrap_model(run)
        log.info("model: %s parameters (%s without embeddings) on %s/%s", f"{model.num_parameters():,}",
                 f"{model.num_parameters(exclude_embeddings=True):,}", run.device,
                 str(run.dtype).removeprefix("torch."))
        callbacks = (callbacks or []) if run.dist.is_main else []  # one process reports for the job
        meter = _meter_for(run)
        progress = _progress(params.progress and run.step < last_step and run.dist.is_main)
        task = progress.add_task("train", total=params.max_steps, completed=run.step, loss=float("nan"), tps=0.0)
        meter.restart()
        if params.max_steps == 0 and not run.history:  # nothing to train: the start model, evaluated, is the result
            _checkpoint_the_start_model(run)
        with progress:
            while run.step < last_step:
                _stop_if_signalled(run, stop)
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
            _stop_if_signalled(run, stop)
    _log_early_stop(run)
    shutdown(run.dist)
    return TrainResult(out_dir=run.out_dir, step=run.step, metrics=_summary(run), history=run.history,
                       run_identity=run.identity_digest)


def _log_early_stop(run: RunState) -> None:
    """Say so when training ended before ``max_steps`` (``until_step``): the progress bar shows N of max_steps."""
    if run.step < run.params.max_steps and run.dist.is_main:
        log.info("stopped early at step %d of %d (until_step): the checkpoint in %s resumes from there when run "
                 "again without it", run.step, run.params.max_steps, run.out_dir)


def _checkpoint_the_start_model(run: RunState) -> None:
    """A run of ``max_steps: 0`` (a published model kept as it is): its validation loss and its checkpoint at step 0."""
    run.history.append({"step": 0, **_validate(run)})
    _write_checkpoint(run, _summary(run))


def _meter_for(run: RunState) -> _Throughput:
    """Throughput and MFU of the job: every process's tokens per step, against the device's peak FLOP/s."""
    p, config = run.params, run.model.config
    return _Throughput(tokens_per_step=p.batch_size * p.grad_accum_steps * config.context_length * run.dist.world_size,
                       flops_per_token=run.model.flops_per_token(), peak_flops=peak_flops(run.device, run.dtype))


def _start_run(
    model: GPT, tokenizer: Tokenizer, data: BatchSource, params: PretrainParams, out_dir: Path,
    metadata: dict[str, Any], inputs: Mapping[str, Any],
) -> RunState:
    """Seed, join the processes, pick device and dtype, move the model there and build the optimizer."""
    torch.manual_seed(params.seed)
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    dist, device = init_distributed(select_device(params.device))
    dtype = select_dtype(params.dtype, device)
    model.to(device).train()
    if params.strategy == "fsdp" and dist.enabled:
        shard_model(model, model.blocks, device, dtype)  # before the optimizer, which must see the shards
    return RunState(
        model=model, tokenizer=tokenizer, data=data, params=params, out_dir=out_dir, metadata=metadata,
        identity=run_identity(params, model.config, inputs, dist.world_size),
        dist=dist, device=device, dtype=dtype, optimizer=build_optimizer(model, params, device),
        rng=torch.Generator().manual_seed(params.seed),  # the same on every process: see own_micro_batches
    )


def _settle_checkpoint_folder(run: RunState, resume: bool, start_tracking: StartTracking | None) -> None:
    """Decide once whether training resumes (``_resume_if_same_run``); then the main process tells
    ``start_tracking`` the config of the resumed checkpoint (None when starting over: its tracking run and
    loggers' runs are continued) and records what it returns in the checkpoints it writes."""
    resumed = _resume_if_same_run(run, resume)
    if start_tracking is not None and run.dist.is_main:
        run.metadata.update(start_tracking(resumed))


def _resume_if_same_run(run: RunState, resume: bool) -> CheckpointConfig | None:
    """Repair ``run.out_dir`` after a crash (main process, before anyone reads it), then resume its
    checkpoint if it is one of this run, or say why training starts over. Returns the resumed checkpoint's
    config, None when training starts over."""
    if run.dist.is_main:
        if recover_checkpoint_folder(run.out_dir):
            log.warning("%s: put back the checkpoint that a crash left aside in the middle of a write", run.out_dir)
    barrier(run.dist)
    out_dir = run.out_dir
    if not has_checkpoint(out_dir):
        return None
    if not resume:
        log.warning("%s: resume is off, starting over: its checkpoint is replaced when this run writes its first",
                    out_dir)
        return None
    try:
        saved = verify_checkpoint(out_dir)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. It cannot be resumed: delete it, or start over with resume=False "
                              "(`--no-resume`), which replaces it at the first checkpoint") from None
    if saved.run_identity == run.identity_digest:
        _resume(run)
        return saved
    log.warning("%s holds the checkpoint of another run (%s); starting over from fresh weights: it is replaced "
                "when this run writes its first checkpoint", out_dir, _identity_changes(saved.identity, run.identity))
    return None


def _identity_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """What differs between two run identities, in a few words: ``params.max_steps 4 -> 6, inputs.tokens changed``."""
    if not saved:
        return "it records no run identity"
    before, after = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key, "(none)"), after.get(key, "(none)")
        if old != new:
            is_hash = isinstance(new, str) and len(new) == 64  # a file hash: its value says nothing to a reader
            changes.append(f"{key} changed" if is_hash else f"{key} {old} -> {new}")
    more = f", and {len(changes) - 5} more" if len(changes) > 5 else ""
    return ", ".join(changes[:5]) + more if changes else "same identity, other digest"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resume(run: RunState) -> None:
    """Load the checkpoint in ``run.out_dir`` into ``run``: weights, optimizer moments, RNGs, step, history.

    Raises CheckpointError when it is unreadable.
    """
    out_dir = run.out_dir
    state = load_train_state(out_dir)
    if state.sharded is not None:  # strategy: fsdp, resharded for this job's processes
        load_sharded_state(run.model, _optimizers(run.optimizer), state.sharded)
    else:
        load_weights(out_dir, run.model)
        run.optimizer.load_state_dict(state.optimizer)
    _set_rng_state(own_rng_states(state.rng, run.dist), run.rng)
    run.step, run.history = state.step, state.extra.get("history", [])
    run.saved_step = state.step
    run.elapsed = state.extra.get("elapsed_s", 0.0)
    log.info("resuming from %s at step %d", out_dir, run.step)


class _StopSignals:
    """While open, SIGINT and SIGTERM ask the loop to stop at the next step boundary (``signum`` is set).

    Handlers are installed only in the main thread (Python delivers signals there) and not for a signal
    the parent process ignores. The first signal puts the previous handlers back, so a second one acts at
    once (Ctrl-C raises KeyboardInterrupt); closing puts them back too.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:
                    self._previous[sig] = previous
                    signal.signal(sig, self._ask_to_stop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _ask_to_stop(self, signum: int, frame: object) -> None:
        self.signum = signum
        self._restore()
        log.warning("%s received: stopping at the end of this step with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}


def _stop_if_signalled(run: RunState, stop: _StopSignals) -> None:
    """At a step boundary: if a signal reached any process, write a checkpoint of the step reached (unless
    it is already on disk) and raise TrainingInterrupted on every process at the same step."""
    signum = max_over_processes(stop.signum or 0, run.dist, run.device)  # every process stops at the same step
    if not signum:
        return
    if run.step > 0 and run.saved_step != run.step:
        _write_checkpoint(run, _summary(run))
    barrier(run.dist)  # the checkpoint is complete before any process exits
    shutdown(run.dist)
    raise TrainingInterrupted(signum, run.step, run.out_dir if run.saved_step is not None else None)


def _wrap_model(run: RunState) -> torch.nn.Module:
    """The module the steps run through: ``run.model`` compiled and/or in DDP as the params ask.

    Evaluation and checkpoints keep using ``run.model``, which shares the weights.
    """
    model = run.model
    train_model = torch.compile(model) if run.params.compile else model
    if run.dist.enabled and run.params.strategy == "ddp":  # fsdp: the model was sharded in place (_start_run)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [run.device.index] if run.device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    return train_model


def _train_step(run: RunState, train_model: torch.nn.Module, lr: float) -> float:
    """One optimizer step at learning rate ``lr`` over ``grad_accum_steps`` micro-batches, gradients clipped.

    Returns the training loss, averaged over micro-batches and processes. Raises TrainingDivergedError
    when it or the gradient norm is NaN or infinite, before the optimizer step, so the weights stay good.
    """
    params = run.params
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss_sum = 0.0
    draws = iter(lambda: run.data.train_batch(run.rng), None)
    for micro, batch in enumerate(own_micro_batches(draws, run.dist, params.grad_accum_steps)):
        batch = [t.to(run.device, non_blocking=True) for t in batch]
        mask = batch[2] if len(batch) > 2 else None
        # gradients are averaged across processes once, on the last micro-batch
        with gradient_sync(train_model, micro == params.grad_accum_steps - 1), autocast(run.device, run.dtype):
            loss = train_model(batch[0], batch[1], loss_mask=mask).loss
        (loss / params.grad_accum_steps).backward()
        loss_sum += loss.detach().item()
    train_loss = mean_over_processes(loss_sum / params.grad_accum_steps, run.dist, run.device)
    if not math.isfinite(train_loss):
        raise TrainingDivergedError(
            f"loss became {train_loss} at step {run.step + 1} (lr {lr:.3g}); "
            f"the last good checkpoint in {run.out_dir} is untouched. Lower learning_rate or check the data."
        )
    # the norm of the gradients averaged over processes (fsdp: of every shard), the same on every process
    parameters = [p for p in run.model.parameters() if p.grad is not None]
    grad_norm = whole(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
    if not math.isfinite(norm := grad_norm.item()):
        raise TrainingDivergedError(
            f"gradient norm became {norm} at step {run.step + 1} (lr {lr:.3g}, loss {train_loss:.4f}); "
            f"the step was not taken and the last good checkpoint in {run.out_dir} is untouched. "
            "Lower learning_rate, clip gradients (grad_clip) or check the data."
        )
    if params.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, params.grad_clip, grad_norm)
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
    """Save weights, train state, ``metrics.json`` and the loss curves to ``run.out_dir`` (main process).

    Raises TrainingDivergedError on every process, writing nothing, when a weight is NaN or infinite.
    """
    non_finite = [name for name, p in run.model.named_parameters() if not local(p.detach()).isfinite().all()]
    if max_over_processes(int(bool(non_finite)), run.dist, run.device):  # fsdp: each process sees its shards
        raise TrainingDivergedError(
            f"weights became NaN or infinite at step {run.step} ({', '.join(non_finite[:3])}); not saved: the last "
            f"good checkpoint in {run.out_dir} is untouched. Lower learning_rate or check the data."
        )
    rng = gather_rng_states(_rng_state(run.rng), run.dist)  # collective: every process takes part
    sharded, weights = _sharded_train_state(run) if run.params.strategy == "fsdp" else (None, None)
    if run.dist.is_main:
        extra_files = {
            "metrics.json": json.dumps(metrics, indent=2, sort_keys=True) + "\n",
            "curve/train.csv": _curve_csv(run.history, ["step", "train/loss", "lr"]),
            "curve/val.csv": _curve_csv(run.history, ["step", "val/loss", "val/bpb"]),
        }
        save_checkpoint(
            run.out_dir, run.model, run.model.config, run.tokenizer,
            train_state=TrainState(run.step, {} if sharded else run.optimizer.state_dict(), rng,
                                   {"history": run.history, "elapsed_s": run.elapsed}, sharded=sharded),
            metadata={"step": run.step, "params": run.params.model_dump(), **run.metadata,
                      "run_identity": run.identity_digest, "identity": run.identity},
            extra_files=extra_files, weights=weights,
        )
    run.saved_step = run.step


def _sharded_train_state(run: RunState) -> tuple[Path, dict[str, torch.Tensor]]:
    """strategy: fsdp: every process writes its shards of the weights and optimizer state into a folder beside
    ``run.out_dir`` (``torch.distributed.checkpoint``), which ``save_checkpoint`` moves into the new checkpoint,
    and the weights are gathered whole for its ``model.safetensors``. Collective. Returns the folder and the
    weights (empty except on the main process)."""
    folder = run.out_dir.parent / f".{run.out_dir.name}.sharded-{run.step}"
    if run.dist.is_main:
        for stale in run.out_dir.parent.glob(f".{run.out_dir.name}.sharded-*"):
            shutil.rmtree(stale)  # a write that a crash cut short
    barrier(run.dist)
    save_sharded_state(run.model, _optimizers(run.optimizer), folder)
    return folder, full_model_state(run.model)


def _optimizers(optimizer: Optimizer) -> tuple[torch.optim.Optimizer, ...]:
    return optimizer.optimizers if isinstance(optimizer, OptimizerChain) else (optimizer,)


def _summary(run: RunState) -> dict[str, float]:
    """The run's metrics so far: the last step's train loss (what the log line and MLflow's latest
    ``train/loss`` show) and its mean over the last ``log_interval`` steps (``train/loss_avg``), last and best
    validation, last throughput."""
    vals = [h for h in run.history if "val/loss" in h]
    trains = [h["train/loss"] for h in run.history if "train/loss" in h][-run.params.log_interval:]
    perf = [h for h in run.history if "perf/tokens_per_s" in h]
    out: dict[str, float] = {"step": run.step, "params": run.model.num_parameters(),
                             "wall_time_s": round(run.elapsed, 2)}
    if trains:
        out["train/loss"] = trains[-1]
        out["train/loss_avg"] = sum(trains) / len(trains)
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


def _rng_state(rng: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state(), "batch_sampler": rng.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor], rng: torch.Generator) -> None:
    torch.set_rng_state(state["torch_cpu"])
    rng.set_state(state["batch_sampler"])
    cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _curve_csv(history: list[dict[str, float]], keys: list[str]) -> str:
    rows = [h for h in history if keys[1] in h]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([k.replace("/", "_") for k in keys])
    for h in rows:
        writer.writerow([h.get(k, "") for k in keys])
    return buf.getvalue()
