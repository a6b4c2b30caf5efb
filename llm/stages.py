"""The pipeline stages, one function each: typed params and paths in, outputs on disk, a result dict out.

These are the functions that the ``llm`` CLI, the Prefect tasks in ``flows/`` and ``dvc.yaml`` all reach.
Each stage run is an MLflow run (params, lineage tags, metrics, artifacts) unless ``track=False``;
pretraining registers a version of the model ``gpt`` and evaluation decides whether it becomes Production.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm.config import (
    DataParams,
    EvalParams,
    ExportParams,
    FetchLimits,
    FinetuneParams,
    ModelConfig,
    PretrainParams,
    TokenizerParams,
    check_until_step,
)
from llm.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from llm.data.clean import ShardMapper

log = logging.getLogger(__name__)

REGISTRATION_FILE = "registration.json"
TRACKING_RUN_KEY = "tracking_run_id"  # in a checkpoint's config.json: the MLflow run that trains it


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes, relative to the project root (the layout table in README.md)."""

    root: Path = Path(".")

    @property
    def params(self) -> Path:
        return self.root / "params"

    @property
    def corpus(self) -> Path:
        return self.root / "data" / "corpus"

    @property
    def chat_data(self) -> Path:
        return self.root / "data" / "chat"

    def artifact(self, stage: str) -> Path:
        return self.root / "artifacts" / stage


class _Untracked:
    """Stands in for the tracked run (``llm.mlops.tracking.StageRun``) when tracking is off, so the stages run
    where MLflow is not installed: the same public methods, each doing nothing."""

    run_id = None
    enabled = False

    def flush(self) -> None:
        pass

    def callback(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_loss_curve(self, history: list[dict[str, float]], path_name: str = "loss_curve.png") -> None:
        pass


def _run(stage: str, params: dict[str, Any], enabled: bool, *, resume_run_id: str | None = None):
    """An MLflow run for a stage (``llm.mlops.tracking.stage_run``), or a no-op stand-in when tracking is off.
    ``resume_run_id`` reopens that run when the store has it (a resumed training run), else a new one starts."""
    if not enabled:
        return contextlib.nullcontext(_Untracked())
    from llm.mlops.tracking import stage_run

    return stage_run(stage, params, resume_run_id=resume_run_id)


def is_main_process() -> bool:
    """False in the extra processes of a ``torchrun`` job: only rank 0 tracks, registers and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def tracking_enabled(track: bool | None) -> bool:
    """``track`` if given, else on unless the environment sets ``LLM_TRACKING=0``; always off outside rank 0."""
    if not is_main_process():
        return False
    if track is not None:
        return track
    return os.environ.get("LLM_TRACKING", "1").lower() not in ("0", "false", "no", "off")


def fetch_stage(source: str, dest: Path, limits: FetchLimits | None = None) -> list[Path]:
    """Build the raw corpus folder from ``source`` (``default``, a folder or an http(s) URL), within ``limits``."""
    from llm.data.corpus import fetch_corpus

    return fetch_corpus(source, dest, limits=limits)


def clean_stage(
    params: DataParams, corpus_dir: Path, out_dir: Path, *, track: bool | None = None, mapper: ShardMapper | None = None
) -> dict:
    """Clean, deduplicate and split the corpus; returns the statistics written to ``stats.json``. ``mapper``
    runs the per-shard work (default: a local process pool; see ``llm.data.clean.clean_corpus``)."""
    from llm.data.clean import clean_corpus

    with _run("clean", params.model_dump(), tracking_enabled(track)) as run:
        stats = clean_corpus(params, corpus_dir, out_dir, mapper=mapper)
        run.log_metrics({f"data/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))})
        run.log_artifact(out_dir / "stats.json")
    return stats


def tokenizer_stage(params: TokenizerParams, clean_dir: Path, out_dir: Path, *, track: bool | None = None) -> dict:
    """Train the tokenizer on the cleaned train split; returns its kind and size."""
    from llm.data.tokenizer import train_tokenizer_on_split

    with _run("tokenizer", params.model_dump(), tracking_enabled(track)) as run:
        tok = train_tokenizer_on_split(params, clean_dir / "train.txt", out_dir)
        run.log_metrics({"tokenizer/vocab_size": float(tok.vocab_size)})
    return {"kind": tok.kind, "vocab_size": tok.vocab_size}


def tokenize_stage(
    clean_dir: Path, tokenizer_dir: Path, out_dir: Path, *, track: bool | None = None, mapper: ShardMapper | None = None
) -> dict:
    """Encode the cleaned splits into token files; returns ``meta.json``. ``mapper`` runs the per-shard work
    (default: a local process pool; see ``llm.data.tokenize.tokenize_corpus``)."""
    from llm.data.tokenize import tokenize_corpus

    with _run("tokenize", {}, tracking_enabled(track)) as run:
        meta = tokenize_corpus(clean_dir, tokenizer_dir, out_dir, mapper=mapper)
        for split, info in meta["splits"].items():
            run.log_metrics({f"tokens/{split}_tokens": float(info["tokens"]),
                             f"tokens/{split}_tokens_per_byte": float(info["tokens_per_byte"])})
    return meta


def pretrain_stage(
    params: PretrainParams,
    model_config: ModelConfig,
    tokens_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    resume: bool = True,
    until_step: int | None = None,
    track: bool | None = None,
    register: bool = True,
) -> dict:
    """Pretrain, log the run to MLflow and register the checkpoint as a new version of ``gpt``.

    Returns the final metrics plus ``run_id`` and ``model_version`` (None when untracked or stopped
    early with ``until_step``). The registration is also written to ``out_dir/registration.json``.
    """
    from llm.training.pretrain import pretrain, pretrain_identity

    check_until_step(until_step)
    enabled = tracking_enabled(track)
    logged = {"pretrain": params.model_dump(), "model": model_config.model_dump()}
    previous = _resumed_run_id(out_dir, lambda: pretrain_identity(params, model_config, tokens_dir, tokenizer_dir),
                               enabled and resume)
    with _run("pretrain", logged, enabled, resume_run_id=previous) as run:
        result = pretrain(params, model_config, tokens_dir, tokenizer_dir, out_dir, resume=resume,
                          until_step=until_step, callbacks=[run.callback], metadata={TRACKING_RUN_KEY: run.run_id})
        version = _finish_training_run(run, "pretrain", logged, result, out_dir,
                                       register=enabled and register and result.step >= params.max_steps)
    registration = _write_registration(out_dir, {"run_id": run.run_id, "model_version": version, "stage": "pretrain"})
    return {**result.metrics, **registration}


def finetune_stage(
    params: FinetuneParams,
    base_dir: Path,
    clean_dir: Path,
    chat_source: Path | None,
    chat_dir: Path,
    out_dir: Path,
    *,
    resume: bool = True,
    until_step: int | None = None,
    track: bool | None = None,
    register: bool = True,
) -> dict:
    """Prepare chat data (``chat_source/*.jsonl`` if any, else conversations derived from the plays) into
    ``chat_dir``, finetune the pretrained checkpoint ``base_dir`` on it, log the run and register the
    result as a version of ``gpt`` tagged ``llm.stage=finetune`` with its parent pretraining run.

    Returns the final metrics plus ``run_id`` and ``model_version``.
    """
    from llm.data.chat_data import prepare_chat_data
    from llm.training.finetune import finetune, finetune_identity

    check_until_step(until_step)
    enabled = tracking_enabled(track)
    parent = read_registration(base_dir)
    parent_tags = {"llm.parent_run_id": parent.get("run_id") or "none",
                   "llm.parent_version": parent.get("model_version") or "none"}
    chat_stats = prepare_chat_data(chat_source, clean_dir, chat_dir, params.chat_data)
    logged = {"finetune": params.model_dump()}
    previous = _resumed_run_id(out_dir, lambda: finetune_identity(params, base_dir, chat_dir), enabled and resume)
    with _run("finetune", logged, enabled, resume_run_id=previous) as run:
        run.set_tags(parent_tags)
        run.log_artifact(chat_dir / "stats.json")
        result = finetune(params, base_dir, chat_dir, out_dir, resume=resume, until_step=until_step,
                          callbacks=[run.callback], metadata={TRACKING_RUN_KEY: run.run_id})
        version = _finish_training_run(run, "finetune", logged, result, out_dir,
                                       register=enabled and register and result.step >= params.max_steps,
                                       tags={"llm.finetuned": "true", **parent_tags})
    registration = _write_registration(out_dir, {
        "run_id": run.run_id, "model_version": version, "stage": "finetune",
        "parent_run_id": parent.get("run_id"), "parent_version": parent.get("model_version"),
    })
    return {**result.metrics, **registration, "chat_data": {k: chat_stats.get(k) for k in ("train", "val")}}


def _resumed_run_id(out_dir: Path, identity: Callable[[], str], enabled: bool) -> str | None:
    """The tracking run recorded by the checkpoint in ``out_dir`` when training is going to resume it (the same
    run identity), so that the resumed attempt continues that run: one curve per training run, not one per
    attempt. None when tracking or resuming is off, or there is no such checkpoint."""
    if not enabled:
        return None
    from llm.model.checkpoint import CONFIG_FILE

    try:
        saved = json.loads((out_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not saved.get(TRACKING_RUN_KEY) or saved.get("run_identity") != identity():
        return None
    return saved[TRACKING_RUN_KEY]


def read_registration(checkpoint_dir: Path) -> dict:
    """What the training stage recorded in ``checkpoint_dir/registration.json`` (run id, model version);
    empty when it has none (an untracked run, or a folder from elsewhere)."""
    path = checkpoint_dir / REGISTRATION_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_registration(out_dir: Path, registration: dict) -> dict:
    if is_main_process():
        atomic_write_json(out_dir / REGISTRATION_FILE, registration, sort_keys=True)
    return registration


def _finish_training_run(run, stage: str, logged: dict, result, out_dir: Path, *, register: bool,
                         tags: dict[str, str] | None = None) -> str | None:
    """Log a finished training run's summary and files; with ``register``, register the checkpoint as a
    version of ``gpt`` tagged with its lineage and ``stage`` (the version that already holds it, if any).
    Returns the version (None if not registered).

    The files are also in ``out_dir``: a tracking store that does not answer costs the run its copies, with a
    warning. Registration tries again with backoff, then raises RegistrationError; the checkpoint is complete
    and ``registration.json`` names the run and tags, so ``llm register --model <out_dir>`` finishes it later.
    """
    # the step-wise metrics went through the callback; the summary adds only the best val loss
    run.log_metrics({k: v for k, v in result.metrics.items() if k == "val/best_loss"}, step=result.step)
    _log_training_files(run, result, out_dir)
    if not register:
        return None
    from llm.mlops.registry import RegistrationError, register_checkpoint
    from llm.mlops.tracking import lineage_tags

    version_tags = {**lineage_tags(stage, logged), "llm.stage": stage, **(tags or {})}
    try:
        return register_checkpoint(out_dir, run_id=run.run_id, tags=version_tags)
    except RegistrationError:
        _write_registration(out_dir, {"run_id": run.run_id, "model_version": None, "stage": stage,
                                      "tags": version_tags})
        raise


def _log_training_files(run, result, out_dir: Path) -> None:
    """config.json, metrics.json, curve/ and the loss curve plot as the run's artifacts, while the store answers."""
    if not run.enabled:
        return
    from llm.mlops.tracking import retry_unavailable, store_unavailable

    def log_files() -> None:
        run.log_artifact(out_dir / "config.json")
        run.log_artifact(out_dir / "metrics.json")
        run.log_artifacts(out_dir / "curve", "curve")
        run.log_loss_curve(result.history)

    try:
        retry_unavailable(log_files, what=f"logging the files of run {run.run_id}", attempts=3, first_delay_s=2.0)
    except Exception as err:
        if not store_unavailable(err):
            raise
        log.warning("run %s lacks its files (config.json, metrics.json, curve/, loss curve): the tracking store "
                    "did not answer (%s); they are in %s", run.run_id, str(err).splitlines()[0][:300], out_dir)


def register_stage(checkpoint_dir: Path, *, run_id: str | None = None) -> dict:
    """Register a finished training checkpoint as a version of ``gpt`` after the fact: when its training stage
    could not reach the tracking store, or ran untracked. Under ``run_id``, else the run its
    ``registration.json`` names, else a new run ``register``; with the tags the training stage chose, when it
    recorded them. A version that already holds these weights is reused. Writes ``registration.json`` and
    returns it.

    Raises CheckpointError for an incomplete checkpoint, RegistryError/RegistrationError as
    ``llm.mlops.registry.register_checkpoint`` does.
    """
    from llm.mlops.registry import register_checkpoint
    from llm.model.checkpoint import verify_checkpoint

    config = verify_checkpoint(checkpoint_dir)
    previous = read_registration(checkpoint_dir)
    stage = previous.get("stage") or config.get("stage") or "pretrain"
    tags = previous.get("tags") or {"llm.stage": stage, **({"llm.finetuned": "true"} if stage == "finetune" else {})}
    run_id = run_id or previous.get("run_id")
    if run_id is None:
        with _run("register", {"checkpoint": str(checkpoint_dir), "stage": stage}, tracking_enabled(True)) as run:
            version = register_checkpoint(checkpoint_dir, run_id=run.run_id, tags=tags)
        run_id = run.run_id
    else:
        version = register_checkpoint(checkpoint_dir, run_id=run_id, tags=tags)
    registration = {"run_id": run_id, "model_version": version, "stage": stage}
    if stage == "finetune":
        registration.update(parent_run_id=_none_if_missing(tags.get("llm.parent_run_id")),
                            parent_version=_none_if_missing(tags.get("llm.parent_version")))
    return _write_registration(checkpoint_dir, registration)


def _none_if_missing(value: str | None) -> str | None:
    return None if value in (None, "none") else value


def _production_score(current, metric: str, params: EvalParams, clean_dir: Path, chat_val: Path | None) -> float:
    from llm.mlops.registry import resolve_model

    production_dir = resolve_model(f"models:/gpt/{current.version}")
    if metric == "chat/assistant_loss":
        from llm.training.finetune import assistant_loss

        return assistant_loss(production_dir, None, chat_val, device=params.device,
                              max_conversations=params.max_conversations)
    from llm.training.evaluate import evaluate_on_text

    return evaluate_on_text(production_dir, clean_dir / "val.txt", params)["val/bpb"]


def evaluate_stage(
    params: EvalParams,
    candidate_dir: Path,
    tokens_dir: Path,
    clean_dir: Path,
    out_dir: Path,
    *,
    chat_dir: Path | None = None,
    track: bool | None = None,
    promote: bool = True,
) -> dict:
    """Score the candidate checkpoint, and the current Production model on the same validation data, and
    promote the candidate to Production only if it is better.

    Base models are compared on bits per byte of the validation text (independent of the tokenizer).
    A finetuned (chat) candidate is compared on held-out assistant-token loss over ``chat_dir/val.jsonl``,
    which is also reported for its base model, so the gain from finetuning is visible. Writes
    ``metrics.json``, ``samples.md`` and ``promotion.json`` into ``out_dir``; returns metrics and decision.
    """
    from llm.model.checkpoint import verify_checkpoint
    from llm.training.evaluate import evaluate_checkpoint, sample_conversations, samples_markdown

    enabled = tracking_enabled(track)
    registration = read_registration(candidate_dir)
    config = verify_checkpoint(candidate_dir)
    is_chat = config.get("stage") == "finetune"
    chat_val = chat_dir / "val.jsonl" if chat_dir is not None else None
    if is_chat and (chat_val is None or not chat_val.exists()):
        raise FileNotFoundError(f"{candidate_dir} is a finetuned model: its evaluation needs the chat val "
                                f"conversations ({chat_val}); run the finetune stage first")
    with _run("evaluate", params.model_dump(), enabled) as run:
        result = evaluate_checkpoint(candidate_dir, tokens_dir, params, out_dir=out_dir)
        samples = result.pop("samples")
        metric, candidate_score = "val/bpb", result["val/bpb"]
        if is_chat:
            from llm.training.finetune import assistant_loss

            base_dir = Path(config["parent"]["path"])
            result["chat/assistant_loss"] = assistant_loss(candidate_dir, None, chat_val, device=params.device,
                                                           max_conversations=params.max_conversations)
            if base_dir.exists():
                result["chat/base_assistant_loss"] = assistant_loss(base_dir, None, chat_val, device=params.device,
                                                                    max_conversations=params.max_conversations)
            metric, candidate_score = "chat/assistant_loss", result["chat/assistant_loss"]
            conversations = sample_conversations(candidate_dir, chat_val, params)
            atomic_write_text(out_dir / "samples.md", samples_markdown(samples, conversations))
            run.log_text(json.dumps(conversations, indent=2, ensure_ascii=False), "sample_conversations.json")
            atomic_write_json(out_dir / "metrics.json", {**result, "eval/step": result.get("eval/step", 0)},
                              sort_keys=True)
        run.log_metrics({k: float(v) for k, v in result.items()})
        run.log_artifact(out_dir / "samples.md")
        decision: dict[str, Any] = {"promoted": False, "metric": metric, "candidate_score": candidate_score,
                                    "reason": "tracking disabled: no registry to promote in"}
        candidate_version = registration.get("model_version")
        if enabled and promote and candidate_version:
            from llm.mlops.registry import compare_and_promote, production_version, recorded_decision

            current = production_version()
            if recorded_decision(str(candidate_version)) is not None:  # decided once (a rerun, a retry): kept
                decision = compare_and_promote(str(candidate_version), candidate_score, None, metric=metric)
            elif current is not None and str(current.version) == str(candidate_version):
                decision.update(reason=f"version {candidate_version} is already Production",
                                candidate=str(candidate_version))
            else:
                production_score = None
                if current is not None:
                    production_score = _production_score(current, metric, params, clean_dir, chat_val)
                    run.log_metrics({f"production/{metric}": production_score})
                decision = compare_and_promote(str(candidate_version), candidate_score, production_score,
                                               metric=metric, lower_is_better=True)
        elif enabled and promote:
            decision["reason"] = (f"{candidate_dir / REGISTRATION_FILE} names no registered version "
                                  "(run the training stage tracked)")
        run.set_tags({"promotion.promoted": str(decision["promoted"]).lower()})
        run.log_text(json.dumps(decision, indent=2), "promotion.json")
    atomic_write_json(out_dir / "promotion.json", decision, sort_keys=True)
    return {**result, "promotion": decision, "samples": samples}


def export_stage(params: ExportParams, checkpoint_dir: Path, out_dir: Path, *, track: bool | None = None) -> dict:
    """Export ``checkpoint_dir`` to ONNX in ``out_dir`` (with its parity report) and log the run.

    Raises ExportError, leaving no complete-looking folder, when ONNX Runtime does not match PyTorch.
    """
    from llm.inference.export import export_onnx

    with _run("export", params.model_dump(), tracking_enabled(track)) as run:
        summary = export_onnx(checkpoint_dir, out_dir, opset=params.opset, quantize=params.quantize,
                              verify=params.verify, atol=params.atol)
        parity = summary.get("parity", {})
        run.log_metrics({f"export/{k}": float(v) for k, v in parity.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_metrics({"export/model_bytes": float(sum(summary["files"].values()))})
        for name in ("parity.json", "generation_config.json"):
            if (out_dir / name).exists():
                run.log_artifact(out_dir / name)
        summary["model_version"] = _attach_export(checkpoint_dir, out_dir) if tracking_enabled(track) else None
    return summary


def _attach_export(checkpoint_dir: Path, onnx_dir: Path) -> str | None:
    """Attach the export in ``onnx_dir`` to the registered version of ``checkpoint_dir`` (named in its
    ``registration.json``). Returns the version, or None (with a warning) when there is none."""
    registration = read_registration(checkpoint_dir)
    version, run_id = registration.get("model_version"), registration.get("run_id")
    if not version or not run_id:
        log.warning("%s names no registered version: the ONNX export is not attached to one",
                    checkpoint_dir / REGISTRATION_FILE)
        return None
    from llm.mlops.registry import attach_onnx_export

    attach_onnx_export(str(version), run_id, onnx_dir)
    return str(version)
