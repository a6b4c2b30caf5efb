"""The decoding core: sampling parameters, the sampler, the per-token rules, the sliding-window decode loop,
text streaming.

Every way of generating text goes through this module: PyTorch (``llm.inference.generate``), ONNX Runtime
(``llm.inference.onnx_runtime``), the chat session, the served model and the batch engine
(``llm.inference.batching``). Each backend supplies only its forward step, ``forward(ids, cache) -> (logits,
cache)``: the logits of the last position ([V], or [1, V]) after feeding ``ids`` on top of ``cache`` (None: an
empty cache), and the cache to pass next time. Token ids are plain ints; text lives at the edges (``stream_text``).
It imports no torch.

The per-token rules are one object, ``DecodeState`` (one per sequence): which ids cannot be sampled yet (the stop
ids before ``min_new_tokens``), whether a sampled token ends the sequence and why ("stop": a stop id, which is
still emitted; "length": ``max_new_tokens``), and when the window slides. ``decode`` runs one sequence with it,
the batch engine one per row, so both stop, hold off stop ids and slide at the same tokens. Stop *strings* are a
rule on text, so they apply where the text is made (``StopStrings``, used by the HTTP server).

Context policy (the same for the cached and the uncached path, so both give identical greedy output):
the model sees a *window* of at most ``context_length`` tokens. A prompt longer than that keeps its last
``context_length`` tokens. When appending a new token would make the window longer than
``context_length``, the window slides: it keeps only its last ``context_length // 2`` tokens (at least 1)
and they are prefilled again from position 0. Re-encoding from position 0 keeps every position inside
what training saw, so it works for every position kind, learned ones included; keeping half the window
means one re-prefill every ``context_length // 2`` tokens instead of a full recompute on every token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from llm.data.chat_template import prompt_ids

Forward = Callable[[list[int], Any], tuple[Any, Any]]  # (ids, cache or None) -> (last logits, new cache)
Sampler = Callable[[Any], int]  # last logits -> the next token id

GREEDY_BELOW_TEMPERATURE = 1e-6  # a smaller temperature is greedy: dividing by it overflows float32 logits
SEED_LIMIT = 2**64  # any unsigned 64-bit seed; torch.Generator refuses larger ones (the OpenAI API maps int64 here)


class SamplingParams(BaseModel):
    """How to pick each new token and when to stop.

    ``temperature`` 0 is greedy, and so is any temperature below ``GREEDY_BELOW_TEMPERATURE`` (1e-6): divided
    by such a temperature, float32 logits overflow to infinity (``1e-40`` made torch's probabilities NaN), and at
    1e-6 sampling already picks the most likely token unless another lies within about 1e-5 of it.
    ``seed`` lies in ``[0, 2**64)``; anything else is a validation error rather than a crash deep in a backend.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=0)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False,
                               description="0 (or below GREEDY_BELOW_TEMPERATURE) picks the most likely token")
    top_k: int | None = Field(None, gt=0, description="keep only the k most likely tokens")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="keep the smallest set with this much probability")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT,
                             description="None draws a fresh seed; an int in [0, 2**64) makes sampling reproducible")
    stop_ids: tuple[int, ...] = Field((), description="generation ends after yielding one of these ids")
    min_new_tokens: int = Field(0, ge=0, description="the stop ids cannot be sampled before this many new tokens")


class TextGenerator(Protocol):
    """What the chat session and the served model need from a backend (PyTorch or ONNX Runtime)."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def context_length(self) -> int: ...

    def stream_generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]: ...


def is_greedy(temperature: float) -> bool:
    """Whether ``temperature`` picks the most likely token: 0, or below ``GREEDY_BELOW_TEMPERATURE``."""
    return temperature < GREEDY_BELOW_TEMPERATURE


def check_prompt(prompt_ids: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt as a list of ints. Raises ValueError for an empty prompt or ids outside ``[0, vocab_size)``."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty: prepend the tokenizer's <|bos|> id to start from nothing")
    if any(not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"prompt_ids must lie in [0, {vocab_size}); got {min(ids)}..{max(ids)}")
    return ids


class DecodeState:
    """One sequence being decoded: its window (the tokens the model sees), how many tokens it has made, and the
    per-token rules of ``params`` (see the module docstring).

    Per step: sample from ``mask(logits)`` (or hold off ``held_ids()`` yourself, a batch at once), emit the token,
    then ``accept(token)``: it returns ``finish_reason`` ("stop" or "length"), or None when the token joined the
    window to be fed next; then ``slide()`` says whether the window slid (prefill it again from position 0) or
    the token is fed on top of the cache. A sequence asked for no tokens is finished ("length") from the start.
    """

    __slots__ = ("params", "context_length", "window", "produced", "finish_reason", "_stop_ids")

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, context_length: int):
        self.params, self.context_length = params, context_length
        self.window: list[int] = list(prompt_ids)[-context_length:]
        self.produced = 0  # tokens accepted so far
        self.finish_reason: str | None = "length" if params.max_new_tokens == 0 else None
        self._stop_ids = frozenset(params.stop_ids)

    def held_ids(self) -> tuple[int, ...]:
        """The ids that cannot be sampled now: the stop ids while fewer than ``min_new_tokens`` were made."""
        return self.params.stop_ids if self.produced < self.params.min_new_tokens else ()

    def mask(self, logits: Any) -> Any:
        """``logits`` with ``held_ids()`` made impossible (``logits`` itself when none are held)."""
        return suppress_ids(logits, self.held_ids())

    def accept(self, token: int) -> str | None:
        """Count ``token``, just emitted; returns why the sequence ends ("stop": a stop id; "length":
        ``max_new_tokens`` made), or None after appending the token to the window."""
        self.produced += 1
        if token in self._stop_ids:
            self.finish_reason = "stop"
        elif self.produced >= self.params.max_new_tokens:
            self.finish_reason = "length"
        else:
            self.window.append(token)
        return self.finish_reason

    def slide(self) -> bool:
        """Whether the window outgrew ``context_length``; if so it now keeps its last ``context_length // 2``
        tokens (at least 1), to be prefilled again from position 0."""
        if len(self.window) <= self.context_length:
            return False
        self.window = self.window[-max(1, self.context_length // 2):]
        return True


def decode(
    forward: Forward,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    context_length: int,
    vocab_size: int,
    sampler: Sampler | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time, as each is sampled, continuing ``prompt_ids``.

    The prompt is prefilled once, then each token is decoded with the cache; ``use_cache=False`` instead
    feeds the whole window every step (the reference for tests and benchmarks). Both follow ``DecodeState``'s
    rules: the sliding-window policy in this module's docstring, and a stop after ``max_new_tokens`` ids or
    right after yielding an id in ``stop_ids`` (the stop id *is* yielded, so the caller can tell why it stopped).
    ``sampler`` picks each token from the last logits; None uses ``numpy_sampler(params)``.

    Raises ValueError for an empty prompt (prepend the tokenizer's <|bos|> id) or out-of-vocabulary ids.
    """
    state = DecodeState(check_prompt(prompt_ids, vocab_size), params, context_length)
    sample = sampler if sampler is not None else numpy_sampler(params)
    if state.finish_reason is not None:
        return
    logits, cache = forward(state.window, None)
    while True:
        token = sample(state.mask(logits))
        yield token
        if state.accept(token) is not None:
            return
        if state.slide():  # re-encode the kept tokens from position 0
            logits, cache = forward(state.window, None)
        elif use_cache:
            logits, cache = forward([token], cache)
        else:
            logits, _ = forward(state.window, None)


def suppress_ids(logits: Any, ids: Sequence[int], rows: Sequence[int] | None = None) -> Any:
    """A copy of ``logits`` (numpy or torch, [..., V]) where ``ids`` can never be sampled (their logit -inf);
    ``logits`` itself when ``ids`` is empty. ``rows``: only in these rows (distinct indices) of a numpy [B, V]
    batch (one copy and one assignment for all of them). How ``min_new_tokens`` keeps stop ids out of the first
    tokens."""
    if not ids or (rows is not None and not len(rows)):
        return logits
    logits = logits.clone() if hasattr(logits, "clone") else np.array(logits, copy=True)
    if rows is None or len(rows) == len(logits):  # every row (distinct indices): no index grid to build
        logits[..., list(ids)] = float("-inf")
    else:
        logits[np.ix_(list(rows), list(ids))] = float("-inf")
    return logits


def sample_next_token(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
    uniforms: np.ndarray | None = None,
) -> np.ndarray:
    """Pick one token per row of ``logits`` [B, V] (or [V]); returns int64 ids [B] (or a 0-d array).

    Temperature 0 (or below ``GREEDY_BELOW_TEMPERATURE``) is argmax. Otherwise the logits are divided by the
    temperature, cut to the ``top_k`` most likely tokens (ties with the k-th survive), then to the smallest set
    whose probability reaches ``top_p`` (the most likely token always survives), and one token is drawn from
    what is left with ``rng`` (or, given ``uniforms`` [B] in [0, 1), with those draws: rows that each have a
    generator of their own, decoding in one batch, draw one number each and are sampled together).
    """
    logits = np.asarray(logits)
    if logits.ndim == 1:
        return sample_next_token(logits[None, :], temperature, top_k, top_p, rng,
                                 None if uniforms is None else np.reshape(uniforms, 1))[0]
    if is_greedy(temperature):
        return logits.argmax(axis=-1).astype(np.int64)
    # one float64 array, computed on in place below: the [B, V] temporaries are much of a batch's sampling time
    scaled = np.divide(logits, temperature, dtype=np.float64)
    vocab = scaled.shape[-1]
    if top_k is not None and top_k < vocab:
        part = np.argpartition(scaled, vocab - top_k, axis=-1)[:, vocab - top_k :]  # the k largest, any order
        candidates = np.sort(part, axis=-1)  # in vocabulary order, as the full-vocabulary draw below walks
        values = np.take_along_axis(scaled, candidates, axis=-1)
        if (np.count_nonzero(scaled >= values.min(axis=-1, keepdims=True), axis=-1) == top_k).all():
            # no ties with the k-th: the same draw over the k candidates alone (the others have probability 0)
            picks = sample_next_token(values, 1.0, None, top_p, rng, uniforms)
            return np.take_along_axis(candidates, picks[:, None], axis=-1)[:, 0].astype(np.int64)
        kth = np.partition(scaled, vocab - top_k, axis=-1)[:, vocab - top_k : vocab - top_k + 1]  # [B, 1]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-scaled, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(scaled, order, axis=-1)
        probs = _softmax(sorted_logits)
        before = np.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
        sorted_logits = np.where(before >= top_p, -np.inf, sorted_logits)
        np.put_along_axis(scaled, order, sorted_logits, axis=-1)
    weights = _exp_shifted(scaled, out=scaled)  # the softmax, unnormalised: the draw scales u by the total instead
    if uniforms is None:  # a fresh generator only when asked to draw (seeding one from the OS costs ~10 us)
        uniforms = (rng if rng is not None else np.random.default_rng()).random(len(weights))
    return _inverse_cdf(weights, np.asarray(uniforms, dtype=np.float64))


DRAW_BLOCK = 64  # tokens per block of ``_inverse_cdf``
DRAW_DIRECT_MAX = 4096  # up to this many weights in all, one cumulative sum is quicker than the blocks


def _inverse_cdf(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """For each row of ``weights`` [B, V] (>= 0, some > 0), the first token whose cumulative weight passes
    ``uniforms`` [B] times the row's total: token j with probability ``weights[j] / total``.

    A cumulative sum over the whole vocabulary is one long chain of dependent additions (about 3 ns a token,
    most of a batch's sampling time); past ``DRAW_DIRECT_MAX`` weights this sums blocks of ``DRAW_BLOCK`` tokens,
    finds the block where u falls, and accumulates only inside it. The running sums differ from one long
    chain's only in rounding (1e-16), so a draw differs from it only when u lands that close to a boundary. A
    token of weight 0 is never picked.
    """
    rows, vocab = weights.shape
    index = np.arange(rows)
    if weights.size <= DRAW_DIRECT_MAX:  # a row or two of a small vocabulary: the numpy calls cost more than the sum
        running = np.cumsum(weights, axis=-1)
        return _kept(weights, _first_past(running, uniforms * running[:, -1]), index)
    width = -(-vocab // DRAW_BLOCK) * DRAW_BLOCK
    if width != vocab:  # zero weights pad the last block: never picked
        weights = np.pad(weights, ((0, 0), (0, width - vocab)))
    blocks = weights.reshape(rows, width // DRAW_BLOCK, DRAW_BLOCK)
    ends = np.cumsum(blocks.sum(axis=-1), axis=-1)  # [B, blocks]: the cumulative weight at each block's end
    target = uniforms * ends[:, -1]
    block = _first_past(ends, target)
    start = np.where(block > 0, ends[index, block - 1], 0.0)
    running = np.cumsum(blocks[index, block], axis=-1) + start[:, None]  # [B, DRAW_BLOCK]
    return _kept(weights, block * DRAW_BLOCK + _first_past(running, target), index)


def _first_past(running: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row of ``running`` [B, N] (non-decreasing), the first column whose value passes ``target`` [B]; the
    last column when rounding leaves none that does."""
    return np.minimum((running <= target[:, None]).sum(axis=-1), running.shape[1] - 1)


def _kept(weights: np.ndarray, picks: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``picks`` as int64, each moved off a token of weight 0, where rounding can leave one at a row's or a
    block's end: to the nearest kept token before it, or after it when there is none."""
    for row in np.flatnonzero(weights[index, picks] <= 0):
        kept = np.flatnonzero(weights[row] > 0)
        before = kept[kept <= picks[row]]
        picks[row] = before[-1] if len(before) else kept[0]
    return picks.astype(np.int64)


def _exp_shifted(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``exp(x - max(x))`` over the last axis: the softmax before its division by the sum. ``out`` (which may
    be ``x``) receives it instead of a new array."""
    e = np.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    return np.exp(e, out=e)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = _exp_shifted(x)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def numpy_sampler(params: SamplingParams) -> Sampler:
    """A sampler for numpy logits ([V] or [1, V]) with its own generator seeded by ``params.seed``."""
    rng = np.random.default_rng(params.seed)

    def sample(logits: Any) -> int:
        row = np.asarray(logits).reshape(-1)
        return int(sample_next_token(row, params.temperature, params.top_k, params.top_p, rng))

    return sample


def stream_text(token_ids: Iterable[int], tokenizer: Any, stop_ids: Iterable[int] = ()) -> Iterator[str]:
    """Text pieces of ``token_ids`` as soon as they decode; a stop id ends the stream without being shown.

    Multi-byte characters split across byte tokens are held back until complete, and control tokens are
    never printed. Closing the returned iterator early closes ``token_ids`` too (e.g. Ctrl-C in the chat).
    """
    stop = set(stop_ids)
    decoder = tokenizer.stream_decoder(skip_special=True)
    tokens = iter(token_ids)
    try:
        for token_id in tokens:
            if token_id in stop:
                break
            piece = decoder.feed(token_id)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


class StopStrings:
    """The stop-string rule, on text: cuts streamed text before the first stop string, holding back the end of the
    text for as long as it could be the start of one (so no part of a stop string is ever sent). Where the text is
    made from the tokens (the HTTP server), after ``DecodeState``'s rules have ended or continued the sequence."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is now safe to send; sets ``stopped`` once a stop string has appeared."""
        if not self.stops:
            return piece
        if self.stopped:
            return ""
        text = self.pending + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self.pending = True, ""
            return text[: min(found)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - keep:]
        return text[: len(text) - keep]

    def finish(self) -> str:
        """What was held back, at the end of the text (it never became a stop string)."""
        text, self.pending = self.pending, ""
        return text


def complete(generator: TextGenerator, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Continue ``prompt`` with ``generator`` and yield the text as it is generated. The prompt is encoded as the
    model expects (``llm.data.chat_template.prompt_ids``: after ``<|bos|>``, or as an imported model's source)."""
    tokenizer = generator.tokenizer
    ids = prompt_ids(tokenizer, prompt)
    return stream_text(generator.stream_generate(ids, params), tokenizer, params.stop_ids)
