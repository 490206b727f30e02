"""The audit trail: one log event per tool call, and one per sandbox start, replacement and
removal, on the logger `pod_exec_mcp.audit`.

Events carry hashes, never secrets: the principal is the token's hashed name (auth.py's
`principal_of`), the session is the registry key that also labels its containers. Enough
to answer "who ran what, in which sandbox, and how did it end" with `jq` (see README).

Who fills in what:
- `AuditMiddleware` wraps every tool call: tool, era, principal, command, outcome,
  duration, and what a shell_exec result says (retval, timed_out, truncated);
- the tool code calls `note(session=...)` once it knows the session, and `ExecSlots`
  (slots.py) notes how long the call queued for its slot;
- the registry calls `sandbox_event(...)`.
Listeners (the metrics) get every event as a typed object (`subscribe`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fastmcp.server.dependencies import get_access_token
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

AUDIT_LOGGER = "pod_exec_mcp.audit"
_log = logging.getLogger(AUDIT_LOGGER)

Era = Literal["legacy", "modern"]
Outcome = Literal["ok", "error", "timed_out", "cancelled"]
SandboxAction = Literal["started", "replaced", "removed"]


@dataclass(frozen=True)
class ToolCall:
    """One tool call, as the audit trail records it."""

    tool: str
    era: Era
    principal: str | None  # the token's hashed name; None without auth
    session: str | None  # the session's registry key (its container label), once known
    outcome: Outcome
    duration: float  # seconds, the whole call
    command: str | None = None  # shell_exec only; cut to the setting, None when turned off
    command_chars: int | None = None  # the command's full length
    retval: int | None = None
    timed_out: bool | None = None
    truncated: bool | None = None
    exec_duration: float | None = None  # seconds the command itself ran
    queue_wait: float | None = None  # seconds waited for an exec slot
    error: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class SandboxEvent:
    """A sandbox started, replaced (it broke) or removed."""

    action: SandboxAction
    session: str | None  # None for a warm-pool sandbox no session owns yet
    container: str
    reason: str


AuditEvent = ToolCall | SandboxEvent
Listener = Callable[[AuditEvent], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call `listener` with every event from now on; returns the function that stops it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def _emit(event_name: str, event: AuditEvent) -> None:
    # Always there, even when null, so that jq filters on them never miss an event.
    always = ("session", "principal")
    fields = {k: v for k, v in asdict(event).items() if v is not None or k in always}
    _log.info(event_name, extra=fields)
    for listener in list(_listeners):
        try:
            listener(event)
        except Exception:  # metrics must never break a tool call
            _log.exception("an audit listener failed")


def tool_call(call: ToolCall) -> None:
    """Record one tool call."""
    _emit("tool_call", call)


def sandbox_event(action: SandboxAction, session: str | None, container: str, reason: str) -> None:
    """Record a sandbox being started, replaced or removed, and why."""
    _emit(f"sandbox_{action}", SandboxEvent(action, session, container, reason))


def clip_command(command: str, limit: int) -> str | None:
    """The command as the audit trail keeps it: None if `limit` is 0, else its first `limit`
    characters (the full length is recorded beside it)."""
    if limit <= 0:
        return None
    return command if len(command) <= limit else command[:limit] + "…"


# --- what the tool learns while it runs ----------------------------------------------------


@dataclass
class _Notes:
    session: str | None = None
    queue_wait: float | None = None


_notes: contextvars.ContextVar[_Notes | None] = contextvars.ContextVar(
    "pod_exec_mcp_audit_notes", default=None
)


def note(*, session: str | None = None, queue_wait: float | None = None) -> None:
    """Tell the current tool call's audit event what only the tool knows."""
    notes = _notes.get()
    if notes is None:
        return
    if session is not None:
        notes.session = session
    if queue_wait is not None:
        notes.queue_wait = queue_wait


# --- the middleware ------------------------------------------------------------------------


def _era(context: MiddlewareContext[Any]) -> Era:
    ctx = context.fastmcp_context
    rc = getattr(ctx, "request_context", None) if ctx is not None else None
    version = getattr(rc, "protocol_version", None)
    return "modern" if version in MODERN_PROTOCOL_VERSIONS else "legacy"


def _principal() -> str | None:
    token = get_access_token()
    return token.client_id if token is not None else None


def _request_id(context: MiddlewareContext[Any]) -> str | None:
    try:
        return str(context.fastmcp_context.request_id) if context.fastmcp_context else None
    except Exception:
        return None


class AuditMiddleware(Middleware):
    """Emits one `tool_call` event per tool call, however it ends."""

    def __init__(self, command_chars: int) -> None:
        self.command_chars = command_chars

    async def on_call_tool(
        self, context: MiddlewareContext[Any], call_next: CallNext[Any, Any]
    ) -> Any:
        tool = str(getattr(context.message, "name", "?"))
        arguments = getattr(context.message, "arguments", None) or {}
        command = arguments.get("command") if tool == "shell_exec" else None
        notes = _Notes()
        token = _notes.set(notes)
        started = time.monotonic()
        outcome: Outcome = "error"
        error: str | None = None
        found: dict[str, Any] = {}
        try:
            result = await call_next(context)
        except asyncio.CancelledError:
            outcome, error = "cancelled", "cancelled by the client"
            raise
        except Exception as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
            raise
        else:
            found = getattr(result, "structured_content", None) or {}
            if getattr(result, "is_error", False):
                outcome = "error"
            else:
                outcome = "timed_out" if found.get("timed_out") else "ok"
            return result
        finally:
            _notes.reset(token)
            tool_call(
                ToolCall(
                    tool=tool,
                    era=_era(context),
                    principal=_principal(),
                    session=notes.session,
                    outcome=outcome,
                    duration=round(time.monotonic() - started, 4),
                    command=clip_command(command, self.command_chars)
                    if isinstance(command, str)
                    else None,
                    command_chars=len(command) if isinstance(command, str) else None,
                    retval=found.get("retval"),
                    timed_out=found.get("timed_out"),
                    truncated=found.get("truncated"),
                    exec_duration=found.get("duration"),
                    queue_wait=None if notes.queue_wait is None else round(notes.queue_wait, 4),
                    error=error,
                    request_id=_request_id(context),
                )
            )
