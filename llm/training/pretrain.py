"""Pretraining: a GPT from scratch on the token files of the tokenize stage.

``PretrainData`` is the ``BatchSource`` (random windows of the train split, fixed windows of the val
split); ``pretrain`` checks that the tokenizer and the token files agree, builds the model and hands
both to the training loop, ``llm.training.loop.train``, with the hashes of the token files and the
tokenizer as the run's inputs (``pretrain_inputs``), so a checkpoint resumes only on the same data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llm.config import BaseParams, ModelConfig, PretrainParams
from llm.data.tokenizer import load_tokenizer
from llm.data.tokens import TokenFile, read_meta
from llm.io import sha256_tree
from llm.model.gpt import GPT
from llm.training.loop import (
    Batch,
    Callback,
    StartTracking,
    TrainResult,
    code_digests,
    identity_digest,
    run_identity,
    train,
)

log = logging.getLogger(__name__)


class PretrainData:
    """Random windows of the train split; validation on evenly spread windows of the val split."""

    def __init__(self, tokens_dir: str | Path, batch_size: int, context_length: int, eval_batches: int):
        self.train = TokenFile(tokens_dir, "train")
        self.val = TokenFile(tokens_dir, "val")
        self.batch_size, self.block, self.eval_batches = batch_size, context_length, eval_batches
        self.train.check_fits(context_length)
        self.val.check_fits(context_length)
        self.tokens_per_byte = self.val.tokens_per_byte

    def train_batch(self, rng: torch.Generator) -> Batch:
        return self.train.random_batch(self.batch_size, self.block, rng)

    def val_batches(self) -> Iterator[Batch]:
        return self.val.eval_batches(self.batch_size, self.block, self.eval_batches)


def pretrain_inputs(tokens_dir: str | Path, tokenizer_dir: str | Path) -> dict[str, Any]:
    """What a pretraining run trains on, for its identity (``llm.training.loop.run_identity``): the sha256
    of every file of the token folder and of the tokenizer folder, and the code that computes the run.
    Raises FileNotFoundError for a missing folder."""
    return {"stage": "pretrain", "tokens": sha256_tree(tokens_dir), "tokenizer": sha256_tree(tokenizer_dir),
            "code": code_digests("llm.model.gpt", "llm.training.loop", __name__, "llm.data.tokens")}


def _model_config_for(model_config: ModelConfig, tokenizer, tokens_dir: str | Path, tokenizer_dir: str | Path):
    """``model_config`` with the tokenizer's vocab_size when unset, after checking tokenizer and token files agree."""
    meta = read_meta(tokens_dir)
    if meta["vocab_size"] != tokenizer.vocab_size or meta["tokenizer_kind"] != tokenizer.kind:
        raise ValueError(
            f"{Path(tokens_dir) / 'meta.json'}: tokens were made by a {meta['tokenizer_kind']} tokenizer of "
            f"{meta['vocab_size']} ids, but {tokenizer_dir} holds a {tokenizer.kind} tokenizer of "
            f"{tokenizer.vocab_size}; re-run the tokenize stage"
        )
    if model_config.vocab_size is None:
        return model_config.model_copy(update={"vocab_size": tokenizer.vocab_size})
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} < tokenizer vocab_size {tokenizer.vocab_size}")
    return model_config


def _from_base(model_config: ModelConfig, base: BaseParams | None) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and the extra run inputs when training starts from ``base.hf_folder``: that model's
    shape with ``model_config``'s dropout, and the hash of its weights. Unchanged without a base."""
    if base is None or not base.hf_folder:
        return model_config, {}
    from llm.interop.hf import base_model_config, hf_source

    config = base_model_config(base.hf_folder, base.context_length)
    source = {k: v for k, v in hf_source(base.hf_folder).items() if k != "path"}  # the weights, wherever they lie
    return config.model_copy(update={"dropout": model_config.dropout}), {"base_model": source}


def pretrain_identity(
    params: PretrainParams, model_config: ModelConfig, tokens_dir: str | Path, tokenizer_dir: str | Path,
    *, base: BaseParams | None = None,
) -> str:
    """The ``run_identity`` digest that ``pretrain`` with these arguments records in its checkpoint, computed
    before training, for tools and tests: ``pretrain`` itself decides whether to resume (``llm.training.loop``)
    and says so through ``start_tracking``, so the folders are hashed once per start. Raises like ``pretrain``."""
    model_config, base_inputs = _from_base(model_config, base)
    model_config = _model_config_for(model_config, load_tokenizer(tokenizer_dir), tokens_dir, tokenizer_dir)
    inputs = pretrain_inputs(tokens_dir, tokenizer_dir) | base_inputs
    return identity_digest(run_identity(params, model_config, inputs))


def pretrain(
    params: PretrainParams,
    model_config: ModelConfig,
    tokens_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = True,
    until_step: int | None = None,
    callbacks: list[Callback] | None = None,
    metadata: dict[str, Any] | None = None,
    base: BaseParams | None = None,
    start_tracking: StartTracking | None = None,
) -> TrainResult:
    """Pretrain a GPT from scratch on ``tokens_dir`` and write the checkpoint folder ``out_dir``; with
    ``base.hf_folder``, continue that Transformers model instead (its shape, its weights: ``llm.interop.hf``),
    whose tokenizer ``tokenizer_dir`` must hold (the tokenizer stage with the same ``base``).

    ``model_config.vocab_size`` is taken from the tokenizer when unset. A checkpoint in ``out_dir`` is
    resumed only when it is of the same run: the same token files, tokenizer, code, model config and params
    (see ``llm.training.loop.train``, which tells ``start_tracking`` the tracking run of a resumed checkpoint).
    ``metadata`` joins the checkpoint's config.
    Returns the ``TrainResult`` of ``llm.training.loop.train``. Raises TokenDataError for missing token
    files, ValueError when the tokenizer and the token files disagree, and what ``train`` raises.
    """
    if params.max_steps == 0 and not (base is not None and base.hf_folder):
        raise ValueError("params/pretrain.yaml: max_steps: 0 keeps the start model as it is, which needs one: set "
                         "hf_folder in params/base.yaml (random weights would stay untrained)")
    tokenizer = load_tokenizer(tokenizer_dir)
    model_config, base_inputs = _from_base(model_config, base)
    model_config = _model_config_for(model_config, tokenizer, tokens_dir, tokenizer_dir)
    torch.manual_seed(params.seed)
    model = GPT(model_config)
    if base_inputs:
        from llm.interop.hf import load_hf_model

        log.info("starting from %s: its shape replaces params/model.yaml's (dropout kept)", base.hf_folder)
        imported = tokenizer.kind in ("bytelevel_bpe", "sentencepiece_bpe")
        if not imported or tokenizer.vocab_size != model_config.vocab_size:
            raise ValueError(f"{tokenizer_dir} holds a {tokenizer.kind} tokenizer of {tokenizer.vocab_size} ids, not "
                             f"the one of {base.hf_folder}; re-run the tokenizer and tokenize stages with the same "
                             "params/base.yaml")
        model.load_state_dict(load_hf_model(base.hf_folder, base.context_length).state_dict())
    data = PretrainData(tokens_dir, params.batch_size, model_config.context_length, params.eval_batches)
    return train(model, tokenizer, data, params, out_dir, resume=resume, until_step=until_step,
                 callbacks=callbacks, metadata={**(metadata or {}), "stage": "pretrain"},
                 inputs=pretrain_inputs(tokens_dir, tokenizer_dir) | base_inputs, start_tracking=start_tracking)
