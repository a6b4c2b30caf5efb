"""Evaluation of a checkpoint on a token file: loss, perplexity, bits per byte, and samples."""

from __future__ import annotations

import logging
import math
from pathlib import Path

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
