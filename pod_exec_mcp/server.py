"""The MCP face: tools, their errors, the lifespan, and the HTTP app.

Sessions in the two MCP eras:
- legacy (2025-11-25, initialize handshake): the Mcp-Session-Id is stable, so a
  `shell_exec` without `session_id` uses one sandbox per MCP session, started on first use
  and removed when that MCP session ends (DELETE, idle timeout, shutdown);
- modern (2026-07-28, stateless): every request is its own connection, so the agent asks
  for a sandbox with `create_session` and passes its id. A `shell_exec` without
  `session_id` is refused with an error that says so: it never starts a sandbox that
  nobody could reach again.
Explicit sessions work in both eras.
"""

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.auth import AuthProvider
from fastmcp.server.dependencies import get_http_request
from fastmcp.server.sessions import current_principal
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field

from pod_exec_mcp.config import Settings, env_var
from pod_exec_mcp.engine import SandboxEngine
from pod_exec_mcp.instances import Instance
from pod_exec_mcp.sessions import Session, SessionError, Sessions, describe_seconds

T = TypeVar("T")

# Session ids we mint are URL-safe base64; anything else is refused before it is used.
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"


class ShellExecResult(BaseModel):
    """What a command printed and how it exited."""

    output: str = Field(description="stdout and stderr, merged in the order written.")
    retval: int = Field(
        description="The command's exit status (124 if it timed out, as GNU timeout)."
    )
    truncated: bool = Field(
        default=False, description="True if the middle of the output was cut to fit the cap."
    )
    timed_out: bool = Field(default=False, description="True if the command was killed.")
    duration: float = Field(default=0.0, description="Seconds the command ran.")


class CreatedSession(BaseModel):
    session_id: str = Field(description="Pass this as session_id to shell_exec.")


class EndedSession(BaseModel):
    session_id: str
    ended: bool = True


def _sessions(ctx: Context) -> Sessions:
    sessions: Sessions = ctx.lifespan_context["sessions"]
    return sessions


def _settings(ctx: Context) -> Settings:
    return _sessions(ctx).settings


def _is_modern(ctx: Context) -> bool:
    rc = ctx.request_context
    return rc is not None and rc.protocol_version in MODERN_PROTOCOL_VERSIONS


def _on_mcp_session_end(ctx: Context, callback: Callable[[], Awaitable[None]]) -> None:
    """Run `callback` when this legacy MCP session's connection closes.

    fastmcp has no public "session ended" hook; the connection's exit stack is unwound on
    DELETE, idle timeout and shutdown. Only ever used for legacy-era requests: on a modern
    request that stack unwinds after every request.
    """
    connection = ctx.session._connection  # private: the only such hook in fastmcp 4.x
    connection.exit_stack.push_async_callback(callback)


# How often a legacy call checks whether its client is still connected.
_DISCONNECT_POLL_SECONDS = 1.0


async def _until_disconnected(ctx: Context, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it (and so killing its command) if the client disconnects.

    The MCP transport spec says a disconnect is a cancellation. A modern (stateless) call
    is cancelled by the transport itself; a legacy call lives in the MCP session, which
    outlives the connection, so we watch the HTTP request ourselves (uvicorn answers
    `http.disconnect` to every receive once the client is gone)."""
    try:
        request = None if _is_modern(ctx) else get_http_request()
    except RuntimeError:
        request = None
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise SessionError(
                    "the client disconnected, which cancels the call: the command was stopped."
                )
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise


def _session_of(ctx: Context, session_id: str | None) -> Session:
    """The explicit session named, or a legacy MCP session's own; SessionError otherwise."""
    sessions = _sessions(ctx)
    principal = current_principal()
    if session_id is not None:
        return sessions.explicit(principal, session_id)
    if _is_modern(ctx):
        raise SessionError(
            "no session_id given. This connection is stateless (MCP 2026-07-28), so "
            "there is no implicit sandbox: call create_session once, then pass the "
            "session_id it returns to every shell_exec call."
        )
    found = sessions.legacy(principal, ctx.session_id)
    if found.is_new:
        key = found.session.key

        async def end_with_mcp_session() -> None:
            await sessions.end_key(key, "its MCP session ended")

        _on_mcp_session_end(ctx, end_with_mcp_session)
    if found.replaced_because is not None:
        raise SessionError(
            f"this session's sandbox was removed ({found.replaced_because}); its files are "
            "gone. A fresh sandbox will be started: run the command again."
        )
    return found.session


async def shell_exec(
    command: Annotated[str, Field(description="Shell command, run as `/bin/sh -lc`.")],
    ctx: Context,
    session_id: Annotated[
        str | None,
        Field(
            description="Id from create_session. Required on stateless connections.",
            pattern=SESSION_ID_PATTERN,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        Field(description="Seconds before the command is killed (see the tool description)."),
    ] = None,
) -> ShellExecResult:
    settings = _settings(ctx)
    limit = _check_timeout(timeout, settings)
    _check_command(command, settings)

    async def progress(elapsed: float) -> None:
        await ctx.report_progress(elapsed, None, f"command running for {elapsed:.0f} s")

    try:
        session = _session_of(ctx, session_id)
        result = await _until_disconnected(
            ctx, _sessions(ctx).run(session, command, limit, progress)
        )
    except SessionError as exc:
        raise ToolError(str(exc)) from None
    return ShellExecResult(
        output=result.output,
        retval=result.retval,
        truncated=result.truncated,
        timed_out=result.timed_out,
        duration=round(result.duration, 3),
    )


async def create_session(ctx: Context) -> CreatedSession:
    try:
        session_id = await _sessions(ctx).create_explicit(current_principal())
    except SessionError as exc:
        raise ToolError(str(exc)) from None
    return CreatedSession(session_id=session_id)


async def end_session(
    session_id: Annotated[
        str, Field(description="Id from create_session.", pattern=SESSION_ID_PATTERN)
    ],
    ctx: Context,
) -> EndedSession:
    sessions = _sessions(ctx)
    try:
        session = sessions.explicit(current_principal(), session_id)
    except SessionError as exc:
        raise ToolError(str(exc)) from None
    await sessions.end(session, "ended by end_session")
    return EndedSession(session_id=session_id)


def _shell_exec_description(settings: Settings) -> str:
    return (
        "Run a shell command in your private Linux sandbox (Debian, as root, "
        "`/bin/sh -lc COMMAND`, working directory /workspace, stdin empty). Files, "
        "installed packages and background processes persist between calls of the same "
        "session. stdout and stderr come back merged in order, with the exit status. "
        "Without session_id: a legacy (2025-11-25) MCP session gets one sandbox of its "
        "own; a stateless (2026-07-28) call is refused - call create_session first. "
        "Long output keeps its head and tail. Commands are killed (with every process "
        f"they started) after `timeout` seconds (default {settings.default_timeout:g}, at "
        f"most {settings.max_timeout:g}) and then return retval 124. "
        "Commands of one session may run concurrently and share its files."
    )


def build_server(
    settings: Settings,
    engine: SandboxEngine,
    instance: Instance,
    auth: AuthProvider | None = None,
) -> tuple[FastMCP, Sessions]:
    """The MCP server; its tools reach the Sessions service through the lifespan context."""
    sessions = Sessions(engine, settings, instance)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastMCP) -> AsyncIterator[dict[str, Any]]:
        sessions.start_background()
        try:
            yield {"sessions": sessions}
        finally:
            await sessions.close()

    mcp = FastMCP(
        "pod_exec_mcp",
        instructions=(
            "A private Linux shell (Debian, in a Podman container) per session. "
            "Run commands with shell_exec. On a stateless (2026-07-28) connection, first "
            "call create_session and pass its session_id to every shell_exec."
        ),
        lifespan=lifespan,
        auth=auth,
    )
    mcp.tool(shell_exec, description=_shell_exec_description(settings))
    mcp.tool(
        create_session,
        description=(
            "Start a new private Linux sandbox and return its session_id. Pass that id to "
            "shell_exec to use the sandbox, and to end_session when done. Required on "
            "stateless (2026-07-28) connections; optional on legacy ones. Sandboxes unused "
            f"for {describe_seconds(settings.idle_timeout)} are removed."
        ),
    )
    mcp.tool(
        end_session,
        description="End a session from create_session: its sandbox and files are removed.",
    )
    return mcp, sessions


def _check_timeout(timeout: float | None, settings: Settings) -> float:
    if timeout is None:
        return settings.default_timeout
    if not math.isfinite(timeout) or timeout <= 0 or timeout > settings.max_timeout:
        raise ToolError(
            f"timeout must be a number of seconds above 0 and at most {settings.max_timeout:g} "
            f"(got {timeout!r}); the server's maximum is set by {env_var('max_timeout')}."
        )
    return timeout


def _check_command(command: str, settings: Settings) -> None:
    if "\x00" in command:
        raise ToolError("command contains a NUL byte, which no shell command can carry.")
    size = len(command.encode("utf-8", "surrogatepass"))
    if size > settings.max_command_bytes:
        raise ToolError(
            f"command is {size} bytes, over the limit of {settings.max_command_bytes}. "
            "Write long content to a file in smaller pieces (e.g. several `cat >> file` "
            "calls) and run that file."
        )
