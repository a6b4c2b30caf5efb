"""The pipeline stages, one function each: typed params and paths in, outputs on disk, a result dict out.

These are the functions that the ``llm`` CLI, the Prefect tasks in ``flows/`` and ``dvc.yaml`` all reach.
Each stage run is an MLflow run (params, lineage tags, metrics, artifacts) unless ``track=False``;
pretraining registers a version of the model ``gpt`` and evaluation decides whether it becomes Production.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.config import DataParams, EvalParams, ModelConfig, PretrainParams, TokenizerParams

log = logging.getLogger(__name__)

REGISTRATION_FILE = "registration.json"


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes, relative to the project root (the DESIGN.md layout)."""

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


def tracking_enabled(track: bool | None) -> bool:
    """``track`` if given, else on unless the environment sets ``LLM_TRACKING=0``."""
    if track is not None:
        return track
    return os.environ.get("LLM_TRACKING", "1").lower() not in ("0", "false", "no", "off")


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def fetch_stage(source: str, dest: Path) -> list[Path]:
    """Build the raw corpus folder from ``source`` (``default``, a folder or an http(s) URL)."""
    from llm.corpus import fetch_corpus

    return fetch_corpus(source, dest)


def clean_stage(params: DataParams, corpus_dir: Path, out_dir: Path, *, track: bool | None = None) -> dict:
    """Clean, deduplicate and split the corpus; returns the statistics written to ``stats.json``."""
    from llm.clean import clean_corpus
    from llm.tracking import stage_run

    with stage_run("clean", params.model_dump(), enabled=tracking_enabled(track)) as run:
        stats = clean_corpus(params, corpus_dir, out_dir)
        run.log_metrics({f"data/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))})
        run.log_artifact(out_dir / "stats.json")
    return stats


def tokenizer_stage(params: TokenizerParams, clean_dir: Path, out_dir: Path, *, track: bool | None = None) -> dict:
    """Train the tokenizer on the cleaned train split; returns its kind and size."""
    from llm.tokenizer import train_tokenizer_on_split
    from llm.tracking import stage_run

    with stage_run("tokenizer", params.model_dump(), enabled=tracking_enabled(track)) as run:
        tok = train_tokenizer_on_split(params, clean_dir / "train.txt", out_dir)
        run.log_metrics({"tokenizer/vocab_size": float(tok.vocab_size)})
    return {"kind": tok.kind, "vocab_size": tok.vocab_size}


def tokenize_stage(clean_dir: Path, tokenizer_dir: Path, out_dir: Path, *, track: bool | None = None) -> dict:
    """Encode the cleaned splits into token files; returns ``meta.json``."""
    from llm.tokens import tokenize_corpus
    from llm.tracking import stage_run

    with stage_run("tokenize", {}, enabled=tracking_enabled(track)) as run:
        meta = tokenize_corpus(clean_dir, tokenizer_dir, out_dir)
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
    from llm.train import pretrain
    from llm.tracking import stage_run

    enabled = tracking_enabled(track)
    logged = {"pretrain": params.model_dump(), "model": model_config.model_dump()}
    with stage_run("pretrain", logged, enabled=enabled) as run:
        result = pretrain(params, model_config, tokens_dir, tokenizer_dir, out_dir, resume=resume,
                          until_step=until_step, callbacks=[run.callback])
        run.log_metrics({k: v for k, v in result.metrics.items() if "/" in k}, step=result.step)
        _log_run_outputs(run, out_dir, result.history)
        version = None
        finished = result.step >= params.max_steps
        if enabled and register and finished:
            from llm.registry import register_checkpoint
            from llm.tracking import lineage_tags

            version = register_checkpoint(out_dir, run_id=run.run_id, tags={**lineage_tags("pretrain", logged),
                                                                           "llm.stage": "pretrain"})
    registration = {"run_id": run.run_id, "model_version": version, "stage": "pretrain"}
    _atomic_json(out_dir / REGISTRATION_FILE, registration)
    return {**result.metrics, **registration}


def _log_run_outputs(run, out_dir: Path, history: list[dict]) -> None:
    run.log_artifact(out_dir / "config.json")
    run.log_artifact(out_dir / "metrics.json")
    run.log_artifacts(out_dir / "curve", "curve")
    run.log_loss_curve(history)


def evaluate_stage(
    params: EvalParams,
    candidate_dir: Path,
    tokens_dir: Path,
    clean_dir: Path,
    out_dir: Path,
    *,
    track: bool | None = None,
    promote: bool = True,
) -> dict:
    """Score the candidate checkpoint and the current Production model on the same validation text and
    promote the candidate if it is better (lower bits per byte, which does not depend on the tokenizer).

    Writes ``metrics.json``, ``samples.md`` and ``promotion.json`` into ``out_dir``; returns the metrics
    and the decision.
    """
    from llm.evaluate import evaluate_checkpoint, evaluate_on_text
    from llm.tracking import stage_run

    enabled = tracking_enabled(track)
    registration_file = candidate_dir / REGISTRATION_FILE
    registration = json.loads(registration_file.read_text()) if registration_file.exists() else {}
    with stage_run("evaluate", params.model_dump(), enabled=enabled) as run:
        result = evaluate_checkpoint(candidate_dir, tokens_dir, params, out_dir=out_dir)
        samples = result.pop("samples")
        run.log_metrics({k: float(v) for k, v in result.items()})
        run.log_artifact(out_dir / "samples.md")
        decision: dict[str, Any] = {"promoted": False, "reason": "tracking disabled: no registry to promote in"}
        candidate_version = registration.get("model_version")
        if enabled and promote and candidate_version:
            from llm.registry import compare_and_promote, production_version, resolve_model

            current = production_version()
            production_score = None
            if current is not None and str(current.version) != str(candidate_version):
                production_dir = resolve_model(f"models:/gpt/{current.version}")
                production_score = evaluate_on_text(production_dir, clean_dir / "val.txt", params)["val/bpb"]
                run.log_metrics({"production/val_bpb": production_score})
            candidate_score = result["val/bpb"]  # same text, same windows as evaluate_on_text would use
            if current is not None and str(current.version) == str(candidate_version):
                decision = {"promoted": False, "reason": f"version {candidate_version} is already Production",
                            "candidate": candidate_version, "candidate_score": candidate_score}
            else:
                decision = compare_and_promote(str(candidate_version), candidate_score, production_score,
                                               metric="val/bpb", lower_is_better=True)
        elif not candidate_version and enabled:
            decision["reason"] = f"{registration_file} names no registered version (run the pretrain stage tracked)"
        run.set_tags({"promotion.promoted": str(decision["promoted"]).lower()})
        run.log_text(json.dumps(decision, indent=2), "promotion.json")
    _atomic_json(out_dir / "promotion.json", decision)
    return {**result, "promotion": decision, "samples": samples}
