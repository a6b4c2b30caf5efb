"""Connection limits of ``llm serve``: what uvicorn does not bound by itself, added to its own HTTP protocol.

uvicorn bounds the time between two requests of a kept-alive connection (``timeout_keep_alive``) and, with
h11, the size of a request's headers (``h11_max_incomplete_event_size``); ``run_server`` passes both. It has
no deadline for a request's headers or body (a client that connects and sends nothing, or a byte every few
seconds, holds its socket forever) and its ``limit_concurrency`` counts idle sockets and then answers 503 to
every request, ``/health`` included. ``guarded_protocol`` subclasses uvicorn's protocol class with:

- a **header deadline**: a connection whose next request's headers have not all arrived ``header_timeout_s``
  after it opened (or after its previous answer) is closed (with a 408 when part of a request came);
- a **body deadline**: a request whose body has not all arrived ``body_timeout_s`` after its headers is cut
  the same way (the request's own deadline, ``--timeout``, starts once the body is read);
- a **cap on open connections**: past ``max_connections``, the connection that has waited longest without a
  request in progress is closed to make room (idle and half-open sockets go first; a request being
  answered is never cut), or the new one when every connection is busy. The cap stays below the process's
  file limit (``RLIMIT_NOFILE``), so ``accept`` never runs out of descriptors.

``quiet_accept_errors`` keeps the log from flooding when ``accept`` fails all the same (asyncio logs every
failed try): the same message is logged once per ``interval_s``, with how many were left out.
An import-linter contract keeps torch out of here, as out of all of ``llm serve``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

FD_RESERVE = 64  # descriptors kept for the engine's pipes, the model files and the log
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def connection_cap(wanted: int) -> int:
    """``wanted``, lowered below the process's soft ``RLIMIT_NOFILE`` less ``FD_RESERVE`` (said in the log)."""
    try:
        import resource
    except ImportError:  # Windows: no descriptor limit to stay under
        return wanted
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= wanted:
        return wanted
    cap = max(1, soft - FD_RESERVE)
    log.warning("--max-connections %d lowered to %d: this process may open %d files (ulimit -n)", wanted, cap, soft)
    return cap


def guarded_protocol(base: type, *, max_connections: int, header_timeout_s: float, body_timeout_s: float) -> type:
    """A subclass of uvicorn's HTTP protocol class ``base`` (h11 or httptools) that enforces the header and
    body deadlines and the connection cap (see the module docstring)."""

    class Guarded(base):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._since = time.monotonic()
            self._phase = "headers"  # what the deadline waits for: "headers", "body", or nothing ("app")
            self._cycle_timed: Any = None
            self._timer: asyncio.TimerHandle | None = None
            self._got_bytes = False
            room = _make_room(self.connections, max_connections)
            super().connection_made(transport)
            if not room:  # every connection is answering a request: this one waits for none of them
                transport.close()
                return
            self._arm(header_timeout_s)

        def data_received(self, data: bytes) -> None:
            self._got_bytes = True
            super().data_received(data)
            cycle = self.cycle
            if cycle is not None and cycle is not self._cycle_timed and not cycle.response_complete:
                self._cycle_timed, self._phase = cycle, "body"  # its headers are in: the body's deadline now
                self._arm(body_timeout_s)
            if self._phase == "body" and not cycle.more_body:
                self._phase = "app"  # the whole request is in: the request's own deadline applies
                self._cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._since, self._phase, self._got_bytes = time.monotonic(), "headers", False
            self._arm(header_timeout_s)  # the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def busy(self) -> bool:
            """Whether a request is being answered on this connection (its headers and body are in)."""
            return self._phase == "app"

        def _arm(self, seconds: float) -> None:
            self._cancel()
            self._timer = self.loop.call_later(seconds, self._too_slow)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            self._timer = None
            if self._phase == "app" or self.transport.is_closing():
                return
            if self._got_bytes:
                self.transport.write(REQUEST_TIMEOUT)
            if self._phase == "body":
                self.cycle.disconnected = True  # the handler reading the body sees a client gone
            self.transport.close()

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def _make_room(connections: set, max_connections: int) -> bool:
    """Whether a new connection may stay: True below ``max_connections`` open ones (those closing do not
    count), or once the one waiting longest for a request is closed; False when all are answering one."""
    open_ = [c for c in connections if c.transport is not None and not c.transport.is_closing()]
    if len(open_) < max_connections:
        return True
    waiting = [c for c in open_ if hasattr(c, "busy") and not c.busy()]
    if not waiting:
        return False
    min(waiting, key=lambda c: c._since).transport.close()
    return True


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval_s: float = 10.0) -> None:
    """Make ``loop`` log each kind of error it reports (``socket.accept() out of system resource``, ...)
    at most once per ``interval_s``, with the count of those left out since."""
    last: dict[str, tuple[float, int]] = {}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        now = time.monotonic()
        since, skipped = last.get(message, (float("-inf"), 0))
        if now - since < interval_s:
            last[message] = (since, skipped + 1)
            return
        last[message] = (now, 0)
        if skipped:
            context = {**context, "message": f"{message} (and {skipped} more in the last {now - since:.1f} s)"}
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
