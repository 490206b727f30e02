"""One sandbox: a long-lived Podman container, and the commands run in it.

How a sandbox is started (its `podman run` arguments) is kept apart from how a command
runs in it (`Sandbox.execute`), so that either can change without the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pod_exec_mcp.config import Settings
from pod_exec_mcp.output import BoundedOutput
from pod_exec_mcp.podman import Podman, PodmanError

# Every process a command starts inherits this variable, even one that leaves the
# command's process group or session; that is how a timeout finds and kills all of them.
EXEC_ID_ENV = "POD_EXEC_MCP_EXEC_ID"

# Runs inside the container. The first output line is the shell's PID: podman exec makes it
# the leader of its own session and process group, so it names the group to kill. stderr
# joins stdout inside the container, which keeps their true order; then the shell becomes
# `/bin/sh -lc COMMAND` (same PID), so COMMAND runs exactly as a login shell would run it.
_EXEC_WRAPPER = 'echo "$$"; exec 2>&1; exec /bin/sh -lc "$1"'

# Runs inside the container, in one exec: SIGTERM to the command's process group and to
# every process carrying its EXEC_ID_ENV; wait up to the grace period (in tenths of a second)
# for them to go; SIGKILL whatever is left, repeating until nothing is, so that processes
# forked meanwhile are caught too. Exits as soon as nothing is left. Needs only sh, tr, grep.
_KILL_SCRIPT = f"""
pgid=$1 id=$2 ticks=$3
signal_all() {{
  found=1
  if [ -n "$pgid" ]; then kill -s "$1" -- "-$pgid" 2>/dev/null && found=0; fi
  for d in /proc/[0-9]*; do
    p=${{d#/proc/}}
    [ "$p" = "$$" ] && continue
    if tr '\\0' '\\n' < "$d/environ" 2>/dev/null | grep -qxF "{EXEC_ID_ENV}=$id"; then
      kill -s "$1" "$p" 2>/dev/null && found=0
    fi
  done
  return $found
}}
signal_all TERM || exit 0
while [ "$ticks" -gt 0 ]; do
  sleep 0.1
  signal_all 0 || exit 0
  ticks=$((ticks - 1))
done
rounds=0
while signal_all KILL && [ "$rounds" -lt 50 ]; do sleep 0.1; rounds=$((rounds + 1)); done
exit 0
"""

# How long a stopped command's output may take to drain after the kill before we give up on
# the podman client, and how long the kill exec may take beyond the grace period.
_DRAIN_AFTER_KILL = 5.0
_KILL_EXEC_TIMEOUT = 15.0

# Exit statuses that podman exec also uses for its own failures (container gone, runtime
# error). Only for these do we spend an inspect to tell which it was.
_AMBIGUOUS_STATUSES = frozenset({125, 137, 255})

# GNU timeout's status for a command that ran out of time.
TIMEOUT_STATUS = 124

ProgressCallback = Callable[[float], Awaitable[None]]


class SandboxBroken(Exception):
    """The sandbox cannot run commands any more (container gone, exec impossible)."""


@dataclass(frozen=True)
class ExecResult:
    """What a command did."""

    output: str
    retval: int
    truncated: bool
    timed_out: bool
    duration: float
    # The command could not be killed (e.g. every pid is taken, so no exec gets in):
    # the caller must replace the sandbox.
    unkillable: bool = False


def run_arguments(settings: Settings, name: str, labels: dict[str, str]) -> list[str]:
    """The `podman run` arguments that start one sandbox."""
    args = ["run", "--detach", "--rm", "--init", "--name", name]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    args += [
        "--memory", settings.memory,
        "--cpus", f"{settings.cpus:g}",
        "--pids-limit", str(settings.pids_limit),
        # Both rlimits, always: Podman 4.3 fills any unset one with 1048576, which hosts
        # without CAP_SYS_RESOURCE refuse.
        "--ulimit", f"nofile={settings.nofile}:{settings.nofile}",
        "--ulimit", f"nproc={settings.nproc}:{settings.nproc}",
        "--security-opt", "no-new-privileges",
    ]  # fmt: skip
    if settings.strict:
        args += [
            "--cap-drop=ALL",
            "--read-only",
            "--tmpfs", f"/workspace:rw,size={settings.tmpfs_size},mode=1777",
            "--tmpfs", f"/tmp:rw,size={settings.tmpfs_size},mode=1777",
            "--network=none",
        ]  # fmt: skip
    elif not settings.network:
        args.append("--network=none")
    args += settings.extra_run_args
    # The init's own lifetime bound: if this server dies without cleaning up, the
    # container still exits (and --rm removes it) after sandbox_lifetime seconds.
    lifetime = f"{settings.sandbox_lifetime:.0f}" if settings.sandbox_lifetime else "infinity"
    args += [settings.image, "sleep", lifetime]
    return args


class Sandbox:
    """One container: start it, run commands in it, kill them, remove it."""

    def __init__(
        self, podman: Podman, settings: Settings, name: str, labels: dict[str, str]
    ) -> None:
        self.podman = podman
        self.settings = settings
        self.name = name
        self.labels = labels

    async def start(self) -> None:
        await self.podman.run(*run_arguments(self.settings, self.name, self.labels))

    async def remove(self) -> None:
        await self.podman.remove(self.name)

    async def is_running(self) -> bool:
        return await self.podman.is_running(self.name)

    async def execute(
        self,
        command: str,
        timeout: float,
        on_progress: ProgressCallback | None = None,
    ) -> ExecResult:
        """Run `/bin/sh -lc COMMAND` and return its merged output and exit status.

        On timeout or cancellation the command's whole process tree is killed inside the
        container before this returns (or re-raises CancelledError).
        """
        exec_id = secrets.token_hex(12)
        started = time.monotonic()
        proc = await self.podman.spawn(
            "exec", "--env", f"{EXEC_ID_ENV}={exec_id}", self.name,
            "/bin/sh", "-c", _EXEC_WRAPPER, "pod_exec_mcp", command,
        )  # fmt: skip
        output = BoundedOutput(self.settings.max_output_bytes)
        run = _RunningExec(proc, output)
        reader = asyncio.create_task(run.read_all())
        try:
            finished = await self._wait(reader, started, timeout, on_progress)
        except BaseException:
            # Cancelled by the client (or anything else): kill inside the container first.
            # The kill runs as its own task, so a repeated cancel cannot interrupt it.
            stopping = _keep_running(self._stop(run, reader, exec_id))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(stopping)
            raise
        unkillable = False
        if not finished:
            unkillable = not await self._stop(run, reader, exec_id)
        duration = time.monotonic() - started
        if run.pid is None and finished:
            # The shell never started: this is podman's failure, not the command's.
            raise await self._broken(f"podman exec failed: {run.podman_error()}")
        retval = proc.returncode if proc.returncode is not None else -1
        if finished and retval in _AMBIGUOUS_STATUSES and not await self.is_running():
            raise SandboxBroken(
                f"the sandbox container {self.name} stopped while the command ran "
                f"(out of memory, killed or removed from outside; podman said: "
                f"{run.podman_error()})"
            )
        text = output.text()
        if not finished:
            retval = TIMEOUT_STATUS
            text += _notice(
                text,
                f"timed out after {timeout:g} s; the command and every process it started "
                "were killed",
            )
        return ExecResult(
            output=text,
            retval=retval,
            truncated=output.truncated,
            timed_out=not finished,
            duration=duration,
            unkillable=unkillable,
        )

    async def _wait(
        self,
        reader: asyncio.Task[None],
        started: float,
        timeout: float,
        on_progress: ProgressCallback | None,
    ) -> bool:
        """Wait for the command to end; False if `timeout` ran out first."""
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            done, _ = await asyncio.wait(
                {reader}, timeout=min(remaining, self.settings.progress_interval)
            )
            if done:
                reader.result()
                return True
            if on_progress is not None:
                # Progress is a courtesy: a client that went away must not break the run.
                with contextlib.suppress(Exception):
                    await on_progress(time.monotonic() - started)

    async def _stop(self, run: _RunningExec, reader: asyncio.Task[None], exec_id: str) -> bool:
        """Kill a command's whole tree inside the container. False if that proved impossible."""
        killed = await self._kill_tree(run.pid, exec_id)
        await asyncio.wait({reader}, timeout=_DRAIN_AFTER_KILL)
        if not reader.done():
            # Nothing left to read for, and the exec cannot be ended from inside: drop the
            # client so that nothing stays blocked on it.
            killed = False
            with contextlib.suppress(ProcessLookupError):
                run.proc.kill()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        return killed

    async def _kill_tree(self, pid: int | None, exec_id: str) -> bool:
        """SIGTERM, grace, SIGKILL: see _KILL_SCRIPT. False if it could not run."""
        grace_ticks = round(self.settings.kill_grace * 10)
        try:
            done = await asyncio.wait_for(
                self.podman.run(
                    "exec", self.name, "/bin/sh", "-c", _KILL_SCRIPT, "pod_exec_mcp",
                    str(pid) if pid is not None else "", exec_id, str(grace_ticks),
                    check=False,
                ),
                self.settings.kill_grace + _KILL_EXEC_TIMEOUT,
            )  # fmt: skip
        except TimeoutError:
            return False
        return done.returncode == 0

    async def _broken(self, reason: str) -> SandboxBroken:
        if not await self.is_running():
            reason = f"the sandbox container {self.name} is gone ({reason})"
        return SandboxBroken(reason)


def _notice(output: str, message: str) -> str:
    """A marker line of ours, on a line of its own after `output`."""
    newline = "\n" if output and not output.endswith("\n") else ""
    return f"{newline}[pod_exec_mcp: {message}]"


class _RunningExec:
    """The podman exec client of one command, and what it has said so far."""

    def __init__(self, proc: asyncio.subprocess.Process, output: BoundedOutput) -> None:
        self.proc = proc
        self.output = output
        self.pid: int | None = None
        self._stderr = b""

    async def read_all(self) -> None:
        """Read the PID line, then the output until EOF, then podman's own stderr."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        stderr_task = asyncio.create_task(self.proc.stderr.read())
        try:
            first = await self.proc.stdout.readline()
            if first.endswith(b"\n") and first[:-1].isdigit():
                self.pid = int(first)
            else:
                self.output.feed(first)
            while chunk := await self.proc.stdout.read(65536):
                self.output.feed(chunk)
            await self.proc.wait()
        finally:
            # podman's stderr closes when it exits; never wait on it for long.
            done, _ = await asyncio.wait({stderr_task}, timeout=1.0)
            if done and not stderr_task.cancelled() and stderr_task.exception() is None:
                self._stderr = stderr_task.result()
            else:
                stderr_task.cancel()

    def podman_error(self) -> str:
        text = " ".join(self._stderr.decode("utf-8", "replace").split())
        return text or f"exit status {self.proc.returncode}"


# Tasks that must finish even though whoever started them was cancelled.
_background: set[asyncio.Future[object]] = set()


def _keep_running(coro: Awaitable[object]) -> asyncio.Future[object]:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


async def wait_for_background() -> None:
    """Let kills started for cancelled commands finish (used at shutdown)."""
    while _background:
        await asyncio.gather(*list(_background), return_exceptions=True)


__all__ = [
    "TIMEOUT_STATUS",
    "ExecResult",
    "PodmanError",
    "Sandbox",
    "SandboxBroken",
    "run_arguments",
    "wait_for_background",
]
