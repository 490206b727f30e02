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
import base64
import contextlib
import datetime
import functools
import hashlib
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import mcp_types as mt
from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.exceptions import ValidationError as ArgumentsError
from fastmcp.server.auth import AuthProvider
from fastmcp.server.dependencies import get_http_request
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.server.sessions import current_principal
from fastmcp.tools import ToolResult
from mcp_types import ToolAnnotations
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field
from pydantic import ValidationError as PydanticValidationError

from pod_exec_mcp import __version__, audit  # ops: audit
from pod_exec_mcp.config import Settings, env_var
from pod_exec_mcp.engine import SandboxEngine
from pod_exec_mcp.idempotency import MAX_KEY_CHARS, IdempotencyError, fingerprint
from pod_exec_mcp.instances import Instance
from pod_exec_mcp.jobs import Job, JobRead
from pod_exec_mcp.plain_text import PlainText
from pod_exec_mcp.sessions import (
    MAX_FORKS,
    Session,
    SessionError,
    Sessions,
    describe_seconds,
    session_key,  # ops: audit
)

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

# Ids we mint are URL-safe base64; anything else is refused before it is used.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# The longest a read_job may wait for news: below the ~60 s after which clients give up.
MAX_JOB_WAIT = 30.0
# The most bytes one base64 read_file returns: a result carries its content twice (text and
# structured), and fastmcp clients refuse a server-sent event over 1 MiB.
MAX_BASE64_READ = 256 * 1024
DEFAULT_LINES = 2000


class ShellExecResult(BaseModel):
    """What a command printed and how it exited."""

    output: str = Field(description="stdout and stderr, merged in the order written.")
    retval: int = Field(
        description="The command's exit status (124 if it timed out, as GNU timeout); -1, "
        "never an exit status, while it still runs as job_id."
    )
    truncated: bool = Field(
        default=False, description="True if the middle of the output was cut to fit the cap."
    )
    timed_out: bool = Field(default=False, description="True if the command was killed.")
    duration: float = Field(default=0.0, description="Seconds the command ran.")
    output_file: str | None = Field(
        default=None,
        description="When the output was cut: a file in the sandbox holding all of it "
        "(read it with read_file or rg).",
    )
    running: bool = Field(
        default=False,
        description="True if the command still runs after background_after seconds: it "
        "goes on as job_id (read_job gives the rest of its output and its exit status).",
    )
    job_id: str | None = Field(default=None, description="The job it goes on as, if running.")


class CreatedSession(BaseModel):
    session_id: str = Field(description="Pass this as session_id to the other tools.")


class SnapshotTaken(BaseModel):
    """A file-system snapshot just taken."""

    snapshot_id: str = Field(
        description="Pass this to create_session(snapshot_id=...) and delete_snapshot."
    )
    size: int = Field(description="Bytes the snapshot takes on the server.")
    took: float = Field(description="Seconds it took.")


class SnapshotEntry(BaseModel):
    snapshot_id: str
    size: int = Field(description="Bytes the snapshot takes on the server.")
    created: str = Field(description="When it was taken (UTC, ISO 8601).")


class SnapshotList(BaseModel):
    snapshots: list[SnapshotEntry] = Field(description="Your snapshots, oldest first.")


class DeletedSnapshot(BaseModel):
    snapshot_id: str
    deleted: bool = True


class ForkedSessions(BaseModel):
    session_ids: list[str] = Field(
        description="The new sessions, each with its own copy of the files; pass one as "
        "session_id to the other tools."
    )


class EndedSession(BaseModel):
    session_id: str
    ended: bool = True


class StartedJob(BaseModel):
    job_id: str = Field(description="Pass this to read_job and stop_job.")


class JobState(BaseModel):
    """A background job's new output and state."""

    job_id: str
    output: str = Field(description="Output printed since the last read (head and tail kept).")
    running: bool = Field(description="Whether the job still runs.")
    retval: int | None = Field(description="Its exit status once it has ended; null before.")
    truncated: bool = Field(description="True if the middle of this output was cut.")
    log_file: str | None = Field(
        default=None, description="A file in the sandbox with everything the job printed."
    )


class FileContent(BaseModel):
    path: str
    content: str = Field(description="The text (by lines), or base64 of the bytes.")
    encoding: Literal["text", "base64"]
    total_bytes: int = Field(description="Size of the whole file.")
    total_lines: int | None = Field(description="Lines in the whole file (text only).")
    offset: int = Field(description="First line (text, from 1) or byte (base64, from 0) read.")
    next_offset: int | None = Field(
        description="Where to continue reading, or null if the end was reached."
    )
    truncated: bool = Field(
        default=False, description="True if the lines read were cut to fit the output cap."
    )


class FileEdited(BaseModel):
    path: str = Field(description="The absolute path edited.")
    bytes_written: int = Field(description="The file's new size.")


class FileWritten(BaseModel):
    path: str = Field(description="The absolute path written.")
    bytes_written: int


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
        explicit = sessions.explicit(principal, _checked_id(session_id, "session_id"))
        audit.note(session=explicit.key)  # ops: audit
        return explicit
    if _is_modern(ctx):
        raise SessionError(
            "no session_id given. This connection is stateless (MCP 2026-07-28), so "
            "there is no implicit sandbox: call create_session once, then pass the "
            "session_id it returns to every call (shell_exec, start_job, read_file, "
            "write_file)."
        )
    found = sessions.legacy(principal, ctx.session_id)
    audit.note(session=found.session.key)  # ops: audit
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


def _checked_id(value: str, name: str) -> str:
    if not _ID_PATTERN.match(value):
        raise SessionError(
            f"{name} {value[:40]!r} is malformed: ids are the strings create_session, "
            f"start_job or snapshot_session returned (letters, digits, '_' and '-'). Pass "
            "one of those."
        )
    return value


def _to_result(job: JobRead) -> JobState:
    return JobState.model_validate(job, from_attributes=True)


# --- the tools ---------------------------------------------------------------------------


# A re-sent call with the same key returns the first one's result (idempotency.py).
IdempotencyKey = Annotated[
    str | None,
    Field(
        description="Optional: a key of yours (a UUID) for this call. Sending the same call "
        "again with the same key returns the first one's result without running it again "
        f"(at most {MAX_KEY_CHARS} characters; results are kept for a while: see the README).",
    ),
]


async def shell_exec(
    command: Annotated[str, Field(description="Shell command, run as `/bin/sh -lc`.")],
    ctx: Context,
    session_id: Annotated[
        str | None,
        Field(description="Id from create_session. Required on stateless connections."),
    ] = None,
    timeout: Annotated[
        float | None,
        Field(description="Seconds before the command is killed (see the tool description)."),
    ] = None,
    background_after: Annotated[
        float | None,
        Field(
            description="Seconds after which a command still running returns and goes on as "
            "a job (see the tool description); 0: wait for it to end."
        ),
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> ShellExecResult:
    settings = _settings(ctx)
    limit = _check_timeout(timeout, settings)
    _check_command(command, settings)
    moves_after = _check_background_after(background_after, settings)

    async def progress(elapsed: float) -> None:
        await ctx.report_progress(elapsed, None, f"command running for {elapsed:.0f} s")

    session = _session_of(ctx, session_id)

    async def once() -> ShellExecResult:
        result = await _until_disconnected(
            ctx, _sessions(ctx).run(session, command, limit, progress, moves_after)
        )
        audit.note(queue_wait=result.queue_wait)  # ops: audit
        return ShellExecResult(
            output=result.output,
            retval=result.retval,
            truncated=result.truncated,
            timed_out=result.timed_out,
            duration=round(result.duration, 3),
            output_file=result.output_file,
            running=result.job_id is not None,
            job_id=result.job_id,
        )

    asked = {"command": command, "timeout": limit, "background_after": moves_after}
    return await _sessions(ctx).once.run(
        session.key, idempotency_key, lambda: fingerprint("shell_exec", asked), once
    )


async def create_session(
    ctx: Context,
    snapshot_id: Annotated[
        str | None,
        Field(
            description="Optional: start the sandbox from this snapshot (from "
            "snapshot_session) instead of a fresh image: its files as they were."
        ),
    ] = None,
    egress_allow: Annotated[
        list[str] | None,
        Field(
            description="Optional: narrow the server's egress policy for this sandbox to "
            "these destinations (domains, *.wildcards, CIDRs, or `public`); it can never "
            "widen it."
        ),
    ] = None,
    egress_deny: Annotated[
        list[str] | None,
        Field(description="Optional: destinations to refuse besides the server's own denials."),
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> CreatedSession:
    if snapshot_id is not None:
        _checked_id(snapshot_id, "snapshot_id")
    principal = current_principal()

    async def once() -> CreatedSession:
        session_id = await _sessions(ctx).create_explicit(
            principal, egress_allow, egress_deny, snapshot_id
        )
        audit.note(session=session_key(principal, "explicit", session_id))  # ops: audit
        return CreatedSession(session_id=session_id)

    asked = {"egress_allow": egress_allow, "egress_deny": egress_deny, "snapshot_id": snapshot_id}
    return await _sessions(ctx).once.run(
        f"principal\0{principal or ''}", idempotency_key,
        lambda: fingerprint("create_session", asked), once,
    )  # fmt: skip


async def end_session(
    session_id: Annotated[str, Field(description="Id from create_session.")],
    ctx: Context,
) -> EndedSession:
    sessions = _sessions(ctx)
    session = sessions.explicit(current_principal(), _checked_id(session_id, "session_id"))
    audit.note(session=session.key)  # ops: audit
    await sessions.end(session, "ended by end_session")
    return EndedSession(session_id=session_id)


async def snapshot_session(
    ctx: Context,
    session_id: Annotated[
        str | None,
        Field(description="Id from create_session. Required on stateless connections."),
    ] = None,
    memory: Annotated[
        bool,
        Field(
            description="Also record processes. Not available on this server (file-system "
            "snapshots only): true is refused with an error."
        ),
    ] = False,
) -> SnapshotTaken:
    session = _session_of(ctx, session_id)
    taken = await _sessions(ctx).snapshot(session, current_principal(), memory)
    return SnapshotTaken(
        snapshot_id=taken.snapshot_id, size=taken.size, took=round(taken.took or 0.0, 3)
    )


async def list_snapshots(ctx: Context) -> SnapshotList:
    found = await _sessions(ctx).list_snapshots(current_principal())
    return SnapshotList(
        snapshots=[
            SnapshotEntry(snapshot_id=s.snapshot_id, size=s.size, created=_iso(s.created))
            for s in found
        ]
    )


async def delete_snapshot(
    snapshot_id: Annotated[str, Field(description="Id from snapshot_session.")],
    ctx: Context,
) -> DeletedSnapshot:
    await _sessions(ctx).delete_snapshot(
        current_principal(), _checked_id(snapshot_id, "snapshot_id")
    )
    return DeletedSnapshot(snapshot_id=snapshot_id)


async def fork_session(
    ctx: Context,
    session_id: Annotated[
        str | None,
        Field(description="Id from create_session. Required on stateless connections."),
    ] = None,
    count: Annotated[int, Field(description=f"How many copies to make (1 to {MAX_FORKS}).")] = 1,
) -> ForkedSessions:
    session = _session_of(ctx, session_id)
    forks = await _sessions(ctx).fork(session, current_principal(), count)
    return ForkedSessions(session_ids=forks)


def _iso(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat(timespec="seconds")


async def start_job(
    command: Annotated[str, Field(description="Shell command, run as `/bin/sh -lc`.")],
    ctx: Context,
    session_id: Annotated[
        str | None,
        Field(description="Id from create_session. Required on stateless connections."),
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> StartedJob:
    _check_command(command, _settings(ctx))
    session = _session_of(ctx, session_id)

    async def once() -> StartedJob:
        return StartedJob(
            job_id=await _sessions(ctx).start_job(session, current_principal(), command)
        )

    return await _sessions(ctx).once.run(
        session.key, idempotency_key, lambda: fingerprint("start_job", {"command": command}), once
    )


async def read_job(
    job_id: Annotated[str, Field(description="Id from start_job.")],
    ctx: Context,
    wait: Annotated[
        float,
        Field(
            description=f"Seconds to wait for new output or the job's end before answering "
            f"(0 to {MAX_JOB_WAIT:g}); saves polling.",
        ),
    ] = 0,
    session_id: Annotated[
        str | None, Field(description="Optional: the job's session, checked if given.")
    ] = None,
) -> JobState:
    if not math.isfinite(wait) or not 0 <= wait <= MAX_JOB_WAIT:
        raise SessionError(f"wait must be a number of seconds from 0 to {MAX_JOB_WAIT:g}.")
    sessions = _sessions(ctx)
    return _to_result(await sessions.read_job(_job_of(ctx, job_id, session_id), wait))


async def stop_job(
    job_id: Annotated[str, Field(description="Id from start_job.")],
    ctx: Context,
    session_id: Annotated[
        str | None, Field(description="Optional: the job's session, checked if given.")
    ] = None,
) -> JobState:
    return _to_result(await _sessions(ctx).stop_job(_job_of(ctx, job_id, session_id)))


def _job_of(ctx: Context, job_id: str, session_id: str | None) -> Job:
    """A job of this principal's; of the named session, if one is named."""
    sessions = _sessions(ctx)
    principal = current_principal()
    job = sessions.job(principal, _checked_id(job_id, "job_id"))
    if session_id is not None:
        session = sessions.explicit(principal, _checked_id(session_id, "session_id"))
        if job.session_key != session.key:
            raise SessionError(
                f"job {job_id!r} belongs to another session than {session_id!r}; pass the "
                "session_id the job was started in, or none."
            )
    return job


async def read_file(
    path: Annotated[
        str, Field(description="File path; relative to the shell's current directory.")
    ],
    ctx: Context,
    session_id: Annotated[
        str | None,
        Field(description="Id from create_session. Required on stateless connections."),
    ] = None,
    offset: Annotated[
        int | None,
        Field(description="text: first line to return (from 1); base64: first byte (from 0)."),
    ] = None,
    limit: Annotated[
        int | None,
        Field(
            description=f"text: lines to return (default {DEFAULT_LINES}); base64: bytes "
            f"(default and at most {MAX_BASE64_READ})."
        ),
    ] = None,
    encoding: Annotated[
        Literal["text", "base64"],
        Field(description="text (UTF-8; invalid bytes become U+FFFD) or base64 (any bytes)."),
    ] = "text",
) -> FileContent:
    settings = _settings(ctx)
    session = _session_of(ctx, session_id)
    data = await _sessions(ctx).read_file(session, path)
    if encoding == "base64":
        return _base64_slice(path, data, offset or 0, limit or MAX_BASE64_READ)
    return _text_slice(path, data, offset or 1, limit or DEFAULT_LINES, settings.max_output_bytes)


async def edit_file(
    path: Annotated[
        str, Field(description="File path; relative to the shell's current directory.")
    ],
    old: Annotated[str, Field(description="The exact text to replace; it must occur once.")],
    new: Annotated[str, Field(description="The text to put in its place.")],
    ctx: Context,
    session_id: Annotated[
        str | None,
        Field(description="Id from create_session. Required on stateless connections."),
    ] = None,
) -> FileEdited:
    session = _session_of(ctx, session_id)
    where, size = await _sessions(ctx).edit_file(session, path, old, new)
    return FileEdited(path=where, bytes_written=size)


async def write_file(
    path: Annotated[
        str, Field(description="File path; relative to the shell's current directory.")
    ],
    content: Annotated[str, Field(description="The whole new content (text, or base64).")],
    ctx: Context,
    session_id: Annotated[
        str | None,
        Field(description="Id from create_session. Required on stateless connections."),
    ] = None,
    encoding: Annotated[
        Literal["text", "base64"],
        Field(description="How `content` is given: text (written as UTF-8) or base64."),
    ] = "text",
    idempotency_key: IdempotencyKey = None,
) -> FileWritten:
    if encoding == "base64":
        try:
            data = base64.b64decode(content, validate=True)
        except ValueError:
            raise SessionError(
                "content is not valid base64 (RFC 4648, with padding); encode the bytes again."
            ) from None
    else:
        data = content.encode("utf-8", "surrogatepass")
    session = _session_of(ctx, session_id)

    async def once() -> FileWritten:
        where, written = await _sessions(ctx).write_file(session, path, data)
        return FileWritten(path=where, bytes_written=written)

    def asked() -> str:
        return fingerprint("write_file", {"path": path, "sha256": hashlib.sha256(data).hexdigest()})

    return await _sessions(ctx).once.run(session.key, idempotency_key, asked, once)


def _base64_slice(path: str, data: bytes, offset: int, limit: int) -> FileContent:
    if offset < 0 or not 0 < limit <= MAX_BASE64_READ:
        raise SessionError(
            f"with encoding base64, offset is a byte offset from 0 and limit a byte count "
            f"from 1 to {MAX_BASE64_READ}; read larger files in several calls."
        )
    piece = data[offset : offset + limit]
    end = offset + len(piece)
    return FileContent(
        path=path,
        content=base64.b64encode(piece).decode("ascii"),
        encoding="base64",
        total_bytes=len(data),
        total_lines=None,
        offset=offset,
        next_offset=end if end < len(data) else None,
    )


def _text_slice(path: str, data: bytes, offset: int, limit: int, cap: int) -> FileContent:
    """Lines `offset` to `offset + limit - 1` of `data`, at most `cap` bytes of them.

    A line ends with a newline (as `grep -n` and `sed -n` count). The file's size is the
    sandbox's choice, so this runs on the event loop only because its work is bounded:
    newlines are counted at C speed and only the lines returned are decoded; nothing is
    split into per-line objects."""
    if offset < 1 or limit < 1:
        raise SessionError("with encoding text, offset is a line number from 1 and limit >= 1.")
    total_lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    start = _after_newlines(data, 0, offset - 1)
    if start is None or start >= len(data):
        start = len(data)
    stop = _after_newlines(data, start, limit) or len(data)
    truncated = stop - start > cap
    if truncated:
        stop = data.rfind(b"\n", start, start + cap) + 1 or start
    text = data[start:stop].decode("utf-8", "replace")
    encoded = text.encode()
    if len(encoded) > cap:  # replacement characters took more room than the bytes they replace
        truncated = True
        text = encoded[: encoded.rfind(b"\n", 0, cap) + 1].decode()
    taken = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    end = offset - 1 + taken
    return FileContent(
        path=path,
        content=text,
        encoding="text",
        total_bytes=len(data),
        total_lines=total_lines,
        offset=offset,
        next_offset=end + 1 if end < total_lines else None,
        truncated=truncated,
    )


# Below this many bytes, the search for a newline goes one by one.
_SCAN_DIRECTLY = 64


def _after_newlines(data: bytes, start: int, count: int) -> int | None:
    """The offset just after the `count`-th newline from `start`, or None if there are
    fewer. Counts (at C speed) in doubling ranges until one holds that newline, then halves
    that range, instead of stepping line by line: the work is a few passes over the bytes
    up to that newline, whatever the number of lines."""
    if count == 0:
        return start
    low, width = start, _SCAN_DIRECTLY
    while True:
        high = min(low + width, len(data))
        found = data.count(b"\n", low, high)
        if found >= count:
            break
        if high == len(data):
            return None
        count, low, width = count - found, high, width * 2
    while high - low > _SCAN_DIRECTLY:
        middle = (low + high) // 2
        left = data.count(b"\n", low, middle)
        if left >= count:
            high = middle
        else:
            count -= left
            low = middle
    for _ in range(count):
        low = data.index(b"\n", low, high) + 1
    return low


# --- errors ------------------------------------------------------------------------------


def _agent_errors(tool: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """The one translation of our domain error into an MCP tool error: its message, as
    written for the agent (and logged by fastmcp as a tool error, not a crash)."""

    @functools.wraps(tool)
    async def translated(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await tool(*args, **kwargs)
        except (SessionError, IdempotencyError) as exc:
            error = ToolError(str(exc))
            # The agent's to act on, and in the audit trail: not a server error in the log.
            error.log_level = logging.INFO
            raise error from None

    return translated


class ArgumentErrors(Middleware):
    """Malformed arguments, in words an agent can act on: the argument and what was wrong,
    without pydantic's internals and links."""

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        try:
            return await call_next(context)
        except ArgumentsError as exc:
            cause = exc.__cause__
            if not isinstance(cause, PydanticValidationError):
                raise
            problems = "; ".join(_describe_argument_error(e) for e in cause.errors())
            raise ToolError(
                f"invalid arguments for {context.message.name}: {problems}. "
                "See the tool's input schema."
            ) from None


def _describe_argument_error(error: Any) -> str:
    where = ".".join(str(part) for part in error.get("loc", ())) or "arguments"
    kind = error.get("type", "")
    if kind in ("missing", "missing_argument"):
        return f"{where} is required"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{where} is not an argument of this tool"
    message = str(error.get("msg", "is invalid")).rstrip(".")
    return f"{where}: {message[:1].lower()}{message[1:]}"


# --- descriptions and assembly -----------------------------------------------------------

_SESSION_HINT = (
    "Without session_id: a legacy (2025-11-25) MCP session uses its own sandbox; a "
    "stateless (2026-07-28) call is refused: call create_session first."
)


def _shell_exec_description(settings: Settings) -> str:
    shell = (
        "The working directory and exported variables carry over to the session's next "
        "call, like one terminal (each call is a fresh `/bin/sh -lc`). "
        if settings.persistent_shell
        else "Each call starts in /workspace with a fresh environment. "
    )
    return (
        "Run a shell command in your private Linux sandbox (Debian with git, curl, python3 "
        "with pip and venv, make, ripgrep, jq; as root, `/bin/sh -lc COMMAND`, where /bin/sh "
        "is bash, "
        "starting in /workspace; stdin is empty and there is no TTY, so nothing can prompt "
        f"you). {shell}"
        "Files, installed packages and background processes persist in the session. stdout "
        "and stderr come back merged in order, with the exit status. Long output keeps its "
        "head and tail; output_file then names a file in the sandbox that holds all of it. "
        f"A command is killed, with every process it started, after `timeout` seconds "
        f"(default {settings.default_timeout:g}, at most {settings.max_timeout:g}) and then "
        f"returns retval 124. {_background_line(settings)}Servers and watchers belong in "
        f"start_job. {_network_line(settings)} {_SESSION_HINT}"
    )


def _background_line(settings: Settings) -> str:
    if not settings.background_after:
        return (
            "Many clients give up on a call after 60 s: run anything that may take longer "
            "(long builds and test runs) with start_job instead. "
        )
    return (
        f"A command still running after `background_after` seconds (default "
        f"{settings.background_after:g}; many clients give up at 60 s) returns at once with "
        "its output so far, running=true, retval -1 and a job_id, and goes on as that job "
        "until it ends or its timeout: call read_job for the rest and its exit status. "
    )


def _network_line(settings: Settings) -> str:
    """What the sandbox's network can do, in one line."""
    mode = "none" if settings.strict else settings.network
    if mode == "isolated" and settings.exec_channel != "agent":
        # The egress proxy is the agent's: without it an isolated sandbox has no network.
        mode = "none"
    if mode == "isolated":
        return (
            "Network: HTTP and HTTPS only, through the proxy in $HTTP_PROXY (apt, curl, pip, "
            "git, npm use it); no ping, ssh, UDP or raw DNS lookups; other sandboxes, the "
            "host and private addresses are unreachable; a refused destination gets HTTP 403 "
            "naming the rule."
        )
    if mode == "bridge":
        return "Network: full TCP/UDP access (Podman bridge)."
    return "Network: none (no connections at all)."


def _describe_bytes(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def _add_tool(
    mcp: FastMCP,
    tool: Callable[..., Awaitable[Any]],
    title: str,
    description: str,
    *,
    read_only: bool,
    destructive: bool,
    idempotent: bool,
) -> None:
    """Register one tool: its domain errors translated, its title and hints given once."""
    annotations = ToolAnnotations(
        title=title,
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        # Commands in the sandbox may reach the network; reading files and jobs does not.
        open_world_hint=not read_only,
    )
    mcp.tool(_agent_errors(tool), title=title, description=description, annotations=annotations)


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
        version=__version__,
        instructions=(
            "A private Linux shell (Debian, in a Podman container) per session. Run "
            "commands with shell_exec, long-running ones with start_job/read_job, and read "
            "or write files with read_file/write_file. On a stateless (2026-07-28) "
            "connection, first call create_session and pass its session_id to every call."
        ),
        lifespan=lifespan,
        auth=auth,
        middleware=[
            audit.AuditMiddleware(settings.audit_command_chars),  # ops: audit
            ArgumentErrors(),
            PlainText(),
        ],
    )
    idle = describe_seconds(settings.idle_timeout)
    _add_tool(
        mcp,
        shell_exec,
        "Run a shell command",
        _shell_exec_description(settings),
        read_only=False,
        destructive=True,
        idempotent=False,
    )
    _add_tool(
        mcp,
        create_session,
        "Start a sandbox session",
        (
            "Start a new private Linux sandbox and return its session_id. Pass that id to "
            "the other tools to use the sandbox, and to end_session when done. Required on "
            "stateless (2026-07-28) connections; optional on legacy ones. Sandboxes unused "
            f"for {idle} are removed. With snapshot_id, the sandbox starts with the files "
            "of that snapshot (snapshot_session; files only, no processes)."
        ),
        read_only=False,
        destructive=False,
        idempotent=False,
    )
    _add_tool(
        mcp,
        end_session,
        "End a sandbox session",
        (
            "End a session from create_session: its sandbox, jobs and files are removed "
            "(its snapshots are kept until delete_snapshot)."
        ),
        read_only=False,
        destructive=True,
        idempotent=True,
    )
    _add_tool(
        mcp,
        snapshot_session,
        "Snapshot a session's files",
        (
            "Record your sandbox's whole file system now (/workspace, /tmp, installed "
            "packages, every changed file) as a snapshot, and return its snapshot_id; the "
            "session goes on running. Start new sessions from it with "
            "create_session(snapshot_id=...), to branch or to roll back. FILE-SYSTEM ONLY: "
            "processes, background jobs and shell state are not recorded (memory=true is "
            "refused). Snapshots stay until delete_snapshot (they outlive the session and "
            f"server restarts); you may keep {settings.max_snapshots_per_principal}. "
            f"{_SESSION_HINT}"
        ),
        read_only=False,
        destructive=False,
        idempotent=False,
    )
    _add_tool(
        mcp,
        list_snapshots,
        "List your snapshots",
        "List your snapshots (from snapshot_session): id, size and when each was taken.",
        read_only=True,
        destructive=False,
        idempotent=True,
    )
    _add_tool(
        mcp,
        delete_snapshot,
        "Delete a snapshot",
        (
            "Delete one of your snapshots and free its space; sessions started from it keep "
            "their files."
        ),
        read_only=False,
        destructive=True,
        idempotent=False,
    )
    _add_tool(
        mcp,
        fork_session,
        "Fork a session",
        (
            f"Make `count` (1 to {MAX_FORKS}) new sessions, each with its own copy of your "
            "sandbox's files as they are now, and return their session_ids; the session "
            "itself goes on untouched. FILE-SYSTEM ONLY: processes and background jobs are "
            "not copied (start servers again in each fork). Each fork is a new session and "
            f"counts against your session limit. {_SESSION_HINT}"
        ),
        read_only=False,
        destructive=False,
        idempotent=False,
    )
    _add_tool(
        mcp,
        start_job,
        "Start a background job",
        (
            "Start a shell command in the background in your sandbox and return its job_id "
            "at once: for servers, watchers, long builds and test runs (anything that may "
            "outlive about 60 s). It starts in the shell's current directory with its "
            "exported variables. Follow it with read_job; end it with stop_job. Jobs end with "
            f"their session. {_SESSION_HINT}"
        ),
        read_only=False,
        destructive=True,
        idempotent=False,
    )
    _add_tool(
        mcp,
        read_job,
        "Read a background job",
        (
            "Return what a job printed since the last read_job (head and tail kept if long), "
            "whether it still runs, and its exit status once it has ended. With `wait`, "
            "answers as soon as there is new output or the job ends, so you need not poll."
        ),
        read_only=True,
        destructive=False,
        idempotent=False,
    )
    _add_tool(
        mcp,
        stop_job,
        "Stop a background job",
        (
            "Kill a job and every process it started (TERM, then KILL after a grace "
            "period), and return its last output and status."
        ),
        read_only=False,
        destructive=True,
        idempotent=True,
    )
    _add_tool(
        mcp,
        read_file,
        "Read a file",
        (
            f"Read a file in your sandbox, as text by lines (offset from 1, limit lines, "
            f"with the total line count) or as base64 bytes (offset and limit in bytes). "
            f"Files up to {_describe_bytes(settings.max_file_bytes)}. {_SESSION_HINT}"
        ),
        read_only=True,
        destructive=False,
        idempotent=True,
    )
    _add_tool(
        mcp,
        write_file,
        "Write a file",
        (
            "Write a whole file in your sandbox atomically (parent directories are created), "
            "from text or base64; no shell quoting involved. Returns the bytes written. "
            f"{_SESSION_HINT}"
        ),
        read_only=False,
        destructive=True,
        idempotent=True,
    )
    _add_tool(
        mcp,
        edit_file,
        "Edit a file",
        (
            "Replace one exact, unique occurrence of `old` with `new` in a text file in your "
            "sandbox, and write it back atomically: no need to rewrite the whole file. "
            "Fails, changing nothing, when `old` occurs nowhere or more than once. "
            f"{_SESSION_HINT}"
        ),
        read_only=False,
        destructive=True,
        idempotent=False,
    )
    return mcp, sessions


def _check_timeout(timeout: float | None, settings: Settings) -> float:
    if timeout is None:
        return settings.default_timeout
    if not math.isfinite(timeout) or timeout <= 0 or timeout > settings.max_timeout:
        raise SessionError(
            f"timeout must be a number of seconds above 0 and at most {settings.max_timeout:g} "
            f"(got {timeout!r}); the server's maximum is set by {env_var('max_timeout')}."
        )
    return timeout


def _check_background_after(seconds: float | None, settings: Settings) -> float:
    if seconds is None:
        return settings.background_after
    if not math.isfinite(seconds) or seconds < 0:
        raise SessionError(
            f"background_after must be a number of seconds, 0 or more (got {seconds!r}); 0 "
            "waits for the command to end."
        )
    return seconds


def _check_command(command: str, settings: Settings) -> None:
    if "\x00" in command:
        raise SessionError("command contains a NUL byte, which no shell command can carry.")
    size = len(command.encode("utf-8", "surrogatepass"))
    if size > settings.max_command_bytes:
        raise SessionError(
            f"command is {size} bytes, over the limit of {settings.max_command_bytes}. "
            "Write long content to a file in smaller pieces (e.g. several `cat >> file` "
            "calls) and run that file."
        )
