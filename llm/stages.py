"""The pipeline stages, one function each: typed params and paths in, outputs on disk, a result dict out.

These are the functions that the ``llm`` CLI, the Prefect tasks in ``flows/`` and ``dvc.yaml`` all reach. Each
reads as its phases: load the inputs, call the library (``llm.data``, ``llm.training``, ``llm.inference``,
``llm.interop``), hand the results to tracking. Tracking is a ``llm.mlops.stage_tracking.Tracker``: each stage
run is an MLflow run (params, lineage tags, metrics, artifacts) unless ``track=False``, when an untracked
stand-in that imports no MLflow takes its place; pretraining and finetuning register a version of the model
``gpt`` and evaluation decides whether it becomes Production (``llm.mlops.registry.promote_if_better``).
"""

from __future__ import annotations

import json
import logging
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
from llm.mlops.stage_tracking import (
    CHAT_SCORES,
    MlflowTracker,
    read_registration,
    stage_tracker,
    tracking_enabled,
    training_params,
    write_registration,
)
from llm.training.launch import run_launched  # light: torch is imported only when the stage launches

if TYPE_CHECKING:
    from llm.data.clean import ShardMapper

log = logging.getLogger(__name__)


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

    with stage_tracker(track).run("clean", params.model_dump()) as run:
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
    with stage_tracker(track).run("tokenizer", logged) as run:
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

    with stage_tracker(track).run("tokenize", {}) as run:
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
    register the checkpoint as a new version of ``gpt``. A resumed training (``llm.training.loop`` decides)
    continues the MLflow run its checkpoint records.

    Returns the final metrics plus ``run_id`` and ``model_version`` (None when untracked or stopped
    early with ``until_step``). The registration is also written to ``out_dir/registration.json``.
    With ``params.launch`` asking for several processes, the stage runs itself under ``torch.distributed.run``
    (``llm.training.launch``) and returns what its rank 0 returned.
    """
    if (launched := run_launched(pretrain_stage, params.launch, params.device, locals())) is not None:
        return launched
    from llm.training.pretrain import pretrain

    check_until_step(until_step)
    tracker = stage_tracker(track, params.tracking)
    tokenizer = _tokenizer_of_tokens(tokens_dir)
    # vocab_size unset means the tokenizer's: logged as the number, as a finetune of this model logs it
    model = {**model_config.model_dump(), "vocab_size": model_config.vocab_size or tokenizer.get("vocab_size")}
    logged = training_params(params, model, tokenizer)
    if base is not None and base.hf_folder:
        logged["base"] = base.model_dump()
    with tracker.training_run("pretrain", logged) as run:
        result = pretrain(params, model_config, tokens_dir, tokenizer_dir, out_dir, resume=resume,
                          until_step=until_step, callbacks=[run.callback], start_tracking=run.start, base=base)
        registration = tracker.finish_training(run, result, out_dir,
                                               register=register and result.step >= params.max_steps)
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

    Returns the final metrics plus ``run_id`` and ``model_version``. With ``params.launch`` asking for several
    processes, the stage runs itself under ``torch.distributed.run`` (``llm.training.launch``).
    """
    if (launched := run_launched(finetune_stage, params.launch, params.device, locals())) is not None:
        return launched
    from llm.data.chat_data import prepare_chat_data
    from llm.model.checkpoint import peek_config
    from llm.training.finetune import finetune

    check_until_step(until_step)
    tracker = stage_tracker(track, params.tracking)
    parent = read_registration(base_dir)
    parent_tags = {"llm.parent_run_id": parent.get("run_id") or "none",
                   "llm.parent_version": parent.get("model_version") or "none"}
    chat_stats = prepare_chat_data(chat_source, clean_dir, chat_dir, params.chat_data)
    base = peek_config(base_dir)  # unreadable: empty here, and finetuning says why
    logged = training_params(params, base.model, base.tokenizer)
    with tracker.training_run("finetune", logged, base_version=parent.get("model_version"), tags=parent_tags,
                              artifacts=(chat_dir / "stats.json",)) as run:
        result = finetune(params, base_dir, chat_dir, out_dir, resume=resume, until_step=until_step,
                          callbacks=[run.callback], start_tracking=run.start)
        registration = tracker.finish_training(
            run, result, out_dir, register=register and result.step >= params.max_steps,
            tags={"llm.finetuned": "true", **parent_tags},
            registration={"parent_run_id": parent.get("run_id"), "parent_version": parent.get("model_version")})
    return {**result.metrics, **registration, "chat_data": {k: chat_stats.get(k) for k in ("train", "val")}}


def _tokenizer_of_tokens(tokens_dir: Path) -> dict[str, Any]:
    """Kind and vocabulary size of the tokenizer that made the token files (their ``meta.json``)."""
    try:
        meta = json.loads((Path(tokens_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}  # pretraining itself says what is wrong with the token folder
    return {"kind": meta.get("tokenizer_kind"), "vocab_size": meta.get("vocab_size")}


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
    step, max_steps = config.step, config.max_steps
    if not force and isinstance(step, int) and isinstance(max_steps, int) and step < max_steps:
        raise CheckpointError(f"{checkpoint_dir}: training stopped at step {step} of {max_steps} (interrupted or "
                              "--until-step): run the stage again to finish it, or register this checkpoint "
                              "anyway with `llm register --force`")
    previous = read_registration(checkpoint_dir)
    stage = previous.get("stage") or config.stage or "pretrain"
    tags = previous.get("tags") or {"llm.stage": stage, **({"llm.finetuned": "true"} if stage == "finetune" else {})}
    run_id = run_id or previous.get("run_id")
    if run_id is None:
        with MlflowTracker().run("register", {"checkpoint": str(checkpoint_dir), "stage": stage}) as run:
            version = register_checkpoint(checkpoint_dir, run_id=run.run_id, tags=tags)
        run_id = run.run_id
    else:
        version = register_checkpoint(checkpoint_dir, run_id=run_id, tags=tags)
    registration = {"run_id": run_id, "model_version": version, "stage": stage}
    if stage == "finetune":
        registration.update(parent_run_id=_none_if_missing(tags.get("llm.parent_run_id")),
                            parent_version=_none_if_missing(tags.get("llm.parent_version")))
    return write_registration(checkpoint_dir, registration)


def _none_if_missing(value: str | None) -> str | None:
    return None if value in (None, "none") else value


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

    The comparison is in bits per byte of the same text, whatever the tokenizers
    (``llm.training.evaluate.comparable_score``): the val split for base models, the final assistant answers of
    ``chat_dir/val.jsonl`` for chat models. A candidate of another kind than Production, or scored on other text,
    is not promoted (the reason says how to promote it by hand). The metrics also hold val loss, ppl and bpb on
    the token file and, for a chat model, its assistant loss and its base model's. Writes ``metrics.json``,
    ``samples.md`` and ``promotion.json`` into ``out_dir``; returns metrics and decision.
    """
    from llm.model.checkpoint import load_checkpoint
    from llm.training.device import select_device
    from llm.training.evaluate import comparable_score, compare_with, model_kind, score_candidate

    tracker = stage_tracker(track, params.tracking)
    registration = read_registration(candidate_dir)
    candidate = load_checkpoint(candidate_dir, select_device(params.device))
    kind = model_kind(candidate.config)
    chat_val = _chat_val(chat_dir, kind, candidate_dir)
    what = f"v{registration['model_version']}" if registration.get("model_version") else str(candidate_dir)
    with tracker.run("evaluate", params.model_dump(exclude={"tracking"}),
                     run_name=f"evaluate {candidate.config.get('stage', 'model')} {what}") as run:
        result, samples, conversations = score_candidate(candidate, candidate_dir, tokens_dir, params, out_dir,
                                                         chat_val)
        comparable = comparable_score(candidate.model, candidate.tokenizer, kind, params, clean_dir, chat_val)
        result[comparable["metric"]] = comparable["score"]
        del candidate  # scored and sampled: let go before the Production model is loaded
        _write_evaluation(out_dir, result, samples, conversations)
        if conversations is not None:
            run.log_text(json.dumps(conversations, indent=2, ensure_ascii=False), "sample_conversations.json")
        run.log_metrics({k: float(v) for k, v in result.items()})
        tracker.log_on_training_run(registration, {k: result[k] for k in CHAT_SCORES if k in result},
                                    step=int(result.get("eval/step", 0)))
        run.log_artifact(out_dir / "samples.md")
        decision = tracker.promote(run, registration, candidate_dir, comparable, enabled=promote, compare=lambda
                                   production, name: compare_with(production, name, kind, comparable, params,
                                                                  clean_dir, chat_val))
    atomic_write_json(out_dir / "promotion.json", decision, sort_keys=True)
    return {**result, "promotion": decision, "samples": samples}


def _chat_val(chat_dir: Path | None, kind: str, candidate_dir: Path) -> Path | None:
    """The held-out chat conversations a model of ``kind`` is scored on. Raises FileNotFoundError when a chat
    model has none."""
    chat_val = chat_dir / "val.jsonl" if chat_dir is not None else None
    if kind == "chat" and (chat_val is None or not chat_val.exists()):
        raise FileNotFoundError(f"{candidate_dir} is a finetuned model: its evaluation needs the chat val "
                                f"conversations ({chat_val}); run the finetune stage first")
    return chat_val


def _write_evaluation(out_dir: Path, result: dict, samples: list, conversations: list | None) -> None:
    """``samples.md`` and ``metrics.json`` of an evaluation."""
    from llm.training.evaluate import samples_markdown

    atomic_write_text(out_dir / "samples.md", samples_markdown(samples, conversations))
    atomic_write_json(out_dir / "metrics.json", {**result, "eval/step": result.get("eval/step", 0)}, sort_keys=True)


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
    tracker = stage_tracker(track)
    with tracker.run("export", params.model_dump(), run_name=name) as run:
        summary = export_onnx(checkpoint_dir, out_dir, opset=params.opset, quantize=params.quantize,
                              verify=params.verify, atol=params.atol, static_cache=params.static_cache)
        parity = summary.get("parity", {})
        run.log_metrics({f"export/{k}": float(v) for k, v in parity.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_metrics({"export/model_bytes": float(sum(summary["files"].values()))})
        for name in ("parity.json", "generation_config.json"):
            if (out_dir / name).exists():
                run.log_artifact(out_dir / name)
        summary["model_version"] = tracker.attach_export(checkpoint_dir, out_dir)
    return summary


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

    tracker = stage_tracker(track)
    with tracker.run("export_hf", {"verify": verify, "atol": atol}) as run:
        summary = export_hf(checkpoint_dir, out_dir, verify=verify, atol=atol)
        parity = summary.get("parity", {})
        run.log_metrics({f"export_hf/{k}": float(v) for k, v in parity.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if (out_dir / PARITY_FILE).exists():
            run.log_artifact(out_dir / PARITY_FILE)
        summary["model_version"] = tracker.attach_export(checkpoint_dir, out_dir, kind="hf")
    return summary
