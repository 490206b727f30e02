"""Legacy MCP sessions that cannot lock real clients out.

A legacy (2025-11-25) client opens an MCP session with `initialize` and keeps it by its
Mcp-Session-Id. The MCP SDK's session manager caps how many are open and answers 503 past
the cap, for as long as the squatters live (its idle timeout: 30 min, and any caller can
refresh them). 10,000 initializes that were never used locked every real client out.

So, in front of the manager:
- a session that has made no call (any request but initialize and ping) is *unused*;
  unused sessions expire after `legacy_unused_timeout`;
- at the server-wide cap (`max_legacy_sessions`), opening a session closes the oldest
  unused one instead of refusing; only when every open session is in use is it refused;
- each principal (token) and each client address (but loopback: every client of this
  host is one) holds at most `max_legacy_sessions_per_client`, with the same rule inside
  its own share.

This reaches into the SDK's `StreamableHTTPSessionManager` (its `_admit_session`,
`_discard_session`, `_server_instances` and `_handle_stateful_request`): fastmcp 4.x
offers no public hook. `attach` checks they exist and otherwise leaves the SDK's own cap
alone, with a warning.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from pod_exec_mcp.config import Settings, env_var

log = logging.getLogger(__name__)

# Requests that do not make a session "used": the handshake itself, and keep-alives.
_NOT_A_CALL = frozenset({"initialize", "ping"})
_SESSION_HEADER = b"mcp-session-id"

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Client:
    """Who opens a session: the token's principal (None without auth) and the address."""

    principal: str | None
    address: str


@dataclass
class _Open:
    client: Client
    opened: float
    used: bool = False


# Who is opening the session being admitted (set around the SDK's handler, read in its
# `_admit_session`, which runs in the same task).
_opening: contextvars.ContextVar[Client | None] = contextvars.ContextVar(
    "pod_exec_mcp_legacy_opening", default=None
)


class LegacySessions:
    """The bookkeeping and the admission rule; `attach` wires it into the SDK's manager."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = settings.max_legacy_sessions
        self.per_client = settings.max_legacy_sessions_per_client or max(1, self.cap // 2)
        self.unused_timeout = settings.legacy_unused_timeout
        self._clock = clock
        # Every open session we admitted, in opening order, and the unused ones among them.
        self._open: dict[str, _Open] = {}
        self._unused: OrderedDict[str, _Open] = OrderedDict()
        self._per_principal: Counter[str] = Counter()
        self._per_address: Counter[str] = Counter()
        # Closes the SDK's record of a session (set by `attach`).
        self._close: Callable[[str], None] = lambda _: None
        self._closing: set[asyncio.Task[None]] = set()

    # --- the rule -------------------------------------------------------------------------

    def refusal(self, client: Client) -> str | None:
        """Why `client` cannot open a session now (every session in its way is in use), or
        None if it can, once `make_room` has closed unused ones."""
        self.expire()
        for matches, holder in self._full_shares(client):
            if self._oldest_unused(matches) is None:
                return self._message(holder)
        return None

    def make_room(self, client: Client) -> None:
        """Close the oldest unused sessions that stand in the way of `client`'s new one."""
        self.expire()
        # Shares overlap (a token's sessions are often one address's): look again after
        # each closure. Each share needs at most one, so three rounds suffice.
        for _ in range(3):
            for matches, _ in self._full_shares(client):
                session_id = self._oldest_unused(matches)
                if session_id is not None:
                    self._close_session(session_id, "room was needed for a new one")
                    break
            else:
                return

    def _full_shares(self, client: Client) -> list[tuple[Callable[[_Open], bool], str]]:
        """The shares `client`'s new session would overflow: its principal's, its address's,
        the server's; each with a test for the sessions in it, and who holds it."""
        full: list[tuple[Callable[[_Open], bool], str]] = []
        principal, address = client.principal, client.address
        if principal is not None and self._per_principal[principal] >= self.per_client:
            full.append((lambda o: o.client.principal == principal, "this token already holds"))
        if _shares_an_address(address) and self._per_address[address] >= self.per_client:
            full.append((lambda o: o.client.address == address, "this address already holds"))
        if len(self._open) >= self.cap:
            full.append((lambda _: True, "the server already holds"))
        return full

    def opened(self, session_id: str, client: Client) -> None:
        entry = _Open(client, self._clock())
        self._open[session_id] = self._unused[session_id] = entry
        self._count(client, +1)

    def used(self, session_id: str) -> None:
        """The session made a call: it is a working client's, never closed to make room."""
        entry = self._open.get(session_id)
        if entry is not None and not entry.used:
            entry.used = True
            del self._unused[session_id]

    def closed(self, session_id: str) -> None:
        entry = self._open.pop(session_id, None)
        if entry is not None:
            self._unused.pop(session_id, None)
            self._count(entry.client, -1)

    def expire(self) -> int:
        """Close the sessions unused for longer than legacy_unused_timeout; how many."""
        deadline = self._clock() - self.unused_timeout
        expired = []
        for session_id, entry in self._unused.items():  # oldest first: stop at a young one
            if entry.opened >= deadline:
                break
            expired.append(session_id)
        for session_id in expired:
            self._close_session(session_id, "it made no call")
        return len(expired)

    def _oldest_unused(self, matches: Callable[[_Open], bool]) -> str | None:
        return next((sid for sid, entry in self._unused.items() if matches(entry)), None)

    def _close_session(self, session_id: str, why: str) -> None:
        log.info("closing unused legacy MCP session %s: %s", session_id[:12], why)
        self.closed(session_id)
        self._close(session_id)

    def _count(self, client: Client, step: int) -> None:
        if client.principal is not None:
            self._per_principal[client.principal] += step
            if self._per_principal[client.principal] <= 0:
                del self._per_principal[client.principal]
        self._per_address[client.address] += step
        if self._per_address[client.address] <= 0:
            del self._per_address[client.address]

    def _message(self, holder: str) -> str:
        return (
            f"Too many open sessions: {holder} its maximum of legacy MCP sessions, all in "
            "use. End one "
            "you no longer need (HTTP DELETE of its Mcp-Session-Id, or the client's "
            "terminate), or connect with a stateless (2026-07-28) client and create_session; "
            f"the operator sets the caps with {env_var('max_legacy_sessions')} and "
            f"{env_var('max_legacy_sessions_per_client')}."
        )

    # --- wiring into the SDK's session manager ----------------------------------------------

    def attach(self, manager: Any) -> bool:
        """Take over admission of `manager`'s stateful sessions; False (and the SDK's own
        cap only) if this SDK lacks what that needs."""
        needed = ("_admit_session", "_discard_session", "_server_instances")
        if not all(hasattr(manager, name) for name in needed) or not hasattr(
            manager, "_handle_stateful_request"
        ):
            return False
        admit, discard = manager._admit_session, manager._discard_session
        handle: Handler = manager._handle_stateful_request

        def admit_session(requestor: Any) -> Any:
            client = _opening.get()
            if client is not None:
                self.make_room(client)
            transport = admit(requestor)
            if transport is not None and client is not None:
                self.opened(transport.mcp_session_id, client)
            return transport

        async def discard_session(session_id: str, transport: Any) -> None:
            self.closed(session_id)
            await discard(session_id, transport)

        async def handle_stateful_request(scope: Scope, receive: Receive, send: Send) -> None:
            if any(name == _SESSION_HEADER for name, _ in scope.get("headers", ())):
                await handle(scope, receive, send)
                return
            client = client_of(scope)
            refused = self.refusal(client)
            if refused is not None:
                log.warning("refused a new legacy MCP session from %s: all in use", client.address)
                await _refuse(refused, scope, receive, send)
                return
            token = _opening.set(client)
            try:
                await handle(scope, receive, send)
            finally:
                _opening.reset(token)

        def close(session_id: str) -> None:
            transport = manager._server_instances.pop(session_id, None)
            getattr(manager, "_session_owners", {}).pop(session_id, None)
            if transport is not None and not transport.is_terminated:
                task = asyncio.ensure_future(transport.terminate())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

        manager._admit_session = admit_session
        manager._discard_session = discard_session
        manager._handle_stateful_request = handle_stateful_request
        self._close = close
        return True

    async def expire_forever(self) -> None:
        """Expire unused sessions even when nobody opens new ones (their memory)."""
        while True:
            await asyncio.sleep(max(self.unused_timeout / 2, 0.5))
            self.expire()


class MarkUsed(Middleware):
    """Marks a legacy MCP session used on its first call (anything but initialize, ping)."""

    def __init__(self, sessions: LegacySessions) -> None:
        self.sessions = sessions

    async def on_request(
        self, context: MiddlewareContext[Any], call_next: CallNext[Any, Any]
    ) -> Any:
        ctx = context.fastmcp_context
        if context.method not in _NOT_A_CALL and ctx is not None:
            try:
                session_id = ctx.session_id
            except RuntimeError:
                session_id = None
            if session_id is not None:
                self.sessions.used(session_id)
        return await call_next(context)


def _shares_an_address(address: str) -> bool:
    """Whether sessions from `address` share a per-address bound: not from loopback, where
    every client of this host is one address and the bound would only halve the cap."""
    try:
        return not ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True


def client_of(scope: Scope) -> Client:
    """The principal (the token's client id) and client address of a request."""
    user = scope.get("user")
    principal = user.username if isinstance(user, AuthenticatedUser) else None
    peer = scope.get("client")
    return Client(principal, str(peer[0]) if peer else "unknown")


async def _refuse(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32603, "message": message}}
    await JSONResponse(body, status_code=503)(scope, receive, send)
