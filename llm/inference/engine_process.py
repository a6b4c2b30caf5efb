"""``llm serve``'s batch engine in a process of its own, so that decoding and HTTP do not share one GIL.

In one process, the ``BatchEngine`` worker and the server's event loop take turns at the interpreter lock: each
decoder step's Python (sampling, events) waits while the loop parses requests and writes chunks, and the other
way round. ``EngineProcess`` runs the engine in a child process and speaks to it over a pipe; like ``BatchEngine``
and ``EnginePool`` (several side by side, on more cores) it is an ``llm.inference.engine.Engine``, so
``llm.api_server`` takes any of them, and it shares their lifecycle (``llm.inference.engine.EngineBase``).

The protocol, one pickled message at a time:

    server -> engine    ("submit", job id, prompt ids, SamplingParams, seconds left or None)
                        ("cancel", job id)        ("stop",)
    engine -> server    ("ready", model file name) or ("failed", message), once, after loading the model
                        [(job id, token id, finish reason, error), ...]: the events of one or more decoder steps
                        ("heartbeat",): alive, nothing else to say

The engine process sends after a decoder step only when an event is urgent (a request's first token, for the
time to first token, or its end) or ``flush_s`` (``EVENT_FLUSH_S``) has passed since the last message, so that
a step of eight rows is not eight wake-ups of the server; the server reads the pipe on its event loop
(``add_reader``), with no thread of its own (where the loop cannot watch a pipe, as on Windows, a thread reads
it and hands each message to the loop). The server bounds the requests in flight (``max_batch`` decoding plus
``max_queue`` waiting: EngineFull beyond them, checked here so that a refusal is immediate); the engine
process's own queue is made large enough never to refuse what the server let through.

The engine process ignores SIGINT (Ctrl-C reaches the whole process group; the server stops it in order) and
exits when the server asks, when the pipe closes (the server died, even by SIGKILL), or when its worker fails.
When it ends unasked, every request in flight ends "cancelled" (HTTP 503) and ``running`` turns False.
It also sends ``("heartbeat",)`` when it has sent nothing for ``HEARTBEAT_S``; ``EnginePool`` replaces an
engine that exited or fell silent (see its docstring). The server's messages go through a queue and a thread
of their own (``_send``), so its event loop never blocks on a pipe that a stalled engine stopped reading.

No torch here (an import-linter contract checks it).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llm.data.tokenizer import Tokenizer, load_tokenizer
from llm.inference.batching import BatchEngine
from llm.inference.decoding import SamplingParams
from llm.inference.engine import EngineBase, EngineFull, EngineStopped, Event
from llm.inference.onnx_runtime import TOKENIZER_DIR, OnnxGenerator, read_generation_config

log = logging.getLogger(__name__)

EVENT_FLUSH_S = 0.005  # the longest a decoded token waits in the engine process (by default streams pause 0.02 s)
LOAD_TIMEOUT_S = 300.0  # loading the model in the engine process; past this the server gives up
HEARTBEAT_S = 0.25  # how often an engine process says it is alive
SUPERVISE_S = 0.2  # how often the server checks its engines
MAX_BACKOFF_S = 10.0  # the longest wait before starting a replacement engine


class EngineProcessError(RuntimeError):
    """The engine process could not load the model, or ended while loading it; the message says why."""


class _RemoteJob:
    """A request in the engine process. ``cancel()`` asks the engine to end it (once; a no-op once it ended)."""

    def __init__(self, engine: EngineProcess, job_id: int, on_event: Callable[[Event], None]):
        self.engine, self.id, self.on_event = engine, job_id, on_event
        self.done = self._cancelled = False

    def cancel(self) -> None:
        if not self.done and not self._cancelled:
            self._cancelled = True
            try:
                self.engine._send(("cancel", self.id), bounded=False)
            except OSError:
                pass  # the engine process is gone: the request ends with it ("cancelled")


class EngineProcess(EngineBase):
    """A ``BatchEngine`` over ``export_dir`` (int8 unless ``fp32`` or there is none) in a child process.

    ``start()`` (outside an event loop) starts the process and waits for the model to load, raising
    EngineProcessError when it cannot; ``start()`` inside the server's event loop then reads the engine's events
    there, where each request's ``on_event`` is called. ``stop()`` ends the process; what was in flight ends
    "cancelled".
    """

    def __init__(self, export_dir: str | Path, *, fp32: bool = False, threads: int | None = None, max_batch: int = 8,
                 max_queue: int = 64, flush_s: float = EVENT_FLUSH_S, tokenizer: Tokenizer | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.export_dir = Path(export_dir)
        self.fp32, self.threads, self.flush_s = fp32, threads, flush_s
        self.max_batch, self.max_queue = max_batch, max_queue
        config = read_generation_config(self.export_dir)
        self.context_length = int(config["context_length"])
        self.vocab_size = int(config["vocab_size"])
        # the export's tokenizer (``tokenizer``: one already loaded from it, which a pool's engines share)
        self.tokenizer: Tokenizer = tokenizer or load_tokenizer(self.export_dir / TOKENIZER_DIR)
        self.model_file: str | None = None  # the graph the engine runs, once started
        self._process: Any = None
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_thread: threading.Thread | None = None
        self._jobs: dict[int, _RemoteJob] = {}
        self._ids = itertools.count(1)
        self._outbox: queue.Queue = queue.Queue()  # messages to the engine, sent by ``_sender`` off the event loop
        self._sender: threading.Thread | None = None
        self._last_beat = 0.0  # time.monotonic() of the engine's last heartbeat
        self._running = False
        self._stopping = False

    # ------------------------------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        if self._process is None:
            self.launch()
            self.wait_ready()

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's events on ``loop`` (where each request's ``on_event`` is then called)."""
        if self._loop is None and self._running:
            try:
                loop.add_reader(self._conn.fileno(), self._readable)
                self._reader_thread = None
            except NotImplementedError:  # Windows' proactor loop watches no pipe: a thread reads, the loop delivers
                self._reader_thread = threading.Thread(target=self._read_for, args=(loop,), daemon=True,
                                                       name="engine-events")
                self._reader_thread.start()
            self._loop = loop

    def launch(self) -> None:
        """Start the process (it loads the model while this returns); ``wait_ready`` waits for the model."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of the server's threads
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_engine_main, name="llm-engine", daemon=True,
            args=(child, str(self.export_dir), self.fp32, self.threads, self.max_batch, self.max_queue, self.flush_s))
        self._process.start()
        child.close()  # the child's end lives in the child: its exit is this end's EOF
        self._outbox = queue.Queue()
        self._sender = threading.Thread(target=self._send_all, args=(self._conn, self._outbox), daemon=True,
                                        name="engine-sender")
        self._sender.start()

    def wait_ready(self) -> None:
        """Wait for the launched process to load the model; EngineProcessError (the process ended) if it cannot."""
        try:
            if not self._conn.poll(LOAD_TIMEOUT_S):
                raise EngineProcessError(f"the engine process did not load {self.export_dir} in {LOAD_TIMEOUT_S:g} s")
            message = self._conn.recv()
        except EOFError:
            self._process.join(5)
            message = ("failed", f"the engine process exited with code {self._process.exitcode} while loading")
        except EngineProcessError:
            self._end_process()
            raise
        if message[0] != "ready":
            self._end_process()
            raise EngineProcessError(message[1])
        self.model_file = message[1]
        self._last_beat = time.monotonic()
        self._running = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine process (its requests end "cancelled") and wait up to ``timeout`` s for it."""
        if self._process is None or self._stopping:
            self._running = False
            return
        self._stopping = True
        self._running = False
        self._send(("stop",), bounded=False)
        self._process.join(timeout)
        self._end_process()
        if self._reader_thread is not None:
            self._reader_thread.join(5)  # it reads to the pipe's end, which the process's exit closed
        else:
            self._drain()
        self._detach()
        self._cancel_all()
        self._end_sender()
        self._conn.close()

    def _end_sender(self) -> None:
        if self._sender is not None:
            self._outbox.put(None)
            self._sender.join(5)  # a send blocked on a stopped engine ends when its pipe closes
            self._sender = None

    def _end_process(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(5)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def in_flight(self) -> int:
        """Requests submitted that have not ended (as far as the events read so far say)."""
        return len(self._jobs)

    def stats(self) -> dict[str, int]:
        """In flight, as the server counts them: the first ``max_batch`` decode, the rest wait."""
        return {"active": min(self.in_flight, self.max_batch), "queued": max(0, self.in_flight - self.max_batch),
                "max_batch": self.max_batch, "max_queue": self.max_queue}

    # ------------------------------------------------------------------------------------------ requests

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, on_event: Callable[[Event], None],
               deadline: float | None = None) -> _RemoteJob:
        """As ``BatchEngine.submit``, but ``on_event`` is called on the event loop that ``start()`` ran in."""
        ids = self._checked_prompt(prompt_ids)
        if self.in_flight >= self.max_batch + self.max_queue:
            raise EngineFull(f"{self.max_queue} requests are waiting already")
        job = _RemoteJob(self, next(self._ids), on_event)
        self._jobs[job.id] = job
        try:
            self._send(("submit", job.id, ids, params, None if deadline is None else deadline - time.monotonic()))
        except OSError:
            del self._jobs[job.id]
            raise EngineStopped("the engine process is gone") from None
        return job

    def _send(self, message: tuple, bounded: bool = True) -> None:
        """Queue ``message`` for the sender thread: the event loop never waits on the pipe (a stalled engine
        stops reading it). Raises OSError when ``bounded`` and the queue already holds as many messages as
        requests may be in flight (the engine is not reading: HTTP 503)."""
        if bounded and self._outbox.qsize() >= self.max_batch + self.max_queue:
            raise OSError("the engine process is not reading its messages")
        self._outbox.put(message)

    @staticmethod
    def _send_all(conn: Any, outbox: queue.Queue) -> None:
        """The sender thread: each queued message to the engine, until None or the pipe breaks."""
        while (message := outbox.get()) is not None:
            try:
                conn.send(message)
            except (OSError, ValueError):  # the engine is gone (or its pipe closed): its requests end with it
                return

    def _readable(self) -> None:
        """On the event loop: one message from the engine process (events or a heartbeat), or its end."""
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._lost()
            return
        self._received(message)

    def _read_for(self, loop: asyncio.AbstractEventLoop) -> None:
        """On a thread of its own: each message from the engine, handed to ``loop``; then the process's end."""
        try:
            while True:
                loop.call_soon_threadsafe(self._received, self._conn.recv())
        except (EOFError, OSError):
            if not self._stopping and not loop.is_closed():
                loop.call_soon_threadsafe(self._lost)

    def _received(self, message: list | tuple) -> None:
        self._last_beat = time.monotonic()  # any message says the engine is alive
        if isinstance(message, list):
            self._deliver(message)

    def _deliver(self, events: list[tuple]) -> None:
        for job_id, token_id, finish_reason, error in events:
            job = self._jobs.get(job_id)
            if job is None:
                continue
            if finish_reason is not None:
                job.done = True
                del self._jobs[job_id]
            try:
                job.on_event(Event(token_id, finish_reason, error))
            except Exception:  # noqa: BLE001 - one broken callback must not lose the other requests' events
                log.exception("the event callback of request %d failed", job_id)

    def _drain(self) -> None:
        """Deliver what the engine process sent before it ended."""
        try:
            while self._conn.poll():
                self._received(self._conn.recv())
        except (EOFError, OSError):
            pass

    def _lost(self) -> None:
        """The engine process ended (its pipe closed): every request in flight ends "cancelled" (HTTP 503)."""
        self._running = False
        self._detach()
        if not self._stopping:
            self._process.join(5)
            log.error("the engine process exited (code %s): its requests end with 503", self._process.exitcode)
        self._cancel_all()

    # ------------------------------------------------------------------------------------------ supervision

    def problem(self, heartbeat_timeout_s: float) -> str | None:
        """Why this engine needs replacing (it exited, or sent nothing for ``heartbeat_timeout_s``), or None."""
        if self._stopping or self._process is None:
            return None
        if not self._running:
            return f"its process exited (code {self._process.exitcode})"
        silent = time.monotonic() - self._last_beat
        if silent > heartbeat_timeout_s:
            return f"no heartbeat for {silent:.1f} s"
        return None

    def fail(self) -> None:
        """On the event loop: take this engine out of service at once (its requests end "cancelled", HTTP 503)
        and kill its process; ``relaunch`` then starts another."""
        self._running = False
        self._detach()
        self._cancel_all()
        if self._process is not None and self._process.is_alive():
            self._process.kill()  # SIGKILL: a stopped (SIGSTOP) process ends too

    def relaunch(self) -> None:
        """Off the event loop: reap the failed process, start a new one and wait for its model (raises
        EngineProcessError when it cannot load); ``start()`` on the loop then reads its events."""
        self._process.join(5)
        self._end_sender()
        self._conn.close()
        self._process = None
        self.launch()
        self.wait_ready()

    def _detach(self) -> None:
        if self._loop is not None:
            if self._reader_thread is None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
            self._loop = None  # a reader thread ends with the pipe

    def _cancel_all(self) -> None:
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.done = True
            try:
                job.on_event(Event(finish_reason="cancelled"))
            except Exception:  # noqa: BLE001
                log.exception("the event callback of request %d failed", job.id)


class EnginePool(EngineBase):
    """``engines`` engine processes decoding side by side, each on about a core: a request goes to the running
    one with the fewest requests in flight. ``max_batch`` is shared out (each decodes up to ``ceil(max_batch /
    engines)`` rows); ``max_batch + max_queue`` bounds the requests in flight in all (EngineFull beyond). One
    engine decodes a small model on about one core whatever its onnxruntime threads (a step of such a model is
    many small operators), so more cores serve more requests through more engines, each holding a copy of the
    model.

    Supervised (once ``start()`` ran in the event loop): an engine whose process exits, or that sends no
    heartbeat for ``heartbeat_timeout_s`` (stopped, hung), is taken out at once (its requests end with 503,
    ``problems()`` names it for ``/health``), killed and replaced, the first time at once and then after a
    doubling pause; more than ``max_restarts`` replacements within ``restart_window_s`` call ``on_give_up``
    (the server then exits non-zero, for Docker's or systemd's restart policy).
    """

    def __init__(self, export_dir: str | Path, *, engines: int = 1, fp32: bool = False, threads: int | None = None,
                 max_batch: int = 8, max_queue: int = 64, flush_s: float = EVENT_FLUSH_S,
                 heartbeat_timeout_s: float = 2.0, max_restarts: int = 5, restart_window_s: float = 60.0,
                 on_give_up: Callable[[str], None] | None = None):
        if engines < 1:
            raise ValueError(f"engines must be >= 1, got {engines}")
        per_engine = -(-max_batch // engines)
        first = EngineProcess(export_dir, fp32=fp32, threads=threads, max_batch=per_engine, max_queue=max_queue,
                              flush_s=flush_s)
        self.engines = [first] + [EngineProcess(export_dir, fp32=fp32, threads=threads, max_batch=per_engine,
                                                max_queue=max_queue, flush_s=flush_s, tokenizer=first.tokenizer)
                                  for _ in range(engines - 1)]
        self.tokenizer, self.context_length, self.vocab_size = first.tokenizer, first.context_length, first.vocab_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.heartbeat_timeout_s, self.max_restarts, self.restart_window_s = (heartbeat_timeout_s, max_restarts,
                                                                               restart_window_s)
        self.on_give_up = on_give_up
        self.model_file: str | None = None
        self.restarts: collections.deque[float] = collections.deque()  # when each replacement began
        self.gave_up: str | None = None
        self._replacing: dict[int, str] = {}  # engine index -> why it is being replaced
        self._supervisor: asyncio.Task | None = None

    def _open(self) -> None:
        launched = [engine for engine in self.engines if engine.pid is None]
        try:
            for engine in launched:  # load the copies of the model at the same time
                engine.launch()
            for engine in launched:
                engine.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.model_file = self.engines[0].model_file

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read every engine's events on ``loop``, and supervise them there."""
        for engine in self.engines:
            engine.start()  # launched already: it attaches to the loop
        if self._supervisor is None:
            self._supervisor = loop.create_task(self._supervise(), name="engine-supervisor")

    def stop(self, timeout: float = 10.0) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        for engine in self.engines:
            engine.stop(timeout)

    @property
    def running(self) -> bool:
        return all(engine.running for engine in self.engines) and not self._replacing

    def problems(self) -> list[str]:
        """What is wrong, one line per engine that failed (for ``/health``); empty when all is well."""
        found = [(i, self._replacing.get(i) or engine.problem(self.heartbeat_timeout_s))
                 for i, engine in enumerate(self.engines)]
        return [f"engine {i} (pid {self.engines[i].pid}): {why}; being replaced" for i, why in found if why]

    def stats(self) -> dict[str, int]:
        each = [engine.stats() for engine in self.engines]
        return {"active": sum(s["active"] for s in each), "queued": sum(s["queued"] for s in each),
                "max_batch": self.max_batch, "max_queue": self.max_queue, "engines": len(self.engines)}

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, on_event: Callable[[Event], None],
               deadline: float | None = None) -> _RemoteJob:
        """As ``EngineProcess.submit``, on the running engine with the fewest requests in flight; EngineStopped
        when none is running."""
        running = [engine for engine in self.engines if engine.running]
        if not running:
            raise EngineStopped("no engine process is running")
        if sum(engine.in_flight for engine in self.engines) >= self.max_batch + self.max_queue:
            raise EngineFull(f"{self.max_queue} requests are waiting already")
        engine = min(running, key=lambda engine: engine.in_flight)
        return engine.submit(prompt_ids, params, on_event=on_event, deadline=deadline)

    async def _supervise(self) -> None:
        """Every ``SUPERVISE_S``: replace each engine that has a ``problem``."""
        while True:
            await asyncio.sleep(SUPERVISE_S)
            for i, engine in enumerate(self.engines):
                if i not in self._replacing and (why := engine.problem(self.heartbeat_timeout_s)) is not None:
                    self._replacing[i] = why
                    asyncio.get_running_loop().create_task(self._replace(i, engine, why))

    async def _replace(self, i: int, engine: EngineProcess, why: str) -> None:
        """Take engine ``i`` out, then start another after the backoff (again while it fails to load)."""
        log.error("engine %d (pid %s): %s; its requests end with 503, and it is replaced", i, engine.pid, why)
        engine.fail()
        while True:
            now = time.monotonic()
            self.restarts.append(now)
            while self.restarts and self.restarts[0] < now - self.restart_window_s:
                self.restarts.popleft()
            if len(self.restarts) > self.max_restarts:
                self.gave_up = (f"{len(self.restarts)} engine failures within {self.restart_window_s:g} s "
                                f"(the last: {why}); giving up")
                log.critical("%s", self.gave_up)
                if self.on_give_up is not None:
                    self.on_give_up(self.gave_up)
                return
            await asyncio.sleep(min(MAX_BACKOFF_S, 0.5 * 2 ** (len(self.restarts) - 2)) if len(self.restarts) > 1
                                else 0.0)
            try:
                await asyncio.to_thread(engine.relaunch)
            except EngineProcessError as err:
                why = str(err)
                log.error("engine %d: the replacement failed: %s", i, err)
                continue
            if self._supervisor is None:  # the pool stopped meanwhile: so does the replacement
                engine.stop()
                return
            engine.start()
            del self._replacing[i]
            log.warning("engine %d replaced (pid %s)", i, engine.pid)
            return


# ---------------------------------------------------------------------------------------------- the child


class _Outbox:
    """The engine process's events on their way to the server: appended by the worker's callbacks, sent after a
    decoder step (``flush``) in one message when one is urgent or ``flush_s`` has passed."""

    def __init__(self, conn: Any, flush_s: float):
        self.conn, self.flush_s = conn, flush_s
        self.events: collections.deque[tuple] = collections.deque()
        self.urgent = False
        self.sent = 0.0
        self.broken = False  # the server is gone: drop the events, the main loop sees the pipe's end
        self.lock = threading.Lock()  # the worker's flushes and the main thread's heartbeats share the pipe

    def sink(self, job_id: int) -> Callable[[Event], None]:
        first = True

        def on_event(event: Event) -> None:
            nonlocal first
            self.events.append((job_id, event.token_id, event.finish_reason, event.error))
            if first or event.finish_reason is not None:
                first = False
                self.urgent = True

        return on_event

    def flush(self, force: bool = False) -> None:
        if not self.events or self.broken:
            return
        if not (force or self.urgent or time.monotonic() - self.sent >= self.flush_s):
            return
        self.urgent = False
        batch = [self.events.popleft() for _ in range(len(self.events))]
        self._send(batch)

    def beat(self) -> None:
        """A heartbeat, unless a message went out within ``HEARTBEAT_S`` (any message says the engine lives)."""
        if time.monotonic() - self.sent >= HEARTBEAT_S and not self.broken:
            self._send(("heartbeat",))

    def _send(self, message: list | tuple) -> None:
        with self.lock:
            self.sent = time.monotonic()
            try:
                self.conn.send(message)
            except OSError:
                self.broken = True


def load_generator(export_dir: str | Path, *, fp32: bool = False, threads: int | None = None) -> OnnxGenerator:
    """The export's int8 model when it has one (unless ``fp32``), else ``model.onnx``, in this process."""
    int8 = not fp32 and bool(read_generation_config(export_dir).get("int8_model_file"))
    return OnnxGenerator(export_dir, int8=int8, intra_op_num_threads=threads, spinning=False)


def _engine_main(conn: Any, export_dir: str, fp32: bool, threads: int | None, max_batch: int, max_queue: int,
                 flush_s: float) -> None:
    """The engine process: load the model, then take the server's messages until it says stop or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    outbox = _Outbox(conn, flush_s)
    try:
        generator = load_generator(export_dir, fp32=fp32, threads=threads)
        engine = BatchEngine(generator, max_batch=max_batch, max_queue=max_queue + max_batch, on_step=outbox.flush)
    except Exception as err:  # noqa: BLE001 - the server prints it as one line
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    engine.start()
    # the graph that decodes: the static-cache one when the engine runs it, not the generator's portable one
    outbox._send(("ready", (engine.static.model_path if engine.static is not None else generator.model_path).name))
    jobs: dict[int, Any] = {}  # in the engine, by the server's id: what a cancel message names
    ended: set[int] = set()  # ended before ``submit`` returned them (a request of one token can)
    lock = threading.Lock()

    def sink(job_id: int) -> Callable[[Event], None]:
        forward = outbox.sink(job_id)

        def on_event(event: Event) -> None:  # on the engine's worker thread
            if event.finish_reason is not None:
                with lock:
                    if jobs.pop(job_id, None) is None:
                        ended.add(job_id)
            forward(event)

        return on_event

    try:
        while engine.running and not outbox.broken:
            outbox.beat()
            if not conn.poll(HEARTBEAT_S / 2):
                continue
            message = conn.recv()
            if message[0] == "submit":
                _, job_id, ids, params, seconds = message
                deadline = None if seconds is None else time.monotonic() + seconds
                on_event = sink(job_id)
                try:
                    job = engine.submit(ids, params, on_event=on_event, deadline=deadline)
                except (EngineFull, EngineStopped, ValueError) as err:  # the server checked these: a bug if seen
                    outbox.sink(job_id)(Event(finish_reason="error", error=f"{type(err).__name__}: {err}"))
                    continue
                with lock:
                    if job_id in ended:
                        ended.discard(job_id)
                    else:
                        jobs[job_id] = job
            elif message[0] == "cancel":
                job = jobs.get(message[1])
                if job is not None:
                    job.cancel()
            elif message[0] == "stop":
                break
    except (EOFError, OSError):
        pass  # the server is gone
    finally:
        engine.stop()  # what was in flight ends "cancelled"
        outbox.flush(force=True)
