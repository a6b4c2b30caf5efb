"""The serving engine's interface: what ``llm serve`` and the MLflow pyfunc need of an engine, whatever its kind.

Three kinds implement ``Engine``: ``llm.inference.batching.BatchEngine`` (a worker thread in this process),
``llm.inference.engine_process.EngineProcess`` (that engine in a child process) and ``EnginePool`` (several of
those side by side). A request goes in with ``submit`` and comes back as ``Event``s (each new token id, then one
final event saying why it ended); ``generate`` waits for whole answers instead. The lifecycle is written once, in
``EngineBase``: ``start()`` opens the engine (idempotent) and, called inside a running event loop, attaches it to
that loop (where an engine in another process delivers its events); ``stop()`` ends it, the requests still in
flight ending "cancelled"; ``with engine:`` does both; ``health()`` says whether it serves and what is wrong.

No torch here (an import-linter contract checks it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

from llm.inference.decoding import SamplingParams, check_prompt

if TYPE_CHECKING:
    from llm.data.tokenizer import Tokenizer

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
    (``max_new_tokens`` reached), "timeout" (the deadline passed), "cancelled" (``cancel()`` on the request, or the
    engine stopped), "error" (``error`` says what failed).
    """

    token_id: int | None = None
    finish_reason: str | None = None
    error: str | None = None


class EngineJob(Protocol):
    """A submitted request as its caller holds it: ``cancel()`` ends it at the engine's next step (a no-op once it
    ended); its final event then says "cancelled"."""

    def cancel(self) -> None: ...


class Engine(Protocol):
    """What serving needs of an engine (see the module docstring); ``EngineBase`` implements the shared part."""

    max_batch: int
    max_queue: int

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def context_length(self) -> int: ...

    @property
    def running(self) -> bool: ...

    def start(self) -> Self: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def health(self) -> tuple[bool, list[str]]: ...

    def stats(self) -> dict[str, int]: ...

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, on_event: Callable[[Event], None],
               deadline: float | None = None) -> EngineJob: ...

    def generate(self, requests: Sequence[tuple[Sequence[int], SamplingParams]], *,
                 deadline: float | None = None) -> list[tuple[list[int], Event]]: ...


class EngineBase:
    """The lifecycle every engine kind shares: ``start``, the context manager, ``health`` and ``generate``. A kind
    supplies ``_open`` (start what is not running yet), ``stop``, ``running``, ``submit`` and, when it delivers its
    events on an event loop, ``_attach``; ``problems`` when it can name what is wrong."""

    vocab_size: int

    def start(self) -> Self:
        """Open the engine (nothing happens when it is open already); inside a running event loop, also attach it
        there. Returns the engine. Raises what opening raises (an engine process that cannot load its model)."""
        self._open()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self
        self._attach(loop)
        return self

    def _open(self) -> None:
        raise NotImplementedError

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events on ``loop`` from now on (an engine whose worker delivers them itself does nothing)."""

    def stop(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def problems(self) -> list[str]:
        """What is wrong, one line each (for ``/health``); empty when all is well."""
        return []

    def health(self) -> tuple[bool, list[str]]:
        """(whether the engine serves: running and without problems, ``problems()``)."""
        problems = self.problems()
        return self.running and not problems, problems

    def _checked_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """``prompt_ids`` as ints, checked against the vocabulary, for ``submit``. Raises ValueError for an empty or
        out-of-vocabulary prompt, EngineStopped when the engine is not running."""
        ids = check_prompt(prompt_ids, self.vocab_size)
        if not self.running:
            raise EngineStopped("the engine is not running")
        return ids

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, on_event: Callable[[Event], None],
               deadline: float | None = None) -> EngineJob:
        raise NotImplementedError

    def generate(self, requests: Sequence[tuple[Sequence[int], SamplingParams]], *,
                 deadline: float | None = None) -> list[tuple[list[int], Event]]:
        """Submit every request at once, wait for all to end, and return each one's new token ids and its
        final event (whose ``finish_reason`` says why it ended). For callers without an event loop, such as
        the MLflow pyfunc: requests from several threads at once decode together. (An engine that delivers its
        events on an event loop must be attached to one running on another thread.)

        Raises what ``submit`` raises; a request that did fit in the queue is cancelled when a later one does not.
        """
        results: list[tuple[list[int], Event | None]] = [([], None) for _ in requests]
        done = threading.Semaphore(0)

        def collect(index: int) -> Callable[[Event], None]:
            def on_event(event: Event) -> None:
                if event.finish_reason is None:
                    results[index][0].append(event.token_id)
                else:
                    results[index] = (results[index][0], event)
                    done.release()

            return on_event

        jobs = []
        try:
            for i, (ids, params) in enumerate(requests):
                jobs.append(self.submit(ids, params, on_event=collect(i), deadline=deadline))
        except (EngineFull, EngineStopped, ValueError):
            for job in jobs:
                job.cancel()
            raise
        for _ in jobs:
            done.acquire()
        return results  # type: ignore[return-value]  # every final event has arrived
