"""The HTTP front's guards below the ASGI app: what uvicorn's h11 protocol lacks.

A request-header timeout and a cap on connections that have not sent their headers yet
(`http_protocol`, passed to uvicorn.Config(http=...)), and accept() resource errors logged
at most once a minute (`rate_limit_accept_errors`). Measured in tests/test_containment.py:
1,100 half-open sockets against a server with nofile 1,024.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from pod_exec_mcp.config import Settings

log = logging.getLogger(__name__)


class _PendingHeaders:
    """Connections of one server that are waiting for a request's headers, oldest first."""

    def __init__(self, timeout: float, limit: int) -> None:
        self.timeout = timeout
        self.limit = limit
        self.waiting: dict[GuardedH11Protocol, None] = {}
        self.closed = 0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus what uvicorn lacks: a request-header timeout and a cap
    on connections that have not sent their headers yet.

    A connection waits for headers from when it opens, and again after each response
    (keep-alive). If they do not arrive within `timeout`, it is closed. Past `limit`
    waiting connections, the oldest waiting one is closed: half-open sockets then cannot
    use up our file descriptors, and a real client, whose headers come at once, still gets
    in. Closing is silent (no log line per connection).
    """

    pending: _PendingHeaders  # set on the subclass made by http_protocol()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaited_cycle: object = None
        self._await_headers()

    def _await_headers(self) -> None:
        pending = self.pending
        self._awaited_cycle = self.cycle
        pending.waiting.pop(self, None)
        pending.waiting[self] = None
        while len(pending.waiting) > pending.limit:
            oldest = next(iter(pending.waiting))
            oldest._drop()
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(pending.timeout, self._headers_overdue)

    def _headers_arrived(self) -> None:
        self.pending.waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self.cycle is self._awaited_cycle:
            self._drop()

    def _drop(self) -> None:
        self._headers_arrived()
        self.pending.closed += 1
        # abort(): the descriptor is freed now, without waiting for a slow peer.
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._awaited_cycle:
            self._headers_arrived()

    def on_response_complete(self) -> None:
        # Armed before uvicorn serves a pipelined request, which then counts as arrived.
        if not self.transport.is_closing():
            self._await_headers()
        super().on_response_complete()
        if self.cycle is not self._awaited_cycle:
            self._headers_arrived()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        super().connection_lost(exc)


def http_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with this server's limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"pending": _PendingHeaders(settings.header_timeout, settings.max_pending_connections)},
    )


# asyncio's message when accept() fails for want of descriptors (or memory). It retries a
# second later and logs a traceback each time; under a flood that fills the log.
_ACCEPT_ERROR = "socket.accept() out of system resource"
_ACCEPT_LOG_INTERVAL = 60.0


def rate_limit_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log accept() resource errors at most once a minute, with a count, without traceback."""
    previous = loop.get_exception_handler()
    last = -_ACCEPT_LOG_INTERVAL
    suppressed = 0

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last, suppressed
        if context.get("message") == _ACCEPT_ERROR:
            now = time.monotonic()
            if now - last < _ACCEPT_LOG_INTERVAL:
                suppressed += 1
                return
            log.warning(
                "cannot accept connections: %s (%d more such errors in the last minute); "
                "raise the open-file limit or lower max_pending_connections",
                context.get("exception"), suppressed,
            )  # fmt: skip
            last, suppressed = now, 0
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
