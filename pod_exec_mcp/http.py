"""The HTTP layer: the streamable-HTTP app, the guards in front of it, and the operator's
endpoints (/healthz, /readyz, /metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastmcp import FastMCP
from fastmcp.server.auth.middleware import RequireAuthMiddleware
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pod_exec_mcp.config import Settings
from pod_exec_mcp.legacy_sessions import LegacySessions, MarkUsed
from pod_exec_mcp.metrics import CONTENT_TYPE, Metrics

MCP_PATH = "/mcp"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"

log = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


class RequestSizeLimit:
    """Answers 413 to a request body over `max_bytes`, declared or streamed, before any of
    it is parsed: a huge body must cost us neither memory nor a JSON parse."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = PlainTextResponse(
            f"request body larger than {self.max_bytes} bytes", status_code=413
        )
        await response(scope, receive, send)


class _MetricsApp:
    """/metrics as a plain ASGI app, so that the bearer-token guard of /mcp can wrap it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = Response(self.metrics.render(), media_type=CONTENT_TYPE)
        await response(scope, receive, send)


def ops_routes(
    mcp: FastMCP, metrics: Metrics | None, ready: Callable[[], Awaitable[bool]] | None
) -> list[BaseRoute]:
    """/healthz and /readyz (no auth, no details: ok or not ok), and /metrics behind the same
    bearer-token check as /mcp when auth is on."""

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        ok = ready is None or await ready()
        return PlainTextResponse("ok\n" if ok else "not ok\n", status_code=200 if ok else 503)

    routes: list[BaseRoute] = [
        Route(HEALTH_PATH, healthz, methods=["GET"]),
        Route(READY_PATH, readyz, methods=["GET"]),
    ]
    if metrics is not None:
        app: ASGIApp = _MetricsApp(metrics)
        if mcp.auth is not None:
            app = RequireAuthMiddleware(app, mcp.auth.required_scopes)
        routes.append(Route(METRICS_PATH, app, methods=["GET"]))
    return routes


def http_app(
    mcp: FastMCP,
    settings: Settings,
    metrics: Metrics | None = None,
    ready: Callable[[], Awaitable[bool]] | None = None,
) -> Starlette:
    """The streamable-HTTP app, with Host/Origin (DNS rebinding) protection always on, the
    operator's endpoints beside /mcp, and at most `max_legacy_sessions` live legacy MCP
    sessions, unused ones giving way to new ones (legacy_sessions.py)."""
    # Unused legacy sessions give way to new ones; the middleware tells used ones apart.
    legacy = LegacySessions(settings)
    mcp.add_middleware(MarkUsed(legacy))
    app = mcp.http_app(
        path=MCP_PATH,
        transport="http",
        host_origin_protection=True,
        allowed_hosts=settings.allowed_hosts or None,
        allowed_origins=settings.allowed_origins or None,
        middleware=[Middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)],
    )
    # The app-wide middleware (Host/Origin guard, size limit, token parsing) wraps these too.
    app.router.routes.extend(ops_routes(mcp, metrics, ready))
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(scope_app: Starlette) -> AsyncIterator[Any]:
        async with inner(scope_app) as state:
            # The MCP SDK's session manager (made by fastmcp's lifespan) caps live
            # stateful sessions and answers 503 "Too many open sessions" past the cap;
            # fastmcp does not pass the cap through, so set it once the manager exists.
            manager = _session_manager(app)
            if manager is not None and hasattr(manager, "max_sessions"):
                manager.max_sessions = settings.max_legacy_sessions
            else:
                log.warning("this fastmcp has no session cap; legacy sessions are unbounded")
            if manager is None or not legacy.attach(manager):
                log.warning(
                    "this fastmcp's session manager cannot be guarded: unused legacy MCP "
                    "sessions are neither expired nor closed to make room"
                )
                yield state
                return
            expiring = asyncio.create_task(legacy.expire_forever())
            try:
                yield state
            finally:
                expiring.cancel()

    app.router.lifespan_context = lifespan
    return app


def _session_manager(app: Starlette) -> Any:
    """fastmcp's session manager: on the /mcp endpoint, under its auth wrapper if any."""
    for route in app.routes:
        endpoint: Any = getattr(route, "endpoint", None)
        for _ in range(4):
            if endpoint is None:
                break
            manager = getattr(endpoint, "session_manager", None)
            if manager is not None:
                return manager
            endpoint = getattr(endpoint, "app", None)
    return None
