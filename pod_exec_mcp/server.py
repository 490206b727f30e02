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
import logging
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.auth import AuthProvider
from fastmcp.server.sessions import current_principal
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field

from pod_exec_mcp.config import Settings, env_var
from pod_exec_mcp.instances import Instance
from pod_exec_mcp.podman import Podman, PodmanError
from pod_exec_mcp.registry import SessionEntry, SessionError, SessionRegistry
from pod_exec_mcp.sandbox import Sandbox, SandboxBroken, wait_for_background

log = logging.getLogger(__name__)

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


class ServerState:
    """Everything the tools share for one server process."""

    def __init__(self, settings: Settings, podman: Podman, instance: Instance) -> None:
        self.settings = settings
        self.podman = podman
        self.registry = SessionRegistry(podman, settings, instance)
        self.exec_slots = asyncio.Semaphore(settings.max_concurrent_execs)

    async def close(self) -> None:
        await wait_for_background()
        await self.registry.close()


def _is_modern(ctx: Context) -> bool:
    rc = ctx.request_context
    return rc is not None and rc.protocol_version in MODERN_PROTOCOL_VERSIONS


def _on_mcp_session_end(ctx: Context, callback: Any) -> None:
    """Run `callback` when this legacy MCP session's connection closes.

    fastmcp has no public "session ended" hook; the connection's exit stack is unwound on
    DELETE, idle timeout and shutdown. Only ever used for legacy-era requests: on a modern
    request that stack unwinds after every request.
    """
    connection = ctx.session._connection  # private: the only such hook in fastmcp 4.x
    connection.exit_stack.push_async_callback(callback)


def build_server(
    settings: Settings,
    podman: Podman,
    instance: Instance,
    auth: AuthProvider | None = None,
) -> tuple[FastMCP, ServerState]:
    state = ServerState(settings, podman, instance)
    registry = state.registry

    @contextlib.asynccontextmanager
    async def lifespan(_: FastMCP) -> AsyncIterator[dict[str, Any]]:
        reaper = asyncio.create_task(registry.reap_forever())
        registry.fill_pool()
        try:
            yield {}
        finally:
            reaper.cancel()
            await state.close()

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

    def session_entry(ctx: Context, session_id: str | None) -> SessionEntry:
        principal = current_principal()
        if session_id is not None:
            return registry.explicit(principal, session_id)
        if _is_modern(ctx):
            raise ToolError(
                "no session_id given. This connection is stateless (MCP 2026-07-28), so "
                "there is no implicit sandbox: call create_session once, then pass the "
                "session_id it returns to every shell_exec call."
            )
        entry, is_new, replaced_because = registry.legacy(principal, ctx.session_id)
        if is_new:
            key = entry.key

            async def end_with_mcp_session() -> None:
                await registry.end_key(key, "its MCP session ended")

            _on_mcp_session_end(ctx, end_with_mcp_session)
        if replaced_because is not None:
            raise ToolError(
                f"this session's sandbox was removed ({replaced_because}); its files are "
                "gone. A fresh sandbox will be started: run the command again."
            )
        return entry

    @mcp.tool(
        description=(
            "Run a shell command in your private Linux sandbox (Debian, as root, "
            "`/bin/sh -lc COMMAND`, working directory /workspace, stdin empty). Files, "
            "installed packages and background processes persist between calls of the same "
            "session. stdout and stderr come back merged in order, with the exit status. "
            "Without session_id: a legacy (2025-11-25) MCP session gets one sandbox of its "
            "own; a stateless (2026-07-28) call is refused - call create_session first. "
            "Long output keeps its head and tail. Commands are killed (with every process "
            "they started) after `timeout` seconds and then return retval 124. "
            "Commands of one session may run concurrently and share its files."
        )
    )
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
            Field(
                description=(
                    f"Seconds before the command is killed (default "
                    f"{settings.default_timeout:g}, at most {settings.max_timeout:g})."
                )
            ),
        ] = None,
    ) -> ShellExecResult:
        limit = _check_timeout(timeout, settings)
        _check_command(command, settings)
        entry = _resolve(session_entry, ctx, session_id)

        async def progress(elapsed: float) -> None:
            await ctx.report_progress(elapsed, None, f"command running for {elapsed:.0f} s")

        async with registry.in_use(entry):
            sandbox = await _sandbox(registry, entry)
            async with state.exec_slots:
                try:
                    result = await sandbox.execute(command, limit, progress)
                except SandboxBroken as exc:
                    raise ToolError(await _recover(registry, entry, sandbox, str(exc))) from None
                except PodmanError as exc:
                    raise ToolError(f"podman failed to run the command: {exc}") from None
            output = result.output
            if result.unkillable:
                output += (
                    "\n[pod_exec_mcp: "
                    + await _recover(
                        registry, entry, sandbox, "the command could not be killed inside it"
                    )
                    + "]"
                )
        return ShellExecResult(
            output=output,
            retval=result.retval,
            truncated=result.truncated,
            timed_out=result.timed_out,
            duration=round(result.duration, 3),
        )

    @mcp.tool(
        description=(
            "Start a new private Linux sandbox and return its session_id. Pass that id to "
            "shell_exec to use the sandbox, and to end_session when done. Required on "
            "stateless (2026-07-28) connections; optional on legacy ones. Sandboxes unused "
            f"for {settings.idle_timeout / 60:g} min are removed."
        )
    )
    async def create_session() -> CreatedSession:
        try:
            session_id = await registry.create_explicit(current_principal())
        except SessionError as exc:
            raise ToolError(str(exc)) from None
        except PodmanError as exc:
            raise ToolError(f"could not start a sandbox: {exc}") from None
        return CreatedSession(session_id=session_id)

    @mcp.tool(description="End a session from create_session: its sandbox and files are removed.")
    async def end_session(
        session_id: Annotated[
            str, Field(description="Id from create_session.", pattern=SESSION_ID_PATTERN)
        ],
    ) -> EndedSession:
        try:
            entry = registry.explicit(current_principal(), session_id)
        except SessionError as exc:
            raise ToolError(str(exc)) from None
        await registry.end(entry, "ended by end_session")
        return EndedSession(session_id=session_id)

    return mcp, state


def _resolve(lookup: Any, ctx: Context, session_id: str | None) -> SessionEntry:
    try:
        return lookup(ctx, session_id)
    except SessionError as exc:
        raise ToolError(str(exc)) from None


async def _sandbox(registry: SessionRegistry, entry: SessionEntry) -> Sandbox:
    try:
        return await registry.sandbox_of(entry)
    except SessionError as exc:
        raise ToolError(str(exc)) from None
    except PodmanError as exc:
        # A sandbox that never started must not count against the limit.
        await registry.end(entry, "its sandbox failed to start")
        raise ToolError(f"could not start a sandbox: {exc}") from None


async def _recover(
    registry: SessionRegistry, entry: SessionEntry, broken: Sandbox, reason: str
) -> str:
    """Replace a broken sandbox; returns the sentence that tells the agent what happened."""
    try:
        await registry.replace_sandbox(entry, broken)
    except (PodmanError, SessionError) as exc:
        await registry.end(entry, "its sandbox broke and could not be replaced")
        return (
            f"The sandbox broke ({reason}) and a new one could not be started ({exc}). "
            "This session has ended; start a new one."
        )
    return (
        f"The sandbox broke ({reason}). A fresh sandbox was started for this session; "
        "files and processes from before are lost. Run the command again if needed."
    )


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
