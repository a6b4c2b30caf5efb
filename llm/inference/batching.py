"""Serving many requests with one decoder: a bounded queue, and a batch that decodes them together.

``BatchEngine`` owns an ``OnnxGenerator`` and one worker thread. ``submit`` puts a request (prompt ids,
sampling parameters, a deadline) on a bounded queue and returns at once; the worker admits queued requests
into the running batch as rows free up (continuous batching), and each decoder call advances every row of
the batch by one token. Events (each new token id, then one final event with the finish reason) go to the
request's callback, called on the worker thread; a server hands them to its event loop.

The rows of the batch are independent sequences: each has its own sampler (seeded by its parameters, so
a seeded request gives the same tokens alone or in a batch), its own stop ids and its own window that
slides exactly as ``llm.inference.decoding.decode`` slides it, so a row's greedy output equals what
``OnnxGenerator.generate`` gives for that request alone.

No torch here (an import-linter contract checks it).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llm.inference.decoding import SamplingParams, check_prompt, decode, numpy_sampler
from llm.inference.onnx_runtime import OnnxGenerator

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "timeout", "cancelled", "error")


class EngineFull(RuntimeError):
    """The queue holds ``max_queue`` requests already: try again later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is not running (not started yet, or shutting down): HTTP 503."""


@dataclass(frozen=True)
class Event:
    """One thing that happened to a request: a new token (``token_id``), or its end (``finish_reason``).

    ``finish_reason`` is None while tokens come; the last event has ``token_id`` None and one of
    ``FINISH_REASONS``: "stop" (a stop id was sampled; that id came as the event before), "length"
    (``max_new_tokens`` reached), "timeout" (the deadline passed), "cancelled" (``Job.cancel``), "error"
    (``error`` says what failed).
    """

    token_id: int | None = None
    finish_reason: str | None = None
    error: str | None = None


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


class BatchEngine:
    """Decode the requests submitted from any thread together, ``max_batch`` at a time, with one worker thread.

    ``max_queue`` bounds the requests waiting for a row (``submit`` raises EngineFull beyond it). Use as a
    context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(self, generator: OnnxGenerator, *, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.generator = generator
        self.max_batch, self.max_queue = max_batch, max_queue
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._ids = itertools.count(1)
        self._running = threading.Event()
        self._worker: threading.Thread | None = None
        self._active = 0

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> BatchEngine:
        if self._worker is None:
            self._running.set()
            self._worker = threading.Thread(target=self._work, name="batch-engine", daemon=True)
            self._worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still queued or running end with "cancelled"."""
        self._running.clear()
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        self._drain("cancelled")

    def __enter__(self) -> BatchEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._running.is_set()

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
        ids = check_prompt(prompt_ids, self.generator.vocab_size)
        if not self.running:
            raise EngineStopped("the engine is not running")
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
        while self._running.is_set():
            try:
                job = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            self._active = 1
            try:
                self._run_alone(job)
            finally:
                self._active = 0

    def _run_alone(self, job: Job) -> None:
        """Decode one job by itself (the reference behaviour; the batched path must match it)."""
        g = self.generator
        sampler = numpy_sampler(job.params)

        def step(ids, past):
            logits, present = g.forward([ids], past)
            return logits[:, -1, :], present

        produced = 0
        try:
            for token in decode(step, job.prompt_ids, job.params, context_length=g.context_length,
                                vocab_size=g.vocab_size, sampler=sampler):
                if job.cancelled.is_set() or not self._running.is_set():
                    _emit(job, Event(finish_reason="cancelled"))
                    return
                if job.expired(time.monotonic()):
                    _emit(job, Event(finish_reason="timeout"))
                    return
                produced += 1
                _emit(job, Event(token_id=token))
                if token in job.params.stop_ids:
                    _emit(job, Event(finish_reason="stop"))
                    return
        except Exception as err:  # noqa: BLE001 - the request fails, the engine goes on
            log.exception("request %d failed", job.id)
            _emit(job, Event(finish_reason="error", error=f"{type(err).__name__}: {err}"))
            return
        _emit(job, Event(finish_reason="length"))


def _emit(job: Job, event: Event) -> None:
    try:
        job.on_event(event)
    except Exception:  # noqa: BLE001 - a broken callback must not stop the engine
        log.exception("the event callback of request %d failed", job.id)
