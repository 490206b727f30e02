"""The HTTP layer: the streamable-HTTP app and the guards in front of it."""

from __future__ import annotations

from fastmcp import FastMCP
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pod_exec_mcp.config import Settings

MCP_PATH = "/mcp"


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


def http_app(mcp: FastMCP, settings: Settings) -> Starlette:
    """The streamable-HTTP app, with Host/Origin (DNS rebinding) protection always on."""
    return mcp.http_app(
        path=MCP_PATH,
        transport="http",
        host_origin_protection=True,
        allowed_hosts=settings.allowed_hosts or None,
        allowed_origins=settings.allowed_origins or None,
        middleware=[Middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)],
    )
