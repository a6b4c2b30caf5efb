"""Supervised finetuning (SFT): continue a pretrained checkpoint on chat conversations.

The training loop is ``llm.training.loop.train``, unchanged: ``ChatBatches`` is its ``BatchSource``. Each row of
a batch is one conversation in the chat template (``llm.data.chat_template``), fitted to the context by
``fit_chat`` (old exchanges dropped, then the last user message cut from its start; a conversation
whose system messages and final answer alone exceed the context is left out and counted), then padded
to the longest row of the batch. One conversation per row, so no token attends across conversations.

Inputs are ``ids[:-1]``, targets ``ids[1:]``; the loss mask is 1 exactly where the *target* is an
assistant content token or the ``<|end|>`` closing an assistant message, 0 for system/user/role tokens
and padding (padded targets are also -100). So ``val/loss`` is the mean loss per assistant token on the
val conversations, and ``val/bpb`` its bits per byte of assistant text (``<|end|>`` costs bits, no bytes).

Exact resume comes from ``train``: the batch sampler draws conversation indices from the random generator
whose state the checkpoint stores.

``method: lora`` (``params.lora``) trains low-rank adapters on the frozen base instead of every weight
(``llm.model.lora``): the optimizer sees only the adapters, the checkpoint holds only them plus the identity of
the base (``llm.model.checkpoint``), and with ``dtype: bfloat16`` on a GPU the frozen base matrices are held in bf16.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm.config import FinetuneParams, ModelConfig
from llm.data.chat_data import CHAT_FILES, ChatDataError, Conversation, read_chat_file
from llm.data.chat_template import fit_chat
from llm.data.tokenizer import Tokenizer
from llm.io import sha256_file
from llm.model.checkpoint import (
    CheckpointConfig,
    base_identity,
    load_checkpoint,
    load_model_config,
    read_manifest,
)
from llm.model.gpt import GPT
from llm.model.lora import apply_lora, count_adapter_parameters, freeze_base_in
from llm.training.device import select_device, select_dtype
from llm.training.loop import (
    Batch,
    Callback,
    StartTracking,
    TrainResult,
    code_digests,
    evaluate_loss,
    identity_digest,
    run_identity,
    train,
)

log = logging.getLogger(__name__)


@dataclass
class ChatExample:
    """One conversation as token ids with its aligned loss mask (see ``llm.data.chat_template``)."""

    ids: list[int]
    mask: list[int]
    assistant_bytes: int  # UTF-8 bytes of the assistant contents kept


def encode_chat_examples(
    tokenizer: Tokenizer, conversations: Sequence[Conversation], context_length: int
) -> tuple[list[ChatExample], dict[str, int]]:
    """Encode and fit conversations to ``context_length`` (+1 for the target shift).

    Returns the examples and counts: ``kept``, ``shortened`` (exchanges dropped or the user message cut)
    and ``dropped`` (could not fit at all).
    """
    examples, counts = [], {"kept": 0, "shortened": 0, "dropped": 0}
    for messages in conversations:
        fitted = fit_chat(tokenizer, messages, context_length + 1)
        if fitted is None or sum(fitted.mask[1:]) == 0:
            counts["dropped"] += 1
            continue
        counts["kept"] += 1
        counts["shortened"] += bool(fitted.dropped_messages or fitted.cut_tokens)
        n_bytes = sum(len(m["content"].encode("utf-8")) for m in fitted.messages if m["role"] == "assistant")
        examples.append(ChatExample(fitted.ids, fitted.mask, n_bytes))
    return examples, counts


def collate_chat_examples(examples: Sequence[ChatExample], pad_id: int) -> Batch:
    """``(x, y, loss_mask)`` LongTensors [B, T], T the longest example minus one.

    ``x`` is ids[:-1] padded with ``pad_id``; ``y`` is ids[1:] padded with -100; ``loss_mask`` is mask[1:]
    padded with 0, so it marks exactly the positions whose target is an assistant token or its <|end|>.
    """
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        x[row, :n] = torch.tensor(e.ids[:-1])
        y[row, :n] = torch.tensor(e.ids[1:])
        mask[row, :n] = torch.tensor(e.mask[1:])
    return x, y, mask


def _evenly_spaced(items: Sequence, k: int) -> list:
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


class ChatBatches:
    """``BatchSource`` over chat JSONL files: random conversations for training, a fixed val set.

    Validation uses up to ``eval_batches * batch_size`` val conversations spread evenly over the file.
    Raises ChatDataError for invalid files and ValueError when no conversation fits the context.
    """

    def __init__(
        self,
        train_file: str | Path,
        val_file: str | Path,
        tokenizer: Tokenizer,
        context_length: int,
        batch_size: int,
        eval_batches: int,
    ):
        self.batch_size, self.pad_id = batch_size, tokenizer.pad_id
        self.train, self.train_counts = encode_chat_examples(tokenizer, read_chat_file(train_file), context_length)
        val, self.val_counts = encode_chat_examples(tokenizer, read_chat_file(val_file), context_length)
        for name, examples, counts in (("train", self.train, self.train_counts), ("val", val, self.val_counts)):
            if not examples:
                raise ValueError(
                    f"no {name} conversation fits a context of {context_length} tokens ({counts['dropped']} dropped); "
                    "use shorter conversations or a model with a longer context"
                )
            if counts["dropped"] or counts["shortened"]:
                log.info("%s conversations: %d kept (%d shortened to fit %d tokens), %d too long and left out",
                         name, counts["kept"], counts["shortened"], context_length, counts["dropped"])
        self.val = _evenly_spaced(val, eval_batches * batch_size)
        targets = sum(sum(e.mask[1:]) for e in self.val)
        n_bytes = sum(e.assistant_bytes for e in self.val)
        self.tokens_per_byte: float | None = targets / n_bytes if n_bytes else None

    def train_batch(self, rng: torch.Generator) -> Batch:
        idx = torch.randint(len(self.train), (self.batch_size,), generator=rng).tolist()
        return collate_chat_examples([self.train[i] for i in idx], self.pad_id)

    def val_batches(self) -> Iterator[Batch]:
        for start in range(0, len(self.val), self.batch_size):
            yield collate_chat_examples(self.val[start : start + self.batch_size], self.pad_id)


def _parent_metadata(base_checkpoint: Path, config: CheckpointConfig) -> dict[str, Any]:
    return {"path": str(base_checkpoint), "stage": config.stage, "step": config.step,
            "weights_sha256": read_manifest(base_checkpoint).weights_sha256}


def finetune_inputs(base_checkpoint: str | Path, chat_dir: str | Path) -> dict[str, Any]:
    """What a finetuning run trains on and from, for its identity (``llm.training.loop.run_identity``): the
    base model's weights and tokenizer (their sha256 as its manifest records them: verify the checkpoint
    first, as ``load_checkpoint`` does) and the sha256 of the chat files. Raises CheckpointError when the
    base has no readable manifest and FileNotFoundError for missing chat files."""
    base_checkpoint, chat_dir = Path(base_checkpoint), Path(chat_dir)
    manifest = read_manifest(base_checkpoint)
    return {
        "stage": "finetune",
        "base_model": {"weights_sha256": manifest.weights_sha256, "tokenizer": manifest.tokenizer_sha256},
        "chat_data": {name: sha256_file(chat_dir / name) for name in sorted(CHAT_FILES.values())},
        "code": code_digests("llm.model.gpt", "llm.model.lora", "llm.training.loop", __name__,
                             "llm.data.chat_template"),
    }


def _finetuned_config(params: FinetuneParams, base_config: ModelConfig) -> ModelConfig:
    """The base model's config with finetuning's own dropout, when it sets one."""
    if params.dropout is not None and params.dropout != base_config.dropout:
        return base_config.model_copy(update={"dropout": params.dropout})
    return base_config


def finetune_identity(params: FinetuneParams, base_checkpoint: str | Path, chat_dir: str | Path) -> str:
    """The ``run_identity`` digest that ``finetune`` with these arguments records in its checkpoint, computed
    before training, for tools and tests (``finetune`` itself decides whether to resume). Raises CheckpointError
    for a bad base checkpoint and FileNotFoundError for missing chat files."""
    config = _finetuned_config(params, load_model_config(base_checkpoint))
    return identity_digest(run_identity(params, config, finetune_inputs(base_checkpoint, chat_dir)))


def finetune(
    params: FinetuneParams,
    base_checkpoint: str | Path,
    chat_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = True,
    until_step: int | None = None,
    callbacks: list[Callback] | None = None,
    metadata: dict[str, Any] | None = None,
    start_tracking: StartTracking | None = None,
) -> TrainResult:
    """Finetune the checkpoint ``base_checkpoint`` on ``chat_dir/{train,val}.jsonl`` into ``out_dir``.

    Loss is on assistant tokens only (see the module docstring). The checkpoint records ``stage:
    finetune`` and its ``parent`` (path, stage, step and weights hash of the base). With ``resume`` a
    checkpoint already in ``out_dir`` is continued exactly when it is of the same run (same base weights
    and tokenizer, chat files, model config and params; see ``llm.training.loop.train``); ``until_step``
    pauses early; ``metadata`` joins the checkpoint's config; ``start_tracking`` as ``llm.training.loop.train`` has it.
    With ``params.method == "lora"`` only adapters train (``_add_adapters``) and the checkpoint holds them with the
    base's identity (``metadata["adapter"]``, see ``llm.model.checkpoint``).
    Raises CheckpointError for a bad base checkpoint (or an adapter checkpoint as the base of a LoRA run),
    ChatDataError for missing or invalid chat files, ValueError when no conversation fits the context,
    LoRAConfigError for a ``lora`` target or rank that does not fit the model, and see ``llm.training.loop.train``.
    """
    base_checkpoint, chat_dir = Path(base_checkpoint), Path(chat_dir)
    for name in CHAT_FILES.values():
        if not (chat_dir / name).is_file():
            raise ChatDataError(f"{chat_dir / name}: missing; prepare the chat data first "
                                "(llm.data.chat_data.prepare_chat_data)")
    model, tokenizer, config = load_checkpoint(base_checkpoint)
    if _finetuned_config(params, model.config) != model.config:
        state = model.state_dict()
        model = GPT(_finetuned_config(params, model.config))
        model.load_state_dict(state)
    metadata = {**(metadata or {}), "stage": "finetune", "method": params.method}
    if params.method == "lora":
        metadata["adapter"] = {"lora": params.lora.model_dump(), "base": base_identity(base_checkpoint)}
        _add_adapters(model, params)
    data = ChatBatches(chat_dir / CHAT_FILES["train"], chat_dir / CHAT_FILES["val"], tokenizer,
                       model.config.context_length, params.batch_size, params.eval_batches)
    log.info("finetuning %s on %d train conversations (%d for validation)", base_checkpoint, len(data.train),
             len(data.val))
    metadata.update(parent=_parent_metadata(base_checkpoint, config),
                    chat_data={"train": data.train_counts, "val": data.val_counts})
    return train(model, tokenizer, data, params, out_dir, resume=resume, until_step=until_step,
                 callbacks=callbacks, metadata=metadata, inputs=finetune_inputs(base_checkpoint, chat_dir),
                 start_tracking=start_tracking)


def _add_adapters(model: GPT, params: FinetuneParams) -> None:
    """LoRA adapters on ``model`` as ``params.lora`` says (initialised from ``params.seed``, so a resumed run builds
    the same ones), base frozen, and held in bf16 where training autocasts to bf16 on a GPU."""
    apply_lora(model, params.lora, rng=torch.Generator().manual_seed(params.seed))
    device = select_device(params.device)
    if device.type == "cuda" and select_dtype(params.dtype, device) == torch.bfloat16:
        freeze_base_in(model, torch.bfloat16)
    log.info("LoRA rank %d (alpha %g) on %s: %s trainable parameters of %s", params.lora.rank, params.lora.alpha,
             ", ".join(params.lora.targets), f"{count_adapter_parameters(model):,}", f"{model.num_parameters():,}")


def assistant_loss(
    checkpoint_or_model: str | Path | torch.nn.Module,
    tokenizer: Tokenizer | None,
    chat_file: str | Path,
    *,
    batch_size: int = 16,
    max_conversations: int | None = None,
    device: str = "auto",
) -> float:
    """Mean loss (nats per assistant token, ``<|end|>`` included) of a model on the conversations of
    ``chat_file``: the same quantity as SFT's ``val/loss``, so base and finetuned models compare directly.

    ``checkpoint_or_model`` is a checkpoint folder (its tokenizer is used when ``tokenizer`` is None) or
    a GPT. ``max_conversations`` takes that many evenly spread over the file. Raises ChatDataError for an
    invalid file and ValueError when no conversation fits the model's context.
    """
    if isinstance(checkpoint_or_model, torch.nn.Module):
        model = checkpoint_or_model
        if tokenizer is None:
            raise ValueError("pass the tokenizer along with a model")
        dev = next(model.parameters()).device
    else:
        dev = select_device(device)
        model, own_tokenizer, _ = load_checkpoint(checkpoint_or_model, dev)
        tokenizer = tokenizer or own_tokenizer
    examples, _ = encode_chat_examples(tokenizer, read_chat_file(chat_file), model.config.context_length)
    if not examples:
        raise ValueError(f"{chat_file}: no conversation fits a context of {model.config.context_length} tokens")
    if max_conversations:
        examples = _evenly_spaced(examples, max_conversations)
    batches = (collate_chat_examples(examples[i : i + batch_size], tokenizer.pad_id)
               for i in range(0, len(examples), batch_size))
    return evaluate_loss(model, batches, dev, select_dtype("auto", dev))


def _final_answer_only(mask: list[int]) -> list[int]:
    """``mask`` with only its last run of ones kept: the final assistant answer and its closing ``<|end|>``."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [0] * start + [1] * (end - start) + [0] * (len(mask) - end)


def answer_bits(model: torch.nn.Module, tokenizer: Tokenizer, conversations: Sequence[Conversation]
                ) -> dict[int, tuple[float, int]]:
    """For each conversation whose final message is an assistant answer and that fits the model's context (as
    in SFT: ``fit_chat``), the bits the model spends on that answer (its ``<|end|>`` included) and the answer's
    UTF-8 bytes, by the conversation's index. Every model scores the same answers whatever its tokenizer, so
    bits per byte over the same indices (``answers_bpb``) compare models where nats per token cannot."""
    dev = next(model.parameters()).device
    scored: dict[int, tuple[float, int]] = {}
    for index, messages in enumerate(conversations):
        fitted = fit_chat(tokenizer, messages, model.config.context_length + 1)
        if fitted is None or messages[-1]["role"] != "assistant" or sum(fitted.mask[1:]) == 0:
            continue
        example = ChatExample(fitted.ids, _final_answer_only(fitted.mask), 0)
        tokens = sum(example.mask[1:])
        batch = collate_chat_examples([example], tokenizer.pad_id)
        nats = evaluate_loss(model, iter([batch]), dev, select_dtype("auto", dev)) * tokens
        scored[index] = (nats / math.log(2), len(messages[-1]["content"].encode("utf-8")))
    return scored


def answers_bpb(scored: dict[int, tuple[float, int]], indices: Iterable[int] | None = None) -> dict[str, Any]:
    """Bits per byte of the answers ``indices`` (default: all) of ``answer_bits``' result: ``{"bpb", "bytes",
    "answers", "indices"}``. Raises ValueError when there is none."""
    chosen = sorted(scored if indices is None else indices)
    if not chosen:
        raise ValueError("no held-out answer fits the model's context")
    bits, n_bytes = sum(scored[i][0] for i in chosen), sum(scored[i][1] for i in chosen)
    return {"bpb": bits / max(1, n_bytes), "bytes": n_bytes, "answers": len(chosen), "indices": chosen}


def held_out_conversations(chat_file: str | Path, max_conversations: int | None) -> list[Conversation]:
    """The conversations of ``chat_file`` that evaluation scores: ``max_conversations`` of them evenly spread
    over the file (all when None), chosen from the file alone, so every model is scored on the same ones."""
    conversations = read_chat_file(chat_file)
    return _evenly_spaced(conversations, max_conversations) if max_conversations else conversations
