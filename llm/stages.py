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
    BaseParams,
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
    run_name = None
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


def _run(stage: str, params: dict[str, Any], enabled: bool, *, resume_run_id: str | None = None,
         run_name: str | None = None):
    """An MLflow run for a stage (``llm.mlops.tracking.stage_run``), or a no-op stand-in when tracking is off.
    ``resume_run_id`` reopens that run when the store has it (a resumed training run, which keeps its name),
    else a new one starts, named ``run_name`` (default: the stage)."""
    if not enabled:
        return contextlib.nullcontext(_Untracked())
    from llm.mlops.tracking import stage_run

    return stage_run(stage, params, resume_run_id=resume_run_id, run_name=run_name)


def training_params(stage_params: Any, model: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> dict[str, Any]:
    """What a training run logs, under the same names for pretraining and finetuning so that the MLflow
    compare view and ``mlflow.search_runs`` line runs up: ``model.*`` (the shape; a finetune's is its base's),
    ``train.*`` (the optimiser and loop settings: ``train.learning_rate``, ``train.batch_size``, ...) and
    ``tokenizer.kind`` / ``tokenizer.vocab_size``."""
    return {"model": dict(model), "train": stage_params.model_dump(),
            "tokenizer": {"kind": tokenizer.get("kind"), "vocab_size": tokenizer.get("vocab_size")}}


def training_run_name(stage: str, logged: Mapping[str, Any], *, base_version: str | None = None) -> str:
    """``pretrain 4x256 bpe2048 500 steps (3f2a1c)``: the stage, then layers x width, tokenizer, steps (and the
    base version of a finetune), then the first 6 hex digits of the run's ``params.hash`` tag, so runs with
    different params never share a name."""
    from llm.mlops.tracking import params_hash

    model, train, tok = logged["model"], logged["train"], logged["tokenizer"]
    parts = [stage, f"{model.get('n_layer')}x{model.get('d_model')}", f"{tok.get('kind')}{tok.get('vocab_size') or ''}",
             f"{train['max_steps']} steps"]
    if base_version:
        parts.append(f"from v{base_version}")
    return " ".join(parts) + f" ({params_hash(logged)[:6]})"


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


# The modules each stage function imports when it runs, before its work (torch, sentencepiece, onnx behind them).
# torch._dynamo is on the list of the stages that build an optimizer or trace a graph: torch.optim and torch.onnx
# import it on first use (seconds).
_STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "fetch": ("llm.data.corpus",),
    "clean": ("llm.data.clean",),
    "tokenizer": ("llm.data.tokenizer",),
    "tokenize": ("llm.data.tokenize",),
    "pretrain": ("llm.training.pretrain", "torch._dynamo"),
    "finetune": ("llm.data.chat_data", "llm.training.finetune", "torch._dynamo"),
    "evaluate": ("llm.training.evaluate", "llm.training.finetune"),
    "export": ("llm.inference.export", "torch._dynamo"),
}
_REGISTERING_STAGES = ("pretrain", "finetune", "evaluate", "export")


def stage_modules(stage: str, track: bool | None = None) -> tuple[str, ...]:
    """The modules that ``<stage>_stage`` imports when it runs with ``track``: its library code and, when it tracks
    (``tracking_enabled``), MLflow's through ``llm.mlops``. Empty for a name that is no stage.

    Importing them is most of a stage's start-up (seconds); a process started for one stage can import them up
    front, as ``python -m flows`` does (see flows/__main__.py). Raises nothing; the names are not imported here.
    """
    if stage not in _STAGE_MODULES:
        return ()
    tracking = ("llm.mlops.tracking",) if tracking_enabled(track) else ()
    if tracking and stage in _REGISTERING_STAGES:
        tracking += ("llm.mlops.registry",)
    return _STAGE_MODULES[stage] + tracking


def fetch_stage(source: str, dest: Path, limits: FetchLimits | None = None, *, add: bool = False,
                text_field: str = "text") -> list[Path]:
    """Build the raw corpus folder from ``source`` (``default``, a folder or an http(s) URL), within ``limits``:
    the corpus becomes that source alone, or, with ``add``, that source beside those already there. A Parquet
    or JSON Lines shard's ``text_field`` is its text."""
    from llm.data.corpus import fetch_corpus

    return fetch_corpus(source, dest, limits=limits, add=add, text_field=text_field)


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


def tokenizer_stage(params: TokenizerParams, clean_dir: Path, out_dir: Path, *, base: BaseParams | None = None,
                    track: bool | None = None) -> dict:
    """Train the tokenizer on the cleaned train split, or take the tokenizer of the model that ``base`` starts
    from (``base.hf_folder``); returns its kind and size."""
    from llm.data.tokenizer import train_tokenizer_on_split

    logged = params.model_dump() | ({"base.hf_folder": base.hf_folder} if base and base.hf_folder else {})
    with _run("tokenizer", logged, tracking_enabled(track)) as run:
        if base is not None and base.hf_folder:
            from llm.interop.hf import import_hf_tokenizer

            tok = import_hf_tokenizer(Path(base.hf_folder), out_dir, base.context_length)
        else:
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
    base: BaseParams | None = None,
) -> dict:
    """Pretrain (from random weights, or from the model ``base.hf_folder`` names), log the run to MLflow and
    register the checkpoint as a new version of ``gpt``.

    Returns the final metrics plus ``run_id`` and ``model_version`` (None when untracked or stopped
    early with ``until_step``). The registration is also written to ``out_dir/registration.json``.
    """
    from llm.training.pretrain import pretrain, pretrain_identity

    check_until_step(until_step)
    enabled = tracking_enabled(track)
    tokenizer = _tokenizer_of_tokens(tokens_dir)
    # vocab_size unset means the tokenizer's: logged as the number, as a finetune of this model logs it
    model = {**model_config.model_dump(), "vocab_size": model_config.vocab_size or tokenizer.get("vocab_size")}
    logged = training_params(params, model, tokenizer)
    if base is not None and base.hf_folder:
        logged["base"] = base.model_dump()
    previous = _resumed_run_id(
        out_dir, lambda: pretrain_identity(params, model_config, tokens_dir, tokenizer_dir, base=base),
        enabled and resume)
    with _run("pretrain", logged, enabled, resume_run_id=previous,
              run_name=training_run_name("pretrain", logged)) as run:
        result = pretrain(params, model_config, tokens_dir, tokenizer_dir, out_dir, resume=resume,
                          until_step=until_step, callbacks=[run.callback], metadata={TRACKING_RUN_KEY: run.run_id},
                          base=base)
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
    base = _checkpoint_config(base_dir)
    logged = training_params(params, base.get("model", {}), base.get("tokenizer", {}))
    previous = _resumed_run_id(out_dir, lambda: finetune_identity(params, base_dir, chat_dir), enabled and resume)
    name = training_run_name("finetune", logged, base_version=parent.get("model_version"))
    with _run("finetune", logged, enabled, resume_run_id=previous, run_name=name) as run:
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


def _tokenizer_of_tokens(tokens_dir: Path) -> dict[str, Any]:
    """Kind and vocabulary size of the tokenizer that made the token files (their ``meta.json``)."""
    try:
        meta = json.loads((Path(tokens_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}  # pretraining itself says what is wrong with the token folder
    return {"kind": meta.get("tokenizer_kind"), "vocab_size": meta.get("vocab_size")}


def _checkpoint_config(checkpoint_dir: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` (model shape, tokenizer, step); empty when unreadable (training says why)."""
    from llm.model.checkpoint import CONFIG_FILE

    try:
        return json.loads((Path(checkpoint_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}


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
    # the step-wise metrics went through the callback (their last values are the final ones: the last step
    # validates and measures throughput); the summary adds what has no step of its own
    run.log_metrics(summary_metrics(result.metrics), step=result.step)
    _log_training_files(run, result, out_dir)
    if not register:
        return None
    from llm.mlops.registry import RegistrationError, register_checkpoint
    from llm.mlops.tracking import lineage_tags

    version_tags = {**lineage_tags(stage, logged), "llm.stage": stage, **(tags or {})}
    description = version_description(stage, logged, result.metrics, version_tags, run_name=run.run_name)
    try:
        return register_checkpoint(out_dir, run_id=run.run_id, tags=version_tags, description=description)
    except RegistrationError:
        _write_registration(out_dir, {"run_id": run.run_id, "model_version": None, "stage": stage,
                                      "tags": version_tags})
        raise


SUMMARY_KEYS = {"val/best_loss": "val/best_loss", "params": "model/parameters", "wall_time_s": "perf/wall_time_s",
                "step": "train/steps"}


def summary_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The training summary's values that no step logged, under the keys a run shows: ``val/best_loss``,
    ``model/parameters``, ``perf/wall_time_s`` (training time, evaluation and checkpoints left out) and
    ``train/steps``."""
    return {key: float(metrics[name]) for name, key in SUMMARY_KEYS.items() if name in metrics}


def version_description(stage: str, logged: Mapping[str, Any], metrics: Mapping[str, float],
                        tags: Mapping[str, str], *, run_name: str | None = None) -> str:
    """The registry page's description of a version that a training stage registers (markdown): what it was
    trained from, on which data, its key metrics. Evaluation adds its promotion decision below it."""
    model, tok, train = logged.get("model", {}), logged.get("tokenizer", {}), logged.get("train", {})
    layers = model.get("n_layer")
    kv = f" ({model['n_kv_head']} key/value)" if model.get("n_kv_head") else ""
    shape = (f"{layers} layer{'' if layers == 1 else 's'} x {model.get('d_model')} wide, {model.get('n_head')} "
             f"heads{kv}, context {model.get('context_length')}")
    size = f"{metrics['params'] / 1e6:.2f}M parameters" if "params" in metrics else "unknown size"
    if stage == "finetune":
        parent = tags.get("llm.parent_version", "none")
        origin = (f"Chat model finetuned from **gpt version {parent}**" if parent != "none"
                  else "Chat model finetuned from an unregistered base checkpoint")
        origin += f" (run `{tags.get('llm.parent_run_id', 'none')}`) on chat conversations"
        if train.get("method") == "lora":
            lora = train.get("lora") or {}
            origin += (f", as LoRA adapters (rank {lora.get('rank')} on {', '.join(lora.get('targets', []))}): the "
                       "version stores the adapters and its base's identity, and loads merged")
    else:
        origin = "Base model pretrained from scratch on the corpus"
    data = tags.get("dvc.data_hash", "none")
    lines = [
        f"{origin}: {shape}; {tok.get('kind')} tokenizer of {tok.get('vocab_size')} tokens; {size}.",
        "",
        f"- Trained: {int(metrics.get('step', train.get('max_steps', 0)))} steps, batch {train.get('batch_size')}, "
        f"learning rate {train.get('learning_rate')}, in {metrics.get('wall_time_s', float('nan')):.0f} s"
        + (f" (run `{run_name}`)" if run_name else ""),
        f"- Data: version `{data[:12]}` ({tags.get('dvc.data_source', 'unknown')}), "
        f"code at git `{tags.get('git.commit', 'unknown')[:12]}`"
        + (" (with uncommitted changes)" if tags.get("git.dirty") == "true" else ""),
        "- Validation: " + ", ".join(f"{key} {metrics[key]:.4f}" for key in ("val/bpb", "val/loss", "val/ppl")
                                     if key in metrics),
    ]
    return "\n".join(lines)


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


def register_stage(checkpoint_dir: Path, *, run_id: str | None = None, force: bool = False) -> dict:
    """Register a finished training checkpoint as a version of ``gpt`` after the fact: when its training stage
    could not reach the tracking store, or ran untracked. Under ``run_id``, else the run its
    ``registration.json`` names, else a new run ``register``; with the tags the training stage chose, when it
    recorded them. A version that already holds these weights is reused. Writes ``registration.json`` and
    returns it.

    Raises CheckpointError for an incomplete checkpoint, or one whose training stopped before its
    ``max_steps`` (step N of M) unless ``force``; RegistryError/RegistrationError as
    ``llm.mlops.registry.register_checkpoint`` does.
    """
    from llm.mlops.registry import register_checkpoint
    from llm.model.checkpoint import CheckpointError, verify_checkpoint

    config = verify_checkpoint(checkpoint_dir)
    step, max_steps = config.get("step"), (config.get("params") or {}).get("max_steps")
    if not force and isinstance(step, int) and isinstance(max_steps, int) and step < max_steps:
        raise CheckpointError(f"{checkpoint_dir}: training stopped at step {step} of {max_steps} (interrupted or "
                              "--until-step): run the stage again to finish it, or register this checkpoint "
                              "anyway with `llm register --force`")
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


def _comparable_score(model, tokenizer, kind: str, params: EvalParams, clean_dir: Path,
                      chat_val: Path | None) -> dict[str, Any]:
    """The score promotion compares, for a loaded model: bits per byte of held-out text that any model is scored
    on alike, whatever its tokenizer. A chat model: the final assistant answers of the chat val conversations
    (``chat/assistant_bpb``; ``answers`` holds each answer's bits and bytes); a base model: the val split
    (``val/bpb``). Returns ``{"metric", "score", "text", "text_sha256"}``: two scores compare only when their
    ``text_sha256`` agree (and, for answers, over the answers both models' contexts fit)."""
    from llm.io import sha256_file

    if kind == "chat":
        from llm.training.finetune import answer_bits, answers_bpb, held_out_conversations

        answers = answer_bits(model, tokenizer, held_out_conversations(chat_val, params.max_conversations))
        own = answers_bpb(answers)
        return {"metric": "chat/assistant_bpb", "score": own["bpb"], "answers": answers,
                "text": _answers_text(own, chat_val),
                "text_sha256": f"{sha256_file(chat_val)}:{params.max_conversations or 'all'}"}
    from llm.training.evaluate import text_bits_per_byte

    scored = text_bits_per_byte(model, tokenizer, clean_dir / "val.txt", params)
    return {"metric": "val/bpb", "score": scored["bpb"], "text_sha256": scored["text_sha256"],
            "text": f"the val split {clean_dir / 'val.txt'} ({scored['bytes']:,} bytes)"}


def _answers_text(scored: dict[str, Any], chat_val: Path | None) -> str:
    return f"the final assistant answers of {scored['answers']} conversations of {chat_val} ({scored['bytes']:,} bytes)"


def _model_kind(config: Mapping[str, Any]) -> str:
    return "chat" if config.get("stage") == "finetune" else "base"


def _production_comparison(current, kind: str, candidate: dict[str, Any], params: EvalParams, clean_dir: Path,
                           chat_val: Path | None) -> dict[str, Any]:
    """The candidate's and Production's scores on the same text: ``{"candidate_score", "production_score",
    "text"}``, or ``{"incomparable": why}`` (another kind of model, other text, no answer both contexts fit)."""
    from llm.mlops.registry import resolve_model
    from llm.model.checkpoint import load_checkpoint
    from llm.training.device import select_device
    from llm.training.finetune import answers_bpb

    version = current.version
    model, tokenizer, config = load_checkpoint(resolve_model(f"models:/gpt/{version}"), select_device(params.device))
    if _model_kind(config) != kind:
        return {"incomparable": f"Production version {version} is a {_model_kind(config)} model and this one a "
                                f"{kind} model: they are scored on different texts (assistant answers, the val split)"}
    try:
        theirs = _comparable_score(model, tokenizer, kind, params, clean_dir, chat_val)
    except ValueError as err:
        return {"incomparable": f"Production version {version} cannot be scored on {candidate['text']} ({err})"}
    if theirs["text_sha256"] != candidate["text_sha256"]:
        return {"incomparable": f"Production version {version} was scored on other text ({theirs['text']})"}
    if kind != "chat":
        return {"candidate_score": candidate["score"], "production_score": theirs["score"], "text": candidate["text"]}
    common = set(candidate["answers"]) & set(theirs["answers"])
    if not common:
        return {"incomparable": f"no held-out answer fits the contexts of both this model and Production version "
                                f"{version}"}
    mine = answers_bpb(candidate["answers"], common)
    fit = "" if len(common) == max(len(candidate["answers"]), len(theirs["answers"])) else ", those both contexts fit"
    return {"candidate_score": mine["bpb"], "production_score": answers_bpb(theirs["answers"], common)["bpb"],
            "text": _answers_text(mine, chat_val) + fit}


def _score_candidate(candidate, candidate_dir: Path, tokens_dir: Path, params: EvalParams, out_dir: Path,
                     chat_val: Path | None) -> tuple[dict, list, list | None]:
    """Metrics and samples of the loaded candidate: loss, ppl, bpb on the token file; for a chat model also
    its assistant loss (nats per assistant token, and its base model's), and answers to held-out conversations."""
    from llm.training.evaluate import evaluate_checkpoint, sample_conversations

    result = evaluate_checkpoint(candidate_dir, tokens_dir, params, out_dir=out_dir, loaded=candidate)
    samples, conversations = result.pop("samples"), None
    if _model_kind(candidate.config) == "chat":
        from llm.training.finetune import assistant_loss

        result["chat/assistant_loss"] = assistant_loss(candidate.model, candidate.tokenizer, chat_val,
                                                       max_conversations=params.max_conversations)
        conversations = sample_conversations(candidate_dir, chat_val, params, loaded=candidate)
        base_dir = Path(candidate.config["parent"]["path"])
        if base_dir.exists():
            result["chat/base_assistant_loss"] = assistant_loss(base_dir, None, chat_val, device=params.device,
                                                                max_conversations=params.max_conversations)
    return result, samples, conversations


def _promotion(params: EvalParams, registration: dict, kind: str, comparable: dict[str, Any], clean_dir: Path,
               chat_val: Path | None, run) -> dict[str, Any]:
    """Compare the registered candidate with Production on ``comparable``'s text and promote it if it is better
    (``llm.mlops.registry.compare_and_promote``); a decision taken before on this candidate is kept."""
    from llm.mlops.registry import compare_and_promote, production_version, recorded_decision

    version, metric, score = str(registration["model_version"]), comparable["metric"], comparable["score"]
    current = production_version()
    if recorded_decision(version) is not None:  # decided once (a rerun, a retry): kept
        return compare_and_promote(version, score, None, metric=metric)
    if current is not None and str(current.version) == version:
        return {"promoted": False, "metric": metric, "candidate_score": score, "candidate": version,
                "reason": f"version {version} is already Production"}
    compared: dict[str, Any] = {"candidate_score": score, "text": comparable["text"]}
    if current is not None:
        compared = _production_comparison(current, kind, comparable, params, clean_dir, chat_val)
        if compared.get("production_score") is not None:
            run.log_metrics({f"production/{metric}": compared["production_score"]})
    return compare_and_promote(version, compared.get("candidate_score", score), compared.get("production_score"),
                               metric=metric, lower_is_better=True, incomparable=compared.get("incomparable"),
                               text=compared.get("text", comparable["text"]))


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
    """Score the candidate checkpoint, and the current Production model on the same held-out text, and promote
    the candidate to Production only if it is better.

    The comparison is in bits per byte of the same text, whatever the tokenizers (``_comparable_score``): the
    val split for base models, the final assistant answers of ``chat_dir/val.jsonl`` for chat models. A
    candidate of another kind than Production, or scored on other text, is not promoted (the reason says how
    to promote it by hand). The metrics also hold val loss, ppl and bpb on the token file and, for a chat
    model, its assistant loss and its base model's. Writes ``metrics.json``, ``samples.md`` and
    ``promotion.json`` into ``out_dir``; returns metrics and decision.
    """
    from llm.model.checkpoint import load_checkpoint
    from llm.training.device import select_device
    from llm.training.evaluate import samples_markdown

    enabled = tracking_enabled(track)
    registration = read_registration(candidate_dir)
    candidate = load_checkpoint(candidate_dir, select_device(params.device))
    kind = _model_kind(candidate.config)
    chat_val = chat_dir / "val.jsonl" if chat_dir is not None else None
    if kind == "chat" and (chat_val is None or not chat_val.exists()):
        raise FileNotFoundError(f"{candidate_dir} is a finetuned model: its evaluation needs the chat val "
                                f"conversations ({chat_val}); run the finetune stage first")
    what = f"v{registration['model_version']}" if registration.get("model_version") else str(candidate_dir)
    with _run("evaluate", params.model_dump(), enabled, run_name=f"evaluate {candidate.config.get('stage', 'model')} "
              f"{what}") as run:
        result, samples, conversations = _score_candidate(candidate, candidate_dir, tokens_dir, params, out_dir,
                                                          chat_val)
        comparable = _comparable_score(candidate.model, candidate.tokenizer, kind, params, clean_dir, chat_val)
        result[comparable["metric"]] = comparable["score"]
        del candidate  # scored and sampled: let go before the Production model is loaded
        atomic_write_text(out_dir / "samples.md", samples_markdown(samples, conversations))
        atomic_write_json(out_dir / "metrics.json", {**result, "eval/step": result.get("eval/step", 0)},
                          sort_keys=True)
        if conversations is not None:
            run.log_text(json.dumps(conversations, indent=2, ensure_ascii=False), "sample_conversations.json")
        run.log_metrics({k: float(v) for k, v in result.items()})
        _log_chat_scores_on_training_run(enabled, kind, registration, result)
        run.log_artifact(out_dir / "samples.md")
        decision: dict[str, Any] = {"promoted": False, "metric": comparable["metric"],
                                    "candidate_score": comparable["score"],
                                    "reason": "tracking disabled: no registry to promote in"}
        if enabled and promote and registration.get("model_version"):
            decision = _promotion(params, registration, kind, comparable, clean_dir, chat_val, run)
        elif enabled and promote:
            decision["reason"] = (f"{candidate_dir / REGISTRATION_FILE} names no registered version "
                                  "(run the training stage tracked)")
        run.set_tags({"promotion.promoted": str(decision["promoted"]).lower()})
        run.log_text(json.dumps(decision, indent=2), "promotion.json")
    atomic_write_json(out_dir / "promotion.json", decision, sort_keys=True)
    return {**result, "promotion": decision, "samples": samples}


def _log_chat_scores_on_training_run(enabled: bool, kind: str, registration: dict, result: dict) -> None:
    """A chat model's evaluation scores beside its finetuning run's own metrics."""
    if not (enabled and kind == "chat" and registration.get("run_id")):
        return
    from llm.mlops.tracking import log_final_metrics

    scores = {k: result[k] for k in ("chat/assistant_loss", "chat/assistant_bpb") if k in result}
    log_final_metrics(registration["run_id"], scores, step=int(result.get("eval/step", 0)))


def export_stage(params: ExportParams, checkpoint_dir: Path, out_dir: Path, *, hf_dir: Path | None = None,
                 track: bool | None = None) -> dict:
    """Export ``checkpoint_dir`` to ONNX in ``out_dir`` (with its parity report) and log the run; with
    ``hf_dir``, also the Transformers folder there when ``params.hf`` is on (``export_hf_stage``), else a
    README in it saying how to turn it on (the pipeline declares the folder, so it always exists).

    Raises ExportError, leaving no complete-looking folder, when ONNX Runtime does not match PyTorch, and
    InteropError when the model has no Transformers architecture or Transformers does not match it.
    """
    if hf_dir is not None and params.hf:  # a shape Transformers cannot take fails before the ONNX export
        from llm.interop.hf import hf_architecture
        from llm.model.checkpoint import load_model_config

        hf_architecture(load_model_config(checkpoint_dir))
    summary = _export_onnx_stage(params, checkpoint_dir, out_dir, track=track)
    if hf_dir is not None and params.hf:
        summary["hf"] = export_hf_stage(checkpoint_dir, hf_dir, atol=params.atol, track=track)
    elif hf_dir is not None:
        from llm.io import atomic_folder

        with atomic_folder(hf_dir) as tmp:
            atomic_write_text(tmp / "README.md", "No Transformers export: set `hf: true` in params/export.yaml "
                              "(GPT-2, Llama or Qwen3 shaped models), or run `llm export hf`.\n")
    return summary


def _export_onnx_stage(params: ExportParams, checkpoint_dir: Path, out_dir: Path, *, track: bool | None) -> dict:
    from llm.inference.export import export_onnx

    version = read_registration(checkpoint_dir).get("model_version")
    name = f"export v{version}" if version else f"export {checkpoint_dir}"
    with _run("export", params.model_dump(), tracking_enabled(track), run_name=name) as run:
        summary = export_onnx(checkpoint_dir, out_dir, opset=params.opset, quantize=params.quantize,
                              verify=params.verify, atol=params.atol, static_cache=params.static_cache)
        parity = summary.get("parity", {})
        run.log_metrics({f"export/{k}": float(v) for k, v in parity.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_metrics({"export/model_bytes": float(sum(summary["files"].values()))})
        for name in ("parity.json", "generation_config.json"):
            if (out_dir / name).exists():
                run.log_artifact(out_dir / name)
        summary["model_version"] = _attach_export(checkpoint_dir, out_dir) if tracking_enabled(track) else None
    return summary


def _attach_export(checkpoint_dir: Path, export_dir: Path, kind: str = "onnx") -> str | None:
    """Attach the export in ``export_dir`` (``kind``: ``onnx`` or ``hf``) to the registered version of
    ``checkpoint_dir`` (named in its ``registration.json``). Returns the version, or None (with a warning)
    when there is none."""
    registration = read_registration(checkpoint_dir)
    version, run_id = registration.get("model_version"), registration.get("run_id")
    if not version or not run_id:
        log.warning("%s names no registered version: the %s export is not attached to one",
                    checkpoint_dir / REGISTRATION_FILE, "ONNX" if kind == "onnx" else "Transformers")
        return None
    from llm.mlops.registry import attach_hf_export, attach_onnx_export

    (attach_onnx_export if kind == "onnx" else attach_hf_export)(str(version), run_id, export_dir)
    return str(version)


def import_hf_stage(folder: Path, out_dir: Path, *, context_length: int | None = None) -> dict:
    """Convert a local Transformers ``save_pretrained`` folder into the checkpoint folder ``out_dir``
    (``llm.interop.hf.import_hf``); returns its summary. Not tracked: nothing is trained."""
    from llm.interop.hf import import_hf

    return import_hf(folder, out_dir, context_length=context_length)


def export_hf_stage(checkpoint_dir: Path, out_dir: Path, *, verify: bool = True, atol: float = 1e-4,
                    track: bool | None = None, adapter_only: bool = False) -> dict:
    """Write ``checkpoint_dir`` as a Transformers folder ``out_dir`` checked by loading it back
    (``llm.interop.hf.export_hf``), log the run, and attach the folder to the checkpoint's registered version
    as the ONNX export is. With ``adapter_only``, write the adapters of a LoRA checkpoint in peft's format
    instead (``export_peft_adapter``; not tracked). Raises InteropError for a shape Transformers has no
    architecture for, and for ``adapter_only`` on a checkpoint without adapters."""
    from llm.interop.hf import PARITY_FILE, export_hf, export_peft_adapter

    if adapter_only:
        return export_peft_adapter(checkpoint_dir, out_dir)

    with _run("export_hf", {"verify": verify, "atol": atol}, tracking_enabled(track)) as run:
        summary = export_hf(checkpoint_dir, out_dir, verify=verify, atol=atol)
        parity = summary.get("parity", {})
        run.log_metrics({f"export_hf/{k}": float(v) for k, v in parity.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if (out_dir / PARITY_FILE).exists():
            run.log_artifact(out_dir / PARITY_FILE)
        summary["model_version"] = (_attach_export(checkpoint_dir, out_dir, kind="hf")
                                    if tracking_enabled(track) else None)
    return summary
