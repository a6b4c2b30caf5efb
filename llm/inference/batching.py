"""Serving many requests with one decoder: a bounded queue, and a batch that decodes them together.

``BatchEngine`` owns an ``OnnxGenerator`` and one worker thread. ``submit`` puts a request (prompt ids,
sampling parameters, a deadline) on a bounded queue and returns at once; the worker admits queued requests
into the running batch as rows free up (continuous batching; the static-cache graph prefills the requests
admitted together in one decoder call), and each decoder call advances every row of the batch by one token.
The per-step work around that call is done for the whole batch at once (one sampling call, one assignment
for the stop ids held off), not row by row. Events (each new token id, then one final event with the finish
reason) go to the request's callback, called on the worker thread; a server hands them to its event loop.

The rows of the batch are independent sequences: each has its own sampler (seeded by its parameters, so
a seeded request gives the same tokens alone or in a batch) and its own ``llm.inference.decoding.DecodeState``,
the per-token rules ``decode`` follows (stop ids held off until ``min_new_tokens``, the stop and length ends,
the sliding window), so a row's greedy output equals what ``OnnxGenerator.generate`` gives for that request
alone. (Exactly so with the fp32 graph. The int8 graph quantizes each call's activations with one scale for the
whole call, so the rows that share a step or a prefill shift each other's logits by a rounding step, and a row
can then pick differently.)

No torch here (an import-linter contract checks it).
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from llm.inference.decoding import (
    DecodeState,
    SamplingParams,
    is_greedy,
    sample_next_token,
    suppress_ids,
)
from llm.inference.engine import (  # the events and errors of every engine: callers of BatchEngine import them here
    EngineBase,
    EngineFull,
    EngineStopped,  # noqa: F401
    Event,
)
from llm.inference.onnx_runtime import OnnxGenerator, StaticCacheDecoder

if TYPE_CHECKING:
    from llm.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PREFILL_LOGITS_BYTES = 32 << 20  # the logits of one prefill call ([rows, tokens, vocab] float32) stay below this


@dataclass(eq=False)
class Job:
    """A submitted request. ``cancel()`` ends it at the next step (its final event says "cancelled")."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None
    on_event: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class BatchEngine(EngineBase):
    """Decode the requests submitted from any thread together, ``max_batch`` at a time, with one worker thread: an
    ``llm.inference.engine.Engine``.

    ``max_queue`` bounds the requests waiting for a row (``submit`` raises EngineFull beyond it). ``on_step``, if
    given, is called on the worker thread after each pass of its loop (admissions, prefills, one decoder step):
    where a caller that forwards the events elsewhere sends what the pass produced at once. Use as a context
    manager, or call ``start()`` and ``stop()``.
    """

    def __init__(self, generator: OnnxGenerator, *, max_batch: int = 8, max_queue: int = 64,
                 static_cache: bool = True, on_step: Callable[[], None] | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.generator = generator
        self.max_batch, self.max_queue = max_batch, max_queue
        self._on_step = on_step
        # the export's static-cache graph when it has one (format 3): no cache copied from step to step
        self.static = generator.static_cache_decoder(max_batch) if static_cache else None
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._ids = itertools.count(1)
        self._running = threading.Event()
        self._worker: threading.Thread | None = None
        self._active = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decode steps by batch size
        if max_batch > 1 and not generator.batched and self.static is None:
            log.warning("%s is a format 1 export: requests are decoded one at a time (export it again to batch)",
                        generator.model_path)
            self.max_batch = 1

    # ------------------------------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        if self._worker is None:
            self._running.set()
            self._worker = threading.Thread(target=self._work, name="batch-engine", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still queued or running end with "cancelled"."""
        self._running.clear()
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        self._drain("cancelled")

    @property
    def running(self) -> bool:
        return self._running.is_set()

    @property
    def vocab_size(self) -> int:
        return self.generator.vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        return self.generator.tokenizer

    @property
    def context_length(self) -> int:
        return self.generator.context_length

    def stats(self) -> dict[str, int]:
        return {"active": self._active, "queued": self._queue.qsize(), "max_batch": self.max_batch,
                "max_queue": self.max_queue}

    # ------------------------------------------------------------------------------------------ requests

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, on_event: Callable[[Event], None],
               deadline: float | None = None) -> Job:
        """Queue a request; ``on_event`` gets its events on the worker thread (it must not block).

        ``deadline`` is a ``time.monotonic()`` value after which the request ends with "timeout", waiting or
        not. Raises ValueError for an empty or out-of-vocabulary prompt, EngineFull when the queue is full,
        EngineStopped when the engine is not running.
        """
        ids = self._checked_prompt(prompt_ids)
        job = Job(next(self._ids), ids, params, deadline, on_event)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise EngineFull(f"{self.max_queue} requests are waiting already") from None
        return job

    def _drain(self, reason: str) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            _emit(job, Event(finish_reason=reason))

    # ------------------------------------------------------------------------------------------ worker

    def _work(self) -> None:
        """Admit queued requests into free rows, prefill them, then advance the whole batch one token; repeat."""
        batch = _StaticBatch(self.static) if self.static is not None else _Batch(self.generator)
        fresh: list[_Row] = []  # rows whose window must be prefilled (new, or their window slid)
        try:
            while self._running.is_set():
                idle = not batch.rows and not fresh
                fresh += self._admit(self.max_batch - len(batch.rows) - len(fresh), wait=idle)
                while fresh:
                    rows, fresh = fresh, []
                    for group in batch.prefill_groups(rows):
                        fresh += self._prefill(group, batch)
                batch.join()
                self._active = len(batch.rows)
                if batch.rows:
                    self._decode_step(batch, fresh)
                    self._active = len(batch.rows) + len(fresh)
                if self._on_step is not None:
                    self._on_step()
        except Exception:  # noqa: BLE001 - a bug here must not leave a server accepting work nobody decodes
            log.exception("the batch engine's worker failed; the engine stops")
        finally:
            self._running.clear()  # submit now raises EngineStopped (HTTP 503)
            for row in [*batch.rows, *(row for row, _ in batch.joiners), *fresh]:
                _emit(row.job, Event(finish_reason="cancelled"))
            self._drain("cancelled")
            self._active = 0

    def _admit(self, free: int, wait: bool) -> list[_Row]:
        """Up to ``free`` queued requests as rows (waiting a moment for one when ``wait``); requests that ended
        while queued (cancelled, past their deadline) or ask for no tokens are answered here."""
        rows: list[_Row] = []
        while len(rows) < free:
            try:
                job = self._queue.get(timeout=0.05) if wait and not rows else self._queue.get_nowait()
            except queue.Empty:
                break
            state = DecodeState(job.prompt_ids, job.params, self.generator.context_length)
            reason = self._ended(job) or state.finish_reason  # asked for no tokens: "length"
            if reason is not None:
                _emit(job, Event(finish_reason=reason))
                continue
            rows.append(_Row(job, np.random.default_rng(job.params.seed), state))
        return rows

    def _ended(self, job: Job, now: float | None = None) -> str | None:
        if job.cancelled.is_set() or not self._running.is_set():
            return "cancelled"
        if job.expired(time.monotonic() if now is None else now):
            return "timeout"
        return None

    def _prefill(self, rows: list[_Row], batch: _Batch | _StaticBatch) -> list[_Row]:
        """Feed each row's whole window (one decoder call for the group) and take its next token; the rows that
        go on wait in ``batch.joiners``. Returns the rows whose window slid (prefill them again)."""
        try:
            logits, places = batch.prefill([row.window for row in rows])
        except Exception as err:  # noqa: BLE001 - these requests fail, the engine goes on
            self._fail(rows, err)
            return []
        slid = []
        now = time.monotonic()
        for row, token, place in zip(rows, _sample(rows, logits), places, strict=True):
            if not self._advance(row, token, now):
                continue
            if row.state.slide():
                slid.append(row)
            else:
                batch.add(row, place)
        return slid

    def _decode_step(self, batch: _Batch | _StaticBatch, fresh: list[_Row]) -> None:
        """One decoder call for every row of the batch; rows that ended leave it, rows whose window slid
        leave it for ``fresh``."""
        try:
            logits = batch.step()
        except Exception as err:  # noqa: BLE001 - these requests fail, the engine goes on
            self._fail(batch.rows, err)
            batch.keep([False] * len(batch.rows))
            return
        self.batch_sizes[len(batch.rows)] += 1
        keep = []
        now = time.monotonic()
        for row, token in zip(batch.rows, _sample(batch.rows, logits), strict=True):
            goes_on = self._advance(row, token, now)
            if goes_on and row.state.slide():
                fresh.append(row)
                goes_on = False
            keep.append(goes_on)
        batch.keep(keep)

    def _advance(self, row: _Row, token: int, now: float) -> bool:
        """Emit the row's next token (unless the request was cancelled or is past its deadline); False when the
        row has ended (its final event sent), else the token joined the window, to be fed next."""
        reason = self._ended(row.job, now)
        if reason is None:
            _emit(row.job, Event(token_id=token))
            reason = row.state.accept(token)  # "stop", "length", or None: it goes on
        if reason is not None:
            _emit(row.job, Event(finish_reason=reason))
            return False
        return True

    def _fail(self, rows: list[_Row], err: Exception) -> None:
        log.error("decoding failed for requests %s: %s: %s", [r.job.id for r in rows], type(err).__name__, err)
        for row in rows:
            _emit(row.job, Event(finish_reason="error", error=f"{type(err).__name__}: {err}"))


@dataclass(eq=False)
class _Row:
    """One request being decoded: its sampler and its ``DecodeState`` (whose window is the tokens the model sees;
    while the row is in the batch, all but the last are in the cache and the last is fed next)."""

    job: Job
    rng: np.random.Generator
    state: DecodeState

    @property
    def window(self) -> list[int]:
        return self.state.window


def _sample(rows: list[_Row], logits: np.ndarray) -> list[int]:
    """Each row's next token from ``logits`` [B, V]: rows with the same sampling settings are sampled
    together, each with one draw from its own generator, so a row gets the token it would get alone
    (``numpy_sampler`` draws the same number for it). Stop ids are kept out until ``min_new_tokens``."""
    held: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)  # stop ids -> the rows holding them off
    groups: dict[tuple, list[int]] = collections.defaultdict(list)  # sampling settings -> the rows using them
    for i, row in enumerate(rows):
        p = row.job.params
        if held_ids := row.state.held_ids():
            held[held_ids].append(i)
        groups[(0.0, None, None) if is_greedy(p.temperature) else (p.temperature, p.top_k, p.top_p)].append(i)
    for stop_ids, index in held.items():  # usually one group: every request of a server shares its stop ids
        logits = suppress_ids(logits, stop_ids, rows=index)
    if len(groups) == 1:  # every row samples alike (the usual case): no gathering and scattering of rows
        (temperature, top_k, top_p), = groups
        uniforms = None if is_greedy(temperature) else np.array([row.rng.random() for row in rows])
        return sample_next_token(logits, temperature, top_k, top_p, uniforms=uniforms).tolist()
    tokens = [0] * len(rows)
    for (temperature, top_k, top_p), index in groups.items():
        uniforms = None if is_greedy(temperature) else np.array([rows[i].rng.random() for i in index])
        picks = sample_next_token(logits[index], temperature, top_k, top_p, uniforms=uniforms)
        for i, token in zip(index, picks.tolist(), strict=True):
            tokens[i] = token
    return tokens


class _Batch:
    """The rows decoding together and their one cache, each row's tokens at its right end.

    Rows of different lengths are padded on the left: ``mask`` [B, P] is False on the padding, so no token
    attends to it, and each row's next token is fed at its own position (``len(window) - 1``). Leading
    columns that no row uses any more are cut off, so P is the longest row's cache.
    """

    def __init__(self, generator: OnnxGenerator):
        self.generator = generator
        self.rows: list[_Row] = []
        self.joiners: list[tuple[_Row, list[np.ndarray]]] = []  # prefilled rows, with their caches [1, Hkv, p, D]
        self.cache: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), dtype=bool)

    def prefill_groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """One row per prefill: each has a cache of its own length until ``join`` pads them."""
        return [[row] for row in rows]

    def prefill(self, windows: list[list[int]]) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """The last token's logits [n, V] for each window and its cache, to join the batch."""
        out = [self.generator.forward(np.array([window], dtype=np.int64)) for window in windows]
        return np.concatenate([logits[:, -1] for logits, _ in out]), [cache for _, cache in out]

    def add(self, row: _Row, cache: list[np.ndarray]) -> None:
        """A prefilled row, to join the batch at the next ``join``."""
        self.joiners.append((row, cache))

    def join(self) -> None:
        """Add the prefilled rows, padding the shorter caches (theirs or the batch's) on the left."""
        for row, cache in self.joiners:
            p, P = cache[0].shape[2], self.mask.shape[1]
            width = max(p, P)
            row_mask = np.arange(width) >= width - p
            if self.rows:
                self.cache = [np.concatenate([_pad_left(a, width - P), _pad_left(b, width - p)])
                              for a, b in zip(self.cache, cache, strict=True)]
                self.mask = np.concatenate([np.pad(self.mask, ((0, 0), (width - P, 0))), row_mask[None]])
            else:
                self.cache, self.mask = cache, row_mask[None]
            self.rows.append(row)
        self.joiners = []

    def step(self) -> np.ndarray:
        """Feed each row's last token at its position; returns the next-token logits [B, V]."""
        ids = np.array([[row.window[-1]] for row in self.rows], dtype=np.int64)
        if self.generator.batched:
            positions = np.array([[len(row.window) - 1] for row in self.rows], dtype=np.int64)
            logits, self.cache = self.generator.forward(ids, self.cache, position_ids=positions, past_mask=self.mask)
        else:  # a format 1 export: one row, no padding, so its positions are implicit
            logits, self.cache = self.generator.forward(ids, self.cache)
        self.mask = np.pad(self.mask, ((0, 0), (0, 1)), constant_values=True)
        return logits[:, -1]

    def keep(self, keep: list[bool]) -> None:
        """Keep the rows marked True; cut the cache columns that no remaining row uses."""
        index = [i for i, k in enumerate(keep) if k]
        self.rows = [self.rows[i] for i in index]
        if not index:
            self.cache, self.mask = [], np.zeros((0, 0), dtype=bool)
            return
        if len(index) < len(keep):
            self.cache, self.mask = [a[index] for a in self.cache], self.mask[index]
        first = int(self.mask.any(axis=0).argmax())  # the first column some row uses
        if first:
            self.cache = [np.ascontiguousarray(a[:, :, first:]) for a in self.cache]
            self.mask = np.ascontiguousarray(self.mask[:, first:])


class _StaticBatch:
    """The rows decoding together over a static cache (``StaticCacheDecoder``): row i lives in slot i.

    A new row is prefilled straight into the next free slot; a step writes each row's new token into its own
    slot, in place; a row that leaves is replaced by the last row (one row's cache copied), so the rows in use
    stay slots 0..B-1. Nothing is padded, and no step copies the cache.
    """

    def __init__(self, decoder: StaticCacheDecoder):
        self.decoder = decoder
        self.rows: list[_Row] = []
        self.joiners: list[tuple[_Row, int]] = []  # prefilled rows and their slots

    def prefill_groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """The rows to prefill in one call each: similar lengths (sorted, and no more padding than real tokens)
        whose logits, all positions of all rows, stay under ``PREFILL_LOGITS_BYTES``."""
        groups: list[list[_Row]] = []
        group: list[_Row] = []
        tokens = 0
        for row in sorted(rows, key=lambda r: len(r.window)):
            padded = (len(group) + 1) * len(row.window)  # the longest window so far sets the width
            if group and (padded > 2 * (tokens + len(row.window))
                          or padded * self.decoder.vocab_size * 4 > PREFILL_LOGITS_BYTES):
                groups.append(group)
                group, tokens = [], 0
            group.append(row)
            tokens += len(row.window)
        return groups + [group] if group else groups

    def prefill(self, windows: list[list[int]]) -> tuple[np.ndarray, list[int]]:
        """Encode the windows into the next free slots, in one decoder call; returns the last tokens' logits
        [n, V] and the slots."""
        first = len(self.rows) + len(self.joiners)
        return self.decoder.prefill_rows(first, windows), list(range(first, first + len(windows)))

    def add(self, row: _Row, slot: int) -> None:
        """A prefilled row, to join the batch at the next ``join`` in the next free slot: when a row prefilled
        before it in the same call has ended (or slid), its cache moves down into that row's slot."""
        free = len(self.rows) + len(self.joiners)
        if slot != free:
            self.decoder.move(slot, free, len(row.window) - 1)  # its cached tokens
        self.joiners.append((row, free))

    def join(self) -> None:
        self.rows += [row for row, _ in self.joiners]  # in slots len(rows), len(rows)+1, ... (see ``add``)
        self.joiners = []

    def step(self) -> np.ndarray:
        """Feed each row's last token at its position (the number of tokens it has cached); returns [B, V]."""
        return self.decoder.step([row.window[-1] for row in self.rows], [len(row.window) - 1 for row in self.rows])

    def keep(self, keep: list[bool]) -> None:
        """Keep the rows marked True: the last rows kept move into the slots of the rows that left."""
        n = sum(keep)
        holes = [i for i in range(n) if not keep[i]]
        movers = [i for i in range(n, len(keep)) if keep[i]]
        rows = self.rows[:n]
        for hole, source in zip(holes, movers, strict=True):
            self.decoder.move(source, hole, len(self.rows[source].window) - 1)  # its cached tokens
            rows[hole] = self.rows[source]
        self.rows = rows


def _pad_left(cache: np.ndarray, n: int) -> np.ndarray:
    """``cache`` [B, Hkv, P, D] with ``n`` zero slots before its first one."""
    return np.pad(cache, ((0, 0), (0, 0), (n, 0), (0, 0))) if n else cache


def _emit(job: Job, event: Event) -> None:
    try:
        job.on_event(event)
    except Exception:  # noqa: BLE001 - a broken callback must not stop the engine
        log.exception("the event callback of request %d failed", job.id)
