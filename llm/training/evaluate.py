"""Evaluation: loss, perplexity, bits per byte and samples of a checkpoint, and the score promotion compares.

``evaluate_checkpoint`` scores a checkpoint on a token file and samples it; ``score_candidate`` adds, for a chat
model, its assistant loss (and its base model's) and answers to held-out conversations. ``comparable_score`` is
the number two models are ranked on whatever their tokenizers (bits per byte of the same held-out text: the val
split for base models, the final assistant answers of the chat val conversations for chat models), and
``compare_with`` scores another checkpoint (Production) on the same text. The decision itself is the registry's
(``llm.mlops.registry.promote_if_better``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm.config import EvalParams
from llm.data.chat_template import encode_chat, generation_stop_ids
from llm.data.tokens import TokenFile, bits_per_byte, encode_documents, read_meta
from llm.inference.decoding import SamplingParams, complete, stream_text
from llm.inference.generate import TorchGenerator
from llm.io import atomic_write_json, atomic_write_text, sha256_file
from llm.model.checkpoint import LoadedCheckpoint, load_checkpoint
from llm.training.device import select_device, select_dtype
from llm.training.loop import evaluate_loss

log = logging.getLogger(__name__)


def sample_completions(model, tokenizer, params: EvalParams) -> list[dict[str, str]]:
    """Complete each of ``params.prompts``; returns ``[{"prompt", "completion"}]`` (deterministic per seed)."""
    generator, samples = TorchGenerator(model, tokenizer), []
    for i, prompt in enumerate(params.prompts):
        sampling = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_k=params.top_k, top_p=params.top_p, seed=params.seed + i,
                                  stop_ids=generation_stop_ids(tokenizer))
        samples.append({"prompt": prompt, "completion": "".join(complete(generator, prompt, sampling))})
    return samples


def sample_conversations(checkpoint: str | Path, chat_file: str | Path, params: EvalParams, *,
                         loaded: LoadedCheckpoint | None = None) -> list[dict]:
    """Answer the last user turn of the first ``params.sample_conversations`` conversations of ``chat_file``, with
    ``checkpoint`` (``loaded``: as ``load_checkpoint`` returned it, which is then not loaded again).

    Returns ``[{"messages": context, "reference": held-out answer, "answer": model answer}]``.
    """
    from llm.data.chat_data import read_chat_file

    model, tokenizer, _ = loaded or load_checkpoint(checkpoint, select_device(params.device))
    generator, out = TorchGenerator(model, tokenizer), []
    for i, conversation in enumerate(read_chat_file(chat_file)[: params.sample_conversations]):
        context, reference = conversation[:-1], conversation[-1]["content"]
        ids = encode_chat(tokenizer, context, add_generation_prompt=True)
        ids = ids[-(model.config.context_length // 2):]
        sampling = SamplingParams(max_new_tokens=min(params.max_new_tokens, model.config.context_length // 2),
                                  temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                  seed=params.seed + i, stop_ids=generation_stop_ids(tokenizer))
        answer = "".join(stream_text(generator.stream_generate(ids, sampling), tokenizer, sampling.stop_ids))
        out.append({"messages": context, "reference": reference, "answer": answer})
    return out


def samples_markdown(samples: list[dict[str, str]], conversations: list[dict] | None = None) -> str:
    """Samples as a Markdown page: each prompt and its completion in a fenced block, then conversations."""
    parts = ["# Samples\n"]
    for s in samples:
        parts.append(f"## Prompt: `{s['prompt'].strip()}`\n\n```text\n{s['prompt']}{s['completion']}\n```\n")
    if conversations:
        parts.append("# Conversations (held-out validation)\n")
        for c in conversations:
            lines = [f"**{m['role']}**: {m['content']}" for m in c["messages"]]
            lines += [f"**assistant (model)**: {c['answer']}", f"**assistant (reference)**: {c['reference']}"]
            parts.append("\n\n".join(lines) + "\n\n---\n")
    return "\n".join(parts)


def _score(model, data: TokenFile, params: EvalParams, device, dtype, split: str) -> dict[str, float]:
    batches = list(data.eval_batches(params.batch_size, model.config.context_length, params.max_batches))
    loss = evaluate_loss(model, iter(batches), device, dtype)
    return {
        f"{split}/loss": loss,
        f"{split}/ppl": math.exp(min(loss, 50.0)),
        f"{split}/bpb": bits_per_byte(loss, data.tokens_per_byte),
        "eval/tokens": sum(b[1].numel() for b in batches),
    }


def evaluate_on_text(checkpoint: str | Path, split_file: str | Path, params: EvalParams, split: str = "val") -> dict:
    """Score ``checkpoint`` on a cleaned split file, encoded with the checkpoint's own tokenizer.

    Bits per byte from here compare models whatever their tokenizers. Returns loss, ppl, bpb, tokens.
    """
    device = select_device(params.device)
    model, tokenizer, _ = load_checkpoint(checkpoint, device)
    data = encode_documents(tokenizer, split_file)
    return _score(model, data, params, device, select_dtype("auto", device), split)


def text_bits_per_byte(model, tokenizer, split_file: str | Path, params: EvalParams) -> dict:
    """Bits per byte of a cleaned split file for a loaded model, encoded with its own tokenizer: the whole
    text, or with ``params.max_batches`` that many batches of windows spread evenly over it. Returns
    ``{"bpb", "bytes", "text_sha256"}``, the hash naming the file's content and how much of it was scored."""
    device = next(model.parameters()).device
    data = encode_documents(tokenizer, split_file)
    scored = _score(model, data, params, device, select_dtype("auto", device), "val")
    sample = f"{params.max_batches} batches of {params.batch_size}" if params.max_batches else "whole"
    return {"bpb": scored["val/bpb"], "bytes": data.n_bytes, "text_sha256": f"{sha256_file(split_file)}:{sample}"}


def evaluate_checkpoint(
    checkpoint: str | Path,
    tokens_dir: str | Path,
    params: EvalParams,
    *,
    split: str = "val",
    out_dir: str | Path | None = None,
    loaded: LoadedCheckpoint | None = None,
) -> dict:
    """Score ``checkpoint`` on ``tokens_dir/{split}.bin`` and generate samples from fixed prompts; ``loaded`` is the
    checkpoint as ``load_checkpoint`` returned it (on the device of ``params.device``), which is then not loaded again.

    Returns ``{"val/loss", "val/ppl", "val/bpb", "eval/tokens", ...}`` (keys use the split name). With
    ``out_dir``, writes ``metrics.json`` and ``samples.md`` there. Raises CheckpointError for a bad
    checkpoint, TokenDataError for missing token files, ValueError when the tokenizers differ.
    """
    device = select_device(params.device)
    dtype = select_dtype("auto", device)
    model, tokenizer, config = loaded or load_checkpoint(checkpoint, device)
    meta = read_meta(tokens_dir)
    if meta["vocab_size"] != tokenizer.vocab_size or meta["tokenizer_kind"] != tokenizer.kind:
        raise ValueError(
            f"{tokens_dir}: tokens come from a {meta['tokenizer_kind']} tokenizer of {meta['vocab_size']} ids, "
            f"but {checkpoint} uses a {tokenizer.kind} tokenizer of {tokenizer.vocab_size}; they cannot be compared"
        )
    data = TokenFile(tokens_dir, split)
    metrics = {**_score(model, data, params, device, dtype, split), "eval/step": config.get("step", 0)}
    samples = sample_completions(model, tokenizer, params)
    log.info("%s: %s loss %.4f, bpb %.4f over %d tokens", checkpoint, split, metrics[f"{split}/loss"],
             metrics[f"{split}/bpb"], metrics["eval/tokens"])
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "samples.md", samples_markdown(samples))
        atomic_write_json(out_dir / "metrics.json", metrics, sort_keys=True)
    return {**metrics, "samples": samples}


def model_kind(config: Mapping[str, Any]) -> str:
    """``chat`` for a finetuned checkpoint (its ``config.json`` says ``stage: finetune``), else ``base``."""
    return "chat" if config.get("stage") == "finetune" else "base"


def score_candidate(candidate: LoadedCheckpoint, candidate_dir: Path, tokens_dir: Path, params: EvalParams,
                    out_dir: Path, chat_val: Path | None) -> tuple[dict, list, list | None]:
    """Metrics and samples of the loaded candidate: loss, ppl, bpb on the token file; for a chat model also its
    assistant loss (nats per assistant token, and its base model's) and answers to held-out conversations.
    Returns ``(metrics, samples, conversations)``, conversations None for a base model."""
    from llm.training.finetune import assistant_loss

    result = evaluate_checkpoint(candidate_dir, tokens_dir, params, out_dir=out_dir, loaded=candidate)
    samples, conversations = result.pop("samples"), None
    if model_kind(candidate.config) == "chat":
        result["chat/assistant_loss"] = assistant_loss(candidate.model, candidate.tokenizer, chat_val,
                                                       max_conversations=params.max_conversations)
        conversations = sample_conversations(candidate_dir, chat_val, params, loaded=candidate)
        base_dir = candidate.config.parent_path
        if base_dir is not None and base_dir.exists():
            result["chat/base_assistant_loss"] = assistant_loss(base_dir, None, chat_val, device=params.device,
                                                                max_conversations=params.max_conversations)
    return result, samples, conversations


def comparable_score(model, tokenizer, kind: str, params: EvalParams, clean_dir: Path,
                     chat_val: Path | None) -> dict[str, Any]:
    """The score promotion compares, for a loaded model: bits per byte of held-out text that any model is scored
    on alike, whatever its tokenizer. A chat model: the final assistant answers of the chat val conversations
    (``chat/assistant_bpb``; ``answers`` holds each answer's bits and bytes); a base model: the val split
    (``val/bpb``). Returns ``{"metric", "score", "text", "text_sha256"}``: two scores compare only when their
    ``text_sha256`` agree (and, for answers, over the answers both models' contexts fit)."""
    if kind == "chat":
        from llm.training.finetune import answer_bits, answers_bpb, held_out_conversations

        answers = answer_bits(model, tokenizer, held_out_conversations(chat_val, params.max_conversations))
        own = answers_bpb(answers)
        return {"metric": "chat/assistant_bpb", "score": own["bpb"], "answers": answers,
                "text": _answers_text(own, chat_val),
                "text_sha256": f"{sha256_file(chat_val)}:{params.max_conversations or 'all'}"}
    scored = text_bits_per_byte(model, tokenizer, clean_dir / "val.txt", params)
    return {"metric": "val/bpb", "score": scored["bpb"], "text_sha256": scored["text_sha256"],
            "text": f"the val split {clean_dir / 'val.txt'} ({scored['bytes']:,} bytes)"}


def _answers_text(scored: dict[str, Any], chat_val: Path | None) -> str:
    return f"the final assistant answers of {scored['answers']} conversations of {chat_val} ({scored['bytes']:,} bytes)"


def compare_with(checkpoint: Path, name: str, kind: str, candidate: dict[str, Any], params: EvalParams,
                 clean_dir: Path, chat_val: Path | None) -> dict[str, Any]:
    """The candidate's score (``candidate``: its ``comparable_score``) and the checkpoint ``checkpoint``'s (called
    ``name`` in the reasons, e.g. ``Production version 3``) on the same text: ``{"candidate_score",
    "production_score", "text"}``, or ``{"incomparable": why}`` (another kind of model, other text, no answer both
    contexts fit)."""
    from llm.training.finetune import answers_bpb

    model, tokenizer, config = load_checkpoint(checkpoint, select_device(params.device))
    if model_kind(config) != kind:
        return {"incomparable": f"{name} is a {model_kind(config)} model and this one a {kind} model: they are "
                                "scored on different texts (assistant answers, the val split)"}
    try:
        theirs = comparable_score(model, tokenizer, kind, params, clean_dir, chat_val)
    except ValueError as err:
        return {"incomparable": f"{name} cannot be scored on {candidate['text']} ({err})"}
    if theirs["text_sha256"] != candidate["text_sha256"]:
        return {"incomparable": f"{name} was scored on other text ({theirs['text']})"}
    if kind != "chat":
        return {"candidate_score": candidate["score"], "production_score": theirs["score"], "text": candidate["text"]}
    common = set(candidate["answers"]) & set(theirs["answers"])
    if not common:
        return {"incomparable": f"no held-out answer fits the contexts of both this model and {name}"}
    mine = answers_bpb(candidate["answers"], common)
    fit = "" if len(common) == max(len(candidate["answers"]), len(theirs["answers"])) else ", those both contexts fit"
    return {"candidate_score": mine["bpb"], "production_score": answers_bpb(theirs["answers"], common)["bpb"],
            "text": _answers_text(mine, chat_val) + fit}
