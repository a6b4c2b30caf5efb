"""Generation with a PyTorch GPT: its forward step and sampler for the decoding core (``llm.inference.decoding``).

The loop, the sliding-window policy, the stopping rules and text streaming live in the decoding core;
this module adds what needs torch: one forward step through the model's KV cache, and a sampler that
draws on the model's device from a ``torch.Generator`` (so seeded samples do not depend on the backend's
host copies, and stay the same across releases of this module).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from llm.inference.decoding import Forward, Sampler, SamplingParams, decode, is_greedy
from llm.model.gpt import GPT


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]; returns a LongTensor [B].

    The rules of ``llm.inference.decoding.sample_next_token`` in torch: temperature 0 (or below
    ``GREEDY_BELOW_TEMPERATURE``) is argmax. Otherwise
    the logits are divided by the temperature, cut to the ``top_k`` most likely tokens, then to the
    smallest set whose probability reaches ``top_p`` (the most likely token always survives), and one
    token is drawn from what is left.
    """
    if is_greedy(temperature):
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
    return torch.multinomial(probs, num_samples=1, generator=rng).squeeze(-1)


def torch_forward(model: GPT, *, use_cache: bool = True) -> Forward:
    """The decoding core's forward step for ``model``: logits [1, V] of the last position, and the cache."""
    device = next(model.parameters()).device

    def forward(ids: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
        out = model(torch.tensor([ids], dtype=torch.long, device=device), past_key_values=cache, use_cache=use_cache)
        return out.logits[:, -1, :], out.present_key_values

    return forward


def torch_sampler(params: SamplingParams, device: torch.device) -> Sampler:
    """A sampler drawing on ``device`` from a random generator seeded with ``params.seed`` (None: a fresh seed)."""
    rng = torch.Generator(device=device)
    if params.seed is None:
        rng.seed()  # non-deterministic, and leaves the global RNG alone
    else:
        rng.manual_seed(params.seed)

    def sample(logits: torch.Tensor) -> int:
        return int(sample_next_token(logits, params.temperature, params.top_k, params.top_p, rng)[0])

    return sample


@torch.inference_mode()
def stream_generate(
    model: GPT, prompt_ids: Sequence[int], params: SamplingParams, *, use_cache: bool = True
) -> Iterator[int]:
    """Yield new token ids one at a time, continuing ``prompt_ids``: ``llm.inference.decoding.decode``
    with this model's forward step. ``use_cache=False`` recomputes the whole window every step (the
    reference for tests and benchmarks). The model is put in eval mode and restored when the stream ends.

    Raises ValueError for an empty prompt (prepend the tokenizer's <|bos|> id) or out-of-vocabulary ids.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        yield from decode(torch_forward(model, use_cache=use_cache), prompt_ids, params,
                          context_length=model.config.context_length, vocab_size=model.config.vocab_size,
                          sampler=torch_sampler(params, device), use_cache=use_cache)
    finally:
        model.train(was_training)


def generate(model: GPT, prompt_ids: Sequence[int], params: SamplingParams, *, use_cache: bool = True) -> list[int]:
    """The new ids ``stream_generate`` yields, as a list (the prompt is not included)."""
    return list(stream_generate(model, prompt_ids, params, use_cache=use_cache))


class TorchGenerator:
    """A checkpoint's model and tokenizer as a ``TextGenerator`` for the chat session and the served model."""

    def __init__(self, model: GPT, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.context_length = model.config.context_length

    def stream_generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """See ``stream_generate``."""
        return stream_generate(self.model, prompt_ids, params)
