"""Background jobs: commands that outlive a tool call, read a piece at a time.

A job runs through the same engine path as `shell_exec` (`SandboxEngine.run`), with no
timeout; its output streams into a bounded window that `read` hands out and empties, and
(where the engine can) into a log file in the sandbox that keeps every byte. `stop` kills
the job's whole tree with the same guarantee as a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass, field

from pod_exec_mcp.engine import RunResult
from pod_exec_mcp.output import BoundedOutput


def job_key(principal: str | None, job_id: str) -> str:
    """A job's key: a hash of (principal, id), so another principal's id finds nothing."""
    material = f"{principal or ''}\0job\0{job_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()[:32]


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(18)


@dataclass(frozen=True)
class JobRead:
    """What `read_job` and `stop_job` return."""

    job_id: str
    output: str
    running: bool
    retval: int | None
    truncated: bool
    log_file: str | None


@dataclass(frozen=True, slots=True)
class DroppedJob:
    """What is remembered of a finished job dropped to bound a session's memory: enough
    for read_job to say what became of it."""

    session_key: str
    retval: int | None
    log_file: str | None


@dataclass
class Job:
    """One background command of a session."""

    id: str
    session_key: str
    window_bytes: int
    # The file in the sandbox with every byte the job printed, once the engine says so.
    log_file: str | None = None
    # The log keeps only the head and the tail of the output (max_spill_bytes).
    log_keeps: int | None = None
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[RunResult | None] | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    _window: BoundedOutput = field(init=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the job has ended: its exit status, or None if it ended without one.
    retval: int | None = None
    _ended: bool = False

    def __post_init__(self) -> None:
        self._window = BoundedOutput(self.window_bytes)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done() and not self._ended

    def feed(self, chunk: bytes) -> None:
        """Output from the engine, as it comes."""
        self._window.feed(chunk)
        self._changed.set()

    def finished(self, retval: int | None, note: str | None) -> None:
        """The job has ended; `note` (how, when not by itself) ends its output."""
        self.retval = retval
        self._ended = True
        if note:
            self._window.feed(f"\n[pod_exec_mcp: {note}]\n".encode())
        self._window.compact()
        self._changed.set()

    def window_held(self) -> int:
        """Bytes of unread output held in memory."""
        return self._window.held

    async def wait_for_news(self, seconds: float) -> None:
        """Until new output, the end, or `seconds` pass, whichever first."""
        if seconds <= 0 or self._window.total or not self.running:
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    def take(self) -> JobRead:
        """The output since the last read (head and tail kept), and the job's state."""
        window, self._window = self._window, BoundedOutput(self.window_bytes)
        running = self.running
        return JobRead(
            job_id=self.id,
            output=window.text(whole_output_in=self.log_file, file_keeps=self.log_keeps),
            running=running,
            retval=None if running else self.retval,
            truncated=window.truncated,
            log_file=self.log_file,
        )
