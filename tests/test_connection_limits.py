"""Specification of llm/connection_limits.py apart from a server (the server-level test is in test_api_server.py)."""

from __future__ import annotations

import asyncio
import logging
import re
import time

from llm.connection_limits import connection_cap, quiet_accept_errors


def test_a_repeated_loop_error_is_logged_once_per_interval_with_a_count_of_the_rest(caplog):
    async def flood() -> None:
        loop = asyncio.get_running_loop()
        quiet_accept_errors(loop, interval_s=0.2)
        for _ in range(500):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(24, "Too many open files")})
        loop.call_exception_handler({"message": "another error"})
        time.sleep(0.25)
        loop.call_exception_handler({"message": "socket.accept() out of system resource"})

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(flood())
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert messages[:2] == ["socket.accept() out of system resource", "another error"] and len(messages) == 3
    assert re.fullmatch(r"socket\.accept\(\) out of system resource \(and 499 more in the last 0\.\d s\)",
                        messages[2])


def test_the_connection_cap_stays_below_the_file_limit():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10) == 10
    if soft != resource.RLIM_INFINITY:
        assert connection_cap(soft * 2) == soft - 64
