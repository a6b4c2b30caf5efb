"""Sampling text from a GPT: temperature, top-k and nucleus (top-p) sampling with a KV cache.

Context policy (the same for the cached and the uncached path, so both give identical greedy output):
the model sees a *window* of at most ``context_length`` tokens. A prompt longer than that keeps its last
``context_length`` tokens. When appending a new token would make the window longer than
``context_length``, the window slides: it keeps only its last ``context_length // 2`` tokens (at least 1)
and they are prefilled again from position 0. Re-encoding from position 0 keeps every position inside
what training saw, so it works for every position kind, learned ones included; keeping half the window
means one re-prefill every ``context_length // 2`` tokens instead of a full recompute on every token.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from llm.model.gpt import GPT


class SamplingParams(BaseModel):
    """How to pick each new token and when to stop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=0)
    temperature: float = Field(1.0, ge=0.0, description="0 picks the most likely token (greedy)")
    top_k: int | None = Field(None, gt=0, description="keep only the k most likely tokens")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="keep the smallest set with this much probability")
    seed: int | None = Field(None, description="None draws a fresh seed; an int makes sampling reproducible")
    stop_ids: tuple[int, ...] = Field((), description="generation ends after yielding one of these ids")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]; returns a LongTensor [B].

    Temperature 0 is argmax. Otherwise the logits are divided by the temperature, cut to the ``top_k``
    most likely tokens, then to the smallest set whose probability reaches ``top_p`` (the most likely
    token always survives), and one token is drawn from what is left.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream_generate(
    model: GPT, prompt_ids: list[int], params: SamplingParams, *, use_cache: bool = True
) -> Iterator[int]:
    """Yield new token ids one at a time, as each is sampled, continuing ``prompt_ids``.

    The prompt is prefilled once, then each token is decoded with the KV cache; ``use_cache=False``
    instead recomputes the whole window every step (the reference for tests and benchmarks). Both follow
    the sliding-window policy in this module's docstring. Stops after ``max_new_tokens`` ids, or right
    after yielding an id in ``stop_ids`` (the stop id *is* yielded, so the caller can tell why it stopped
    and strip it). Sampling uses a generator on the model's device seeded with ``params.seed``.
    The model is put in eval mode and restored to its previous mode when the stream ends.

    Raises ValueError for an empty prompt (prepend the tokenizer's <|bos|> id) or out-of-vocabulary ids.
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: prepend the tokenizer's <|bos|> id to start from nothing")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise ValueError(f"prompt_ids must lie in [0, {vocab}); got {min(prompt_ids)}..{max(prompt_ids)}")
    context = model.config.context_length
    keep = max(1, context // 2)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()  # non-deterministic, and leaves the global RNG alone
    else:
        generator.manual_seed(params.seed)
    stop_ids = set(params.stop_ids)

    def forward(ids: list[int], past=None):
        out = model(torch.tensor([ids], dtype=torch.long, device=device), past_key_values=past, use_cache=use_cache)
        return out.logits[:, -1, :], out.present_key_values  # [1, V]

    was_training = model.training
    model.eval()
    try:
        window = list(prompt_ids[-context:])
        logits, cache = forward(window)
        for step in range(params.max_new_tokens):
            token = int(sample_next_token(logits, params.temperature, params.top_k, params.top_p, generator)[0])
            yield token
            if token in stop_ids or step + 1 == params.max_new_tokens:
                return
            window.append(token)
            if len(window) > context:  # slide, and re-encode the kept tokens from position 0
                window = window[-keep:]
                logits, cache = forward(window)
            elif use_cache:
                logits, cache = forward([token], cache)
            else:
                logits, _ = forward(window)
    finally:
        model.train(was_training)


def generate(model: GPT, prompt_ids: list[int], params: SamplingParams, *, use_cache: bool = True) -> list[int]:
    """The new ids ``stream_generate`` yields, as a list (the prompt is not included)."""
    return list(stream_generate(model, prompt_ids, params, use_cache=use_cache))


def stream_text(model, tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Continue ``prompt`` (after ``<|bos|>``) and yield text pieces as soon as they decode.

    Multi-byte characters split across byte tokens are held back until complete; stop ids end the
    stream without being printed.
    """
    decoder = tokenizer.stream_decoder(skip_special=True)
    for token_id in stream_generate(model, [tokenizer.bos_id, *tokenizer.encode(prompt)], params):
        if token_id in params.stop_ids:
            break
        piece = decoder.feed(token_id)
        if piece:
            yield piece
    tail = decoder.finish()
    if tail:
        yield tail
