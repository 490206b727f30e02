"""The sessions service: who owns which sandbox, and the one path every command takes.

`Sessions.run` is that path: it marks the session busy, gets (or starts, or takes from the
warm pool) its sandbox, waits for an exec slot, asks the engine to run the command (the
engine enforces the timeout and bounds the output), and replaces the sandbox only when the
engine says it is gone. Every failure an agent can see is a `SessionError` whose message is
written for the agent.

A session is addressed by a key derived from (principal, kind, id). Raw ids never leave
this module: container names and labels carry a hash, so that listing containers on the
host reveals no id that would let someone drive another client's sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pod_exec_mcp import audit  # ops: audit
from pod_exec_mcp.config import Settings, env_var, parse_size
from pod_exec_mcp.egress import EgressPolicy, RuleError
from pod_exec_mcp.engine import (
    EngineError,
    OutputCallback,
    ProgressCallback,
    RunRequest,
    RunResult,
    Sandbox,
    SandboxBroken,
    SandboxEngine,
    SandboxSpec,
    SnapshotInfo,
    sandbox_spec,
)
from pod_exec_mcp.idempotency import Once
from pod_exec_mcp.instances import Instance
from pod_exec_mcp.jobs import DroppedJob, Job, JobRead, job_key, new_job_id
from pod_exec_mcp.output import BoundedOutput, notice
from pod_exec_mcp.podman import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_SESSION,
    LABEL_SNAPSHOT,
    LABEL_SNAPSHOT_KIND,
    LABEL_SNAPSHOT_PRINCIPAL,
    has_labels,
)
from pod_exec_mcp.pool import WarmPool
from pod_exec_mcp.shell_state import (
    CWD_GONE,
    JOBS_DIR,
    STATE_DIR,
    in_session_cwd,
    new_output_file,
    persistent_command,
    prune_spill_files,
    restoring_command,
)
from pod_exec_mcp.slots import ExecSlots

log = logging.getLogger(__name__)

SessionKind = Literal["explicit", "legacy"]

# What failed commands print when a disk is full, and the probe that then checks it.
_DISK_FULL_SIGNS = ("No space left on device", "Disk quota exceeded", "ENOSPC")
_FREE_SPACE = "df -Pk / /tmp 2>/dev/null | awk 'NR > 1 {print $2, $4, $6}'"

# All keyed calls' results kept together (config.py, idempotency_keys_per_session).
IDEMPOTENT_RESULT_BYTES = 64 * 1024 * 1024

# How long read_job waits, past news, for the job's end (see read_job).
_EXIT_AFTER_OUTPUT = 0.2

# How many ended session keys we remember, to tell "ended" from "never existed".
_TOMBSTONES = 10_000

# Where snapshot images are kept (tagged with the snapshot's id), and the most copies one
# fork_session makes.
SNAPSHOT_REPOSITORY = "localhost/pod_exec_mcp_snapshot"
MAX_FORKS = 8

# What snapshot_session and fork_session say when asked for a process (memory) snapshot.
MEMORY_REFUSED = (
    "memory snapshots are not available: this server takes file-system snapshots only "
    "(every file of the sandbox, including /workspace, /tmp and what was installed; no "
    "processes, background jobs or open connections). Call again without memory, and "
    "restart the processes you need in the new session."
)


class SessionError(Exception):
    """A session or its command cannot go on; the message says what the agent should do."""


@dataclass
class Session:
    """One live session and its sandbox."""

    key: str
    kind: SessionKind
    principal: str | None
    # Commands of this session that may run at once (fairness between sessions).
    exec_slots: asyncio.Semaphore
    sandbox: Sandbox | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    # When the sandbox's output files were last pruned, and whether a prune waits: at most
    # one a second (many short jobs would otherwise each cost one more exec), none skipped.
    spill_pruned_at: float = 0.0
    spill_prune_waits: bool = False
    ended: bool = False
    # The session's egress policy (the operator's, maybe narrowed at create_session).
    egress: EgressPolicy | None = None
    # Its background jobs, running and finished, oldest first (keyed as Sessions._jobs).
    jobs: OrderedDict[str, Job] = field(default_factory=OrderedDict)
    # The snapshot image its first sandbox starts from (create_session(snapshot_id=...),
    # fork_session); None: the server's image. A replacement sandbox is always fresh.
    start_image: str | None = None


@dataclass(frozen=True)
class SnapshotRecord:
    """One snapshot of a principal's, as the tools report it."""

    snapshot_id: str
    size: int
    # Wall clock.
    created: float
    # Seconds the snapshot took (when it was just taken).
    took: float | None = None


@dataclass(frozen=True)
class LegacyLookup:
    """The session tied to an MCP (Mcp-Session-Id) session."""

    session: Session
    # First use by this MCP session: the caller ties the session's end to the MCP session's.
    is_new: bool
    # Why an earlier sandbox of this MCP session was removed (idle reaping), when a new
    # session takes its place; None otherwise.
    replaced_because: str | None


@dataclass(frozen=True)
class CommandResult:
    """What a command did, as the sessions layer reports it."""

    output: str
    retval: int
    truncated: bool
    timed_out: bool
    duration: float
    # Seconds the command waited for an exec slot before it started.
    queue_wait: float
    # The file in the sandbox that holds the whole output, when it was cut.
    output_file: str | None = None
    # Still running after background_after: it goes on as this job (retval is then -1).
    job_id: str | None = None


def session_key(principal: str | None, kind: SessionKind, session_id: str) -> str:
    """The session's key (and container label): a hash, never the raw id."""
    material = f"{principal or ''}\0{kind}\0{session_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()[:32]


def principal_label(principal: str | None) -> str:
    """The label that names a snapshot's principal: a hash, never the principal itself."""
    material = f"snapshot\0{principal or ''}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()[:32]


def describe_seconds(seconds: float) -> str:
    """A duration as people write it: "8 s", "90 s", "30 min", "2 h"."""
    if seconds < 120 or seconds % 60:
        return f"{seconds:g} s"
    if seconds < 7200 or seconds % 3600:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


class Sessions:
    """Sessions and their sandboxes: start, run, replace, reap, remove."""

    def __init__(self, engine: SandboxEngine, settings: Settings, instance: Instance) -> None:
        self.engine = engine
        self.settings = settings
        self.instance = instance
        self._live: dict[str, Session] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._closed = False
        self._exec_slots = ExecSlots(settings.max_concurrent_execs)
        # Keyed calls' results (idempotency_key), for the tools layer.
        self.once = Once(
            settings.idempotency_keys_per_session,
            settings.idempotency_key_ttl,
            IDEMPOTENT_RESULT_BYTES,
        )
        self.egress = EgressPolicy.from_rules(settings.egress_allow, settings.egress_deny)
        self.pool = WarmPool(
            engine, lambda: self._spec("pool"), settings.warm_pool, settings.sandbox_lifetime
        )
        self._reaper: asyncio.Task[None] | None = None
        self._jobs: dict[str, Job] = {}
        # Finished jobs dropped to bound their session's memory, so that read_job can say so.
        self._dropped_jobs: OrderedDict[str, DroppedJob] = OrderedDict()
        # Housekeeping commands (pruning kept outputs) that nobody waits for.
        self._background: set[asyncio.Future[None]] = set()
        # One snapshot at a time, so that the bounds are checked against a settled count.
        self._snapshotting = asyncio.Lock()

    # --- lifecycle of the service -------------------------------------------------------

    @property
    def exec_slots(self) -> ExecSlots:  # ops: metrics
        return self._exec_slots

    def census(self) -> tuple[list[Session], list[str]]:  # ops: metrics, --list-containers
        """The live sessions, and the names of the pooled sandboxes."""
        return list(self._live.values()), self.pool.names()

    def start_background(self) -> None:
        """Start the reaper and fill the warm pool (needs a running event loop)."""
        self._reaper = asyncio.create_task(self._reap_forever())
        self.pool.fill()

    async def close(self) -> None:
        """End every session and remove every sandbox (shutdown). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.engine.close()
        await self.pool.close()
        await asyncio.gather(
            *(self.end(s, "server shut down") for s in list(self._live.values())),
            return_exceptions=True,
        )
        # Belt and braces: anything of this instance that the engine still lists.
        try:
            leftovers = await self.engine.list_ours(f"{LABEL_INSTANCE}={self.instance.id}")
        except EngineError:
            log.exception("could not list leftover sandboxes at shutdown")
            return
        await self.engine.remove(*[info.as_sandbox() for info in leftovers])

    # --- looking sessions up ------------------------------------------------------------

    async def create_explicit(
        self,
        principal: str | None,
        egress_allow: list[str] | None = None,
        egress_deny: list[str] | None = None,
        snapshot_id: str | None = None,
    ) -> str:
        """Mint an unguessable session id and start its sandbox now (from the principal's
        snapshot `snapshot_id`, if given). `egress_allow` and `egress_deny` narrow the
        operator's egress policy for this session (never widen)."""
        egress = self._narrowed_egress(egress_allow, egress_deny)
        image = None
        if snapshot_id is not None:
            image = (await self._snapshot_of(principal, snapshot_id)).name
        session_id = secrets.token_urlsafe(24)
        session = self._add(session_key(principal, "explicit", session_id), "explicit", principal)
        session.egress = egress
        session.start_image = image
        await self._sandbox_of(session)
        return session_id

    def _narrowed_egress(
        self, allow: list[str] | None, deny: list[str] | None
    ) -> EgressPolicy | None:
        if allow is None and deny is None:
            return None
        if self.settings.network == "bridge" and not self.settings.strict:
            raise SessionError(
                "egress_allow/egress_deny need the isolated network mode; this server runs "
                "sandboxes on the bridge network, where connections cannot be filtered. Omit "
                f"them, or ask the operator for {env_var('network')}=isolated."
            )
        try:
            return self.egress.narrowed(allow, deny)
        except RuleError as exc:
            raise SessionError(str(exc)) from None

    def explicit(self, principal: str | None, session_id: str) -> Session:
        """The live session `session_id` of `principal`."""
        key = session_key(principal, "explicit", session_id)
        session = self._live.get(key)
        if session is not None:
            return session
        why = self._ended.get(key)
        if why is not None:
            raise SessionError(
                f"session {session_id!r} has ended ({why}); its sandbox and files are gone. "
                "Call create_session for a new one."
            )
        raise SessionError(
            f"unknown session_id {session_id!r}: no such session exists for this client. "
            "Call create_session and pass the id it returns."
        )

    def legacy(self, principal: str | None, mcp_session_id: str) -> LegacyLookup:
        """The session of an MCP session, added on first use. A still-connected client whose
        sandbox was reaped cannot reconnect on its own, so it gets a fresh one."""
        key = session_key(principal, "legacy", mcp_session_id)
        session = self._live.get(key)
        if session is not None:
            return LegacyLookup(session, is_new=False, replaced_because=None)
        why = self._ended.pop(key, None)
        return LegacyLookup(self._add(key, "legacy", principal), True, why)

    def _add(self, key: str, kind: SessionKind, principal: str | None) -> Session:
        if self._closed:
            raise SessionError("the server is shutting down; try again later.")
        if len(self._live) >= self.settings.max_sandboxes:
            raise SessionError(
                f"the server already holds its maximum of {self.settings.max_sandboxes} "
                "sandboxes. End a session you no longer need (end_session), wait for idle "
                f"ones to be reaped, or raise {env_var('max_sandboxes')}."
            )
        if principal is not None:
            cap = self.settings.max_sandboxes_per_principal or max(
                1, self.settings.max_sandboxes // 2
            )
            held = sum(1 for s in self._live.values() if s.principal == principal)
            if held >= cap:
                raise SessionError(
                    f"this client already holds its maximum of {cap} sandboxes. End a "
                    "session you no longer need (end_session) or wait for idle ones to be "
                    f"reaped; the operator sets the cap with "
                    f"{env_var('max_sandboxes_per_principal')}."
                )
        session = Session(
            key=key,
            kind=kind,
            principal=principal,
            exec_slots=asyncio.Semaphore(self.settings.max_execs_per_session),
        )
        self._live[key] = session
        return session

    # --- the one path of a command ------------------------------------------------------

    async def run(
        self,
        session: Session,
        command: str,
        timeout: float,
        on_progress: ProgressCallback | None = None,
        background_after: float = 0.0,
    ) -> CommandResult:
        """Run `command` in the session's sandbox (started on first use).

        The engine enforces `timeout` (killing the command's whole tree) and bounds the
        output, keeping the whole of a cut output in a file in the sandbox. A sandbox the
        engine reports gone is replaced, and the agent told so. A command still running
        after `background_after` seconds (0: never) goes on as a job, and this returns at
        once with its output so far and the job's id (issue 23: clients give up at 60 s).
        """
        script, env = (
            persistent_command(command) if self.settings.persistent_shell else (command, {})
        )
        request = self._request(script, timeout, env=env, spill_path=new_output_file())
        if not 0 < background_after < timeout:
            result, queue_wait = await self._execute(session, request, on_progress)
            return await self._finished(session, result, queue_wait)
        job = Job(new_job_id(), session.key, self.settings.max_output_bytes)
        so_far = BoundedOutput(self.settings.max_output_bytes)

        def feed(chunk: bytes) -> None:
            (so_far if job.task is None else job).feed(chunk)

        async def progress(elapsed: float) -> None:
            if job.task is None and on_progress is not None:
                await on_progress(elapsed)

        running = asyncio.ensure_future(
            self._execute(session, request, progress, feed, stop=job.stop_requested)
        )
        try:
            await asyncio.wait({running}, timeout=background_after)
        except asyncio.CancelledError:
            running.cancel()  # the call was cancelled before it moved: kill the command
            with contextlib.suppress(asyncio.CancelledError, SessionError):
                await running
            raise
        if running.done():
            result, queue_wait = running.result()
            return await self._finished(session, result, queue_wait)
        job.task = asyncio.create_task(self._backgrounded(session, job, running, timeout))
        key = job_key(session.principal, job.id)
        self._jobs[key] = session.jobs[key] = job
        note = (
            f"still running after {background_after:g} s, so it goes on as job {job.id} and "
            f"still ends at its timeout ({timeout:g} s). Call read_job with this job_id for "
            "the rest of its output and its exit status; retval is -1 until then"
        )
        text = so_far.text()
        return CommandResult(
            output=text + notice(text, note),
            retval=-1,
            truncated=so_far.truncated,
            timed_out=False,
            duration=background_after,
            queue_wait=0.0,
            job_id=job.id,
        )

    async def _said_if_disk_full(self, session: Session, result: CommandResult) -> CommandResult:
        """A failed command whose output speaks of a full disk, on a sandbox whose disk is
        full now: the result says so, and what to do (issue 23: pip's `[Errno 28]` alone
        did not tell the agent why)."""
        if result.retval == 0:
            return result
        note = await self._disk_full(session, result.output)
        if note is None:
            return result
        return replace(result, output=result.output + notice(result.output, note))

    async def _disk_full(self, session: Session, output: str) -> str | None:
        """For a failure whose `output` speaks of a full disk: what of the sandbox's / and
        /tmp is full now (under 16 MiB or 1 % free), said for the agent; None if neither
        is, or the output does not speak of it."""
        if not any(sign in output for sign in _DISK_FULL_SIGNS):
            return None
        try:
            probe, _ = await self._execute(session, self._request(_FREE_SPACE, 10))
        except SessionError:
            return None
        full = []
        for line in probe.output.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit():
                size_k, free_k, mount = int(fields[0]), int(fields[1]), fields[2]
                if free_k < max(16 * 1024, size_k // 100) and mount not in full:
                    full.append(mount)
        if not full:
            return None
        return (
            f"the sandbox's disk is full ({' and '.join(full)}: under 1 % free), which is "
            "most likely why this failed. Delete what you no longer need (`du -xsh /* "
            f"2>/dev/null` shows where it went; old outputs in {STATE_DIR} can go too) "
            "and run it again"
        )

    async def _finished(
        self, session: Session, result: RunResult, queue_wait: float
    ) -> CommandResult:
        if result.output_file is not None:
            # Old whole outputs go, so that they cannot fill the sandbox's disk.
            self._in_background(self._prune_spill_files(session))
        return await self._said_if_disk_full(session, _command_result(result, queue_wait))

    async def _backgrounded(
        self,
        session: Session,
        job: Job,
        running: asyncio.Future[tuple[RunResult, float]],
        timeout: float,
    ) -> RunResult | None:
        """The rest of a shell_exec that went on as a job."""
        try:
            result, _ = await running
        except asyncio.CancelledError:
            running.cancel()
            job.finished(None, "the job was killed: its session ended")
            raise
        except SessionError as exc:
            job.finished(None, f"the job ended without an exit status: {exc}")
            self._drop_oldest_finished_jobs(session)
            return None
        note = None
        if result.timed_out:
            why = "stopped by stop_job" if job.stop_requested.is_set() else (
                f"timed out after {timeout:g} s"
            )  # fmt: skip
            note = f"{why}; {result.kill_note}"
        return self._job_ended(session, job, result, note)

    def _job_ended(
        self, session: Session, job: Job, result: RunResult, note: str | None
    ) -> RunResult:
        """A job's command has ended (a start_job's, or a shell_exec's that moved to the
        background): its status, its log file, the session's bounds."""
        if result.output_file is not None:
            job.log_file = result.output_file
            if result.output_file_cut:
                job.log_keeps = self.settings.max_spill_bytes
        job.finished(result.retval, note)
        self._drop_oldest_finished_jobs(session)
        if result.output_file is not None:
            self._in_background(self._prune_spill_files(session))
        return result

    def _request(
        self,
        command: str,
        timeout: float | None,
        *,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        spill_path: str | None = None,
    ) -> RunRequest:
        return RunRequest(
            command=command,
            timeout=timeout,
            kill_grace=self.settings.kill_grace,
            max_output_bytes=self.settings.max_output_bytes,
            progress_interval=self.settings.progress_interval,
            env=env or {},
            stdin=stdin,
            spill_path=spill_path,
            max_spill_bytes=self.settings.max_spill_bytes,
        )

    async def _execute(
        self,
        session: Session,
        request: RunRequest,
        on_progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
        stop: asyncio.Event | None = None,
    ) -> tuple[RunResult, float]:
        """The path of every command: busy, sandbox, exec slots, engine, recovery.
        Returns the result and the seconds it waited for a slot."""
        session.busy += 1
        try:
            sandbox = await self._sandbox_of(session)
            queued = time.monotonic()
            async with session.exec_slots, self._exec_slots.slot(session.key):
                queue_wait = time.monotonic() - queued
                try:
                    result = await self.engine.run(sandbox, request, on_progress, on_output, stop)
                except SandboxBroken as exc:
                    raise SessionError(await self._recover(session, sandbox, str(exc))) from None
                except EngineError as exc:
                    raise SessionError(
                        f"podman failed to run the command ({exc}). The sandbox and its files "
                        "are intact: run the command again."
                    ) from None
            if result.unkillable:
                reason = "the command could not be killed inside it"
                note = await self._recover(session, sandbox, reason)
                result = replace(result, output=result.output + f"\n[pod_exec_mcp: {note}]")
        finally:
            session.busy -= 1
            session.last_used = time.monotonic()
        return result, queue_wait

    async def _prune_spill_files(self, session: Session) -> None:
        """Delete the sandbox's oldest output files and finished jobs' logs past
        max_spill_total_bytes."""
        if not self.settings.max_spill_total_bytes or session.ended or session.spill_prune_waits:
            return
        session.spill_prune_waits = True
        try:
            await asyncio.sleep(max(0.0, session.spill_pruned_at + 1.0 - time.monotonic()))
        finally:
            session.spill_prune_waits = False
        if session.ended:
            return
        session.spill_pruned_at = time.monotonic()
        running = [f"{JOBS_DIR}/{job.id}.log" for job in session.jobs.values() if job.running]
        script = prune_spill_files(self.settings.max_spill_total_bytes, running)
        with contextlib.suppress(SessionError):
            await self._execute(session, self._request(script, 30))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- files --------------------------------------------------------------------------

    async def read_file(self, session: Session, path: str) -> bytes:
        """The bytes of a regular file in the sandbox (relative: to the shell's current
        directory), at most max_file_bytes."""
        _check_path(path)
        limit = self.settings.max_file_bytes
        data = bytearray()

        def collect(chunk: bytes) -> None:
            if len(data) <= limit:
                data.extend(chunk[: limit + 1 - len(data)])

        request = self._request(
            in_session_cwd(_READ_FILE.replace("MAX_BYTES", str(limit))),
            self.settings.default_timeout,
            env={PATH_ENV: path},
        )
        result, _ = await self._execute(session, request, on_output=collect)
        if result.retval == _NOT_FOUND:
            raise SessionError(
                "read_file needs perl in the sandbox (Debian's perl-base), and it is gone. "
                f"Read {path} with shell_exec (cat, head, sed -n) instead, or reinstall "
                "perl-base."
            )
        _raise_for_file_status(result, path, limit)
        if len(data) > limit:
            raise SessionError(
                f"{path} grew past the {limit}-byte limit while it was read; read it again "
                "or in pieces with shell_exec (e.g. `split`)."
            )
        return bytes(data)

    async def edit_file(self, session: Session, path: str, old: str, new: str) -> tuple[str, int]:
        """Replace the one occurrence of `old` in the text file `path` with `new`; returns
        the absolute path and the new size. An `old` found nowhere or more than once is an
        error, and nothing is written. Read, then written atomically: a change made to the
        file in between by something else is lost, as with any editor."""
        if not old:
            raise SessionError("old must be the exact, non-empty text to replace.")
        try:
            text = (await self.read_file(session, path)).decode("utf-8")
        except UnicodeDecodeError:
            raise SessionError(
                f"{path} is not UTF-8 text; change it with shell_exec (sed, perl) instead."
            ) from None
        found = text.count(old)
        if found != 1:
            where = "nowhere in it" if not found else f"{found} times in it"
            raise SessionError(
                f"old is {where}, and edit_file replaces exactly one occurrence: "
                + (
                    "copy the text exactly as the file has it (read_file shows it)."
                    if not found
                    else "give more of the surrounding text, so that it is unique."
                )
            )
        return await self.write_file(session, path, text.replace(old, new, 1).encode("utf-8"))

    async def write_file(self, session: Session, path: str, data: bytes) -> tuple[str, int]:
        """Write `data` to `path` atomically (a temporary file renamed into place),
        creating parent directories; returns the absolute path written and its size."""
        _check_path(path)
        limit = self.settings.max_file_bytes
        if len(data) > limit:
            raise SessionError(
                f"content is {len(data)} bytes, over the {limit}-byte limit of write_file; "
                "write it in parts (append with shell_exec) or raise "
                f"{env_var('max_file_bytes')}."
            )
        request = self._request(
            in_session_cwd(_WRITE_FILE), self.settings.default_timeout, env={PATH_ENV: path},
            stdin=data,
        )  # fmt: skip
        result, _ = await self._execute(session, request)
        try:
            _raise_for_file_status(result, path, limit)
        except SessionError as exc:
            if (note := await self._disk_full(session, result.output)) is not None:
                raise SessionError(f"{exc} {note[0].upper()}{note[1:]}.") from None
            raise
        written = result.output.strip()
        return (written if written.startswith("/") else path), len(data)

    # --- background jobs ----------------------------------------------------------------

    async def start_job(self, session: Session, principal: str | None, command: str) -> str:
        """Start `command` as a background job of the session; returns its id at once."""
        running = [j for j in session.jobs.values() if j.running]
        if len(running) >= self.settings.max_jobs_per_session:
            raise SessionError(
                f"this session already runs {len(running)} jobs, its maximum. Stop one you "
                "no longer need (stop_job), or raise "
                f"{env_var('max_jobs_per_session')}."
            )
        session.busy += 1
        try:
            sandbox = await self._sandbox_of(session)
        finally:
            session.busy -= 1
            session.last_used = time.monotonic()
        job_id = new_job_id()
        job = Job(id=job_id, session_key=session.key, window_bytes=self.settings.max_output_bytes)
        script, env = (
            restoring_command(command) if self.settings.persistent_shell else (command, {})
        )
        request = self._request(script, None, env=env, spill_path=f"{JOBS_DIR}/{job_id}.log")
        # The whole output goes to the job's log from its first byte on.
        request = replace(request, max_output_bytes=1)
        key = job_key(principal, job_id)
        self._jobs[key] = session.jobs[key] = job
        job.task = asyncio.create_task(self._run_job(session, sandbox, job, request))
        return job_id

    def job(self, principal: str | None, job_id: str) -> Job:
        """A job of `principal`'s, live or finished, while its session lives."""
        key = job_key(principal, job_id)
        job = self._jobs.get(key)
        if job is not None:
            return job
        dropped = self._dropped_jobs.get(key)
        if dropped is not None:
            raise SessionError(self._dropped_message(job_id, dropped))
        raise SessionError(
            f"unknown job_id {job_id!r}: no such job exists for this client (jobs end "
            "with their session). Start one with start_job and pass the id it returns."
        )

    def _dropped_message(self, job_id: str, dropped: DroppedJob) -> str:
        status = (
            "without an exit status" if dropped.retval is None
            else f"(exit status {dropped.retval})"
        )  # fmt: skip
        where = (
            "Its session has ended since, so its log is gone too."
            if dropped.session_key not in self._live
            else f"Everything it printed is in {dropped.log_file} in the sandbox: read it "
            "with read_file or shell_exec."
            if dropped.log_file
            else "It left no log file in the sandbox."
        )
        return (
            f"job {job_id!r} ended {status} and was dropped unread: a session keeps the "
            f"output of only its {self.settings.max_kept_jobs_per_session} most recent "
            f"finished jobs. {where} Read jobs soon after they end, or ask the operator to "
            f"raise {env_var('max_kept_jobs_per_session')}."
        )

    def _drop_oldest_finished_jobs(self, session: Session) -> None:
        """Keep at most max_kept_jobs_per_session finished jobs of the session, dropping the
        oldest first, and remember what became of each (bounded, like ended sessions)."""
        finished = [k for k, j in session.jobs.items() if not j.running]
        for key in finished[: max(0, len(finished) - self.settings.max_kept_jobs_per_session)]:
            job = session.jobs.pop(key)
            self._jobs.pop(key, None)
            self._dropped_jobs[key] = DroppedJob(session.key, job.retval, job.log_file)
        while len(self._dropped_jobs) > _TOMBSTONES:
            self._dropped_jobs.popitem(last=False)

    async def read_job(self, job: Job, wait: float) -> JobRead:
        """The job's output since the last read; waits up to `wait` s for news first."""
        self._touch(job)
        started = time.monotonic()
        await job.wait_for_news(wait)
        # Output comes a moment before the exit status: give the job that moment, so the
        # final output and the status come in one answer, not two.
        left = min(_EXIT_AFTER_OUTPUT, wait - (time.monotonic() - started))
        if job.running and job.task is not None and left > 0:
            await asyncio.wait({job.task}, timeout=left)
        return job.take()

    async def stop_job(self, job: Job) -> JobRead:
        """Kill the job's whole tree (as a timeout would) and return its final state."""
        self._touch(job)
        job.stop_requested.set()
        if job.task is not None:
            await asyncio.gather(asyncio.shield(job.task), return_exceptions=True)
        return job.take()

    def _touch(self, job: Job) -> None:
        session = self._live.get(job.session_key)
        if session is not None:
            session.last_used = time.monotonic()

    async def _run_job(
        self, session: Session, sandbox: Sandbox, job: Job, request: RunRequest
    ) -> RunResult | None:
        try:
            result = await self.engine.run(
                sandbox, request, on_output=job.feed, stop=job.stop_requested
            )
        except asyncio.CancelledError:
            job.finished(None, "the job was killed: its session ended")
            raise
        except (SandboxBroken, EngineError) as exc:
            job.finished(None, f"the job ended without an exit status: {exc}")
            self._drop_oldest_finished_jobs(session)
            return None
        note = f"stopped by stop_job; {result.kill_note}" if result.timed_out else None
        return self._job_ended(session, job, result, note)

    # --- snapshots and forks (file system only) -----------------------------------------

    def _snapshots_possible(self, memory: bool) -> None:
        if memory:
            raise SessionError(MEMORY_REFUSED)
        if self.settings.strict:
            raise SessionError(
                "this server runs strict sandboxes, whose /workspace and /tmp are tmpfs "
                "mounts in memory that a file-system snapshot cannot record; snapshots and "
                "forks are not available here."
            )

    def _snapshot_labels(
        self, principal: str | None, snapshot_id: str, kind: str
    ) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_OWNER: self.instance.owner,
            LABEL_INSTANCE: self.instance.id,
            LABEL_SNAPSHOT: snapshot_id,
            LABEL_SNAPSHOT_PRINCIPAL: principal_label(principal),
            LABEL_SNAPSHOT_KIND: kind,
        }

    async def _kept_snapshots(self, *label_filters: str) -> list[SnapshotInfo]:
        """The snapshots of this state dir (not forks' passing copies) with the labels."""
        wanted = (
            f"{LABEL_OWNER}={self.instance.owner}", f"{LABEL_SNAPSHOT_KIND}=snapshot",
            *label_filters,
        )  # fmt: skip
        try:
            found = await self.engine.list_snapshots(*wanted)
        except EngineError as exc:
            raise SessionError(f"could not list snapshots: podman failed ({exc}).") from None
        # Checked again here: whose a snapshot is must not depend on an engine's filter.
        return [s for s in found if has_labels(dict(s.labels), wanted)]

    async def _snapshot_of(self, principal: str | None, snapshot_id: str) -> SnapshotInfo:
        found = await self._kept_snapshots(
            f"{LABEL_SNAPSHOT}={snapshot_id}",
            f"{LABEL_SNAPSHOT_PRINCIPAL}={principal_label(principal)}",
        )
        if not found:
            raise SessionError(
                f"unknown snapshot_id {snapshot_id!r}: no such snapshot exists for this "
                "client (deleted, or never taken). list_snapshots shows yours."
            )
        return found[0]

    async def snapshot(
        self, session: Session, principal: str | None, memory: bool = False
    ) -> SnapshotRecord:
        """Record the session's file system as a snapshot of `principal`'s; the session
        goes on running. Bounded per principal and in total size."""
        self._snapshots_possible(memory)
        cap = self.settings.max_snapshots_per_principal
        if cap == 0:
            raise SessionError(
                f"snapshots are turned off on this server ({env_var('max_snapshots_per_principal')}"
                "=0); fork_session still copies a running session."
            )
        bound = parse_size(self.settings.max_snapshot_bytes)
        async with self._snapshotting:
            kept = await self._kept_snapshots()
            mine = [
                s
                for s in kept
                if s.labels.get(LABEL_SNAPSHOT_PRINCIPAL) == principal_label(principal)
            ]
            if len(mine) >= cap:
                raise SessionError(
                    f"this client already keeps its maximum of {cap} snapshots. Delete one "
                    "you no longer need (list_snapshots, delete_snapshot); the operator sets "
                    f"the cap with {env_var('max_snapshots_per_principal')}."
                )
            total = sum(s.size for s in kept)
            if total >= bound:
                raise SessionError(self._space_refusal(total, bound))
            snapshot_id = f"snap_{secrets.token_urlsafe(18)}"
            name = f"{SNAPSHOT_REPOSITORY}:{snapshot_id}"
            info, took = await self._take(
                session, name, self._snapshot_labels(principal, snapshot_id, "snapshot")
            )
            if total + info.size > bound:
                with contextlib.suppress(EngineError):
                    await self.engine.remove_snapshot(name)
                raise SessionError(self._space_refusal(total, bound, info.size))
        return SnapshotRecord(snapshot_id, info.size, info.created, took)

    def _space_refusal(self, total: int, bound: int, size: int | None = None) -> str:
        taking = f"; this one took {size} bytes and was not kept" if size is not None else ""
        return (
            f"the snapshots of this server already take {total} bytes of the "
            f"{bound} allowed ({env_var('max_snapshot_bytes')}){taking}. Delete snapshots "
            "you no longer need (list_snapshots, delete_snapshot), or remove large files "
            "you do not need before taking one."
        )

    async def _take(
        self, session: Session, name: str, labels: dict[str, str], passing: bool = False
    ) -> tuple[SnapshotInfo, float]:
        """The engine's snapshot of the session's sandbox (started if need be), and the
        seconds it took. The session stays usable meanwhile (its lock is not held)."""
        session.busy += 1
        try:
            sandbox = await self._sandbox_of(session)
            started = time.monotonic()
            try:
                info = await self.engine.snapshot(sandbox, name, labels, passing)
            except EngineError as exc:
                raise SessionError(
                    f"could not take the snapshot ({exc}); the session is unchanged."
                ) from None
            return info, time.monotonic() - started
        finally:
            session.busy -= 1
            session.last_used = time.monotonic()

    async def list_snapshots(self, principal: str | None) -> list[SnapshotRecord]:
        """`principal`'s snapshots, oldest first."""
        found = await self._kept_snapshots(
            f"{LABEL_SNAPSHOT_PRINCIPAL}={principal_label(principal)}"
        )
        records = [SnapshotRecord(s.labels[LABEL_SNAPSHOT], s.size, s.created) for s in found]
        return sorted(records, key=lambda r: (r.created, r.snapshot_id))

    async def delete_snapshot(self, principal: str | None, snapshot_id: str) -> None:
        """Remove one of `principal`'s snapshots; sessions started from it keep their files."""
        info = await self._snapshot_of(principal, snapshot_id)
        try:
            await self.engine.remove_snapshot(info.name)
        except EngineError as exc:
            raise SessionError(f"could not delete the snapshot: podman failed ({exc}).") from None

    async def fork(self, session: Session, principal: str | None, count: int) -> list[str]:
        """`count` new sessions of `principal`, each starting from a copy of the session's
        files as they are now (the session goes on untouched); their ids. Each counts
        against max_sandboxes and the per-principal cap, like any new session."""
        self._snapshots_possible(False)
        if not 1 <= count <= MAX_FORKS:
            raise SessionError(f"count must be from 1 to {MAX_FORKS} (got {count}).")
        forks: list[tuple[str, Session]] = []
        try:
            # Admitted first: a refused fork costs no copy.
            for _ in range(count):
                fork_id = secrets.token_urlsafe(24)
                added = self._add(
                    session_key(principal, "explicit", fork_id), "explicit", principal
                )
                added.egress = session.egress
                forks.append((fork_id, added))
        except SessionError as exc:
            for _, added in forks:
                self._forget(added, "its fork was refused")
            raise SessionError(f"cannot fork {count} session(s): {exc}") from None
        name = f"{SNAPSHOT_REPOSITORY}:fork_{secrets.token_hex(16)}"
        try:
            labels = self._snapshot_labels(principal, name, "fork")
            await self._take(session, name, labels, passing=True)
            for _, added in forks:
                added.start_image = name
            started = await asyncio.gather(
                *(self._sandbox_of(added) for _, added in forks), return_exceptions=True
            )
        except BaseException:
            await asyncio.gather(*(self.end(a, "its fork failed") for _, a in forks))
            raise
        finally:
            # The forks run on their own copies now (or failed): the passing copy goes.
            with contextlib.suppress(EngineError):
                await asyncio.shield(self.engine.remove_snapshot(name))
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(self.end(a, "its fork failed") for _, a in forks))
            raise SessionError(f"could not fork the session: {failed[0]}")
        return [fork_id for fork_id, _ in forks]

    # --- sandboxes ----------------------------------------------------------------------

    def _spec(self, key: str) -> SandboxSpec:
        labels = {**self.instance.labels(), LABEL_SESSION: key}
        # A random suffix, so that a replacement never collides with its predecessor.
        name = f"pod_exec_mcp-{self.instance.id[:8]}-{key[:12]}-{secrets.token_hex(2)}"
        return sandbox_spec(self.settings, name, labels)

    async def _sandbox_of(self, session: Session) -> Sandbox:
        """The session's sandbox, started on first use (exactly once, however many ask).
        A sandbox that cannot be started ends the session: it must not hold a slot."""
        if session.sandbox is not None:
            return session.sandbox
        async with session.lock:
            if session.ended:
                raise SessionError("this session has ended; call create_session for a new one.")
            if session.sandbox is None:
                # A session from a snapshot starts from its image, never from the pool.
                image, session.start_image = session.start_image, None
                sandbox = await self.pool.take() if image is None else None
                if sandbox is not None:
                    # ops: audit
                    audit.sandbox_event("started", session.key, sandbox.name, "from the warm pool")
                else:
                    spec = self._spec(session.key)
                    if image is not None:
                        spec = replace(spec, image=image)
                    try:
                        sandbox = await self.engine.start(spec)
                    except EngineError as exc:
                        self._forget(session, "its sandbox failed to start")
                        raise SessionError(f"could not start a sandbox: {exc}") from None
                    except BaseException:
                        self._forget(session, "its sandbox failed to start")
                        raise
                    how = "new" if image is None else "from a snapshot"
                    audit.sandbox_event("started", session.key, sandbox.name, how)  # ops: audit
                self.engine.set_egress(sandbox, session.egress or self.egress)
                session.sandbox = sandbox
            return session.sandbox

    async def _recover(self, session: Session, broken: Sandbox, reason: str) -> str:
        """Replace a broken sandbox; returns the sentence that tells the agent what happened."""
        audit.sandbox_event("replaced", session.key, broken.name, reason)  # ops: audit
        async with session.lock:
            if session.sandbox is broken:
                session.sandbox = None
                await self.engine.remove(broken)
                log.warning("removed broken sandbox %s", broken.name)
        try:
            await self._sandbox_of(session)
        except SessionError as exc:
            await self.end(session, "its sandbox broke and could not be replaced")
            return (
                f"The sandbox broke ({reason}) and a new one could not be started ({exc}). "
                "This session has ended; start a new one."
            )
        return (
            f"The sandbox broke ({reason}). A fresh sandbox was started for this session; "
            "files and processes from before are lost. Run the command again if needed."
        )

    # --- ending -------------------------------------------------------------------------

    def _forget(self, session: Session, why: str) -> None:
        if self._live.get(session.key) is session:
            del self._live[session.key]
        if session.ended:
            return
        session.ended = True
        self._ended[session.key] = why
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)

    async def end(self, session: Session, why: str) -> None:
        """End a session, its jobs and its sandbox. Idempotent."""
        if session.ended:
            return
        self._forget(session, why)
        async with session.lock:
            if session.sandbox is not None:
                await self.engine.remove(session.sandbox)
                audit.sandbox_event("removed", session.key, session.sandbox.name, why)  # ops
                session.sandbox = None
        # The container is gone, so the jobs' processes are too; end their tasks.
        jobs, session.jobs = session.jobs, OrderedDict()
        for key, job in jobs.items():
            self._jobs.pop(key, None)
            if job.task is not None:
                job.task.cancel()
        await asyncio.gather(
            *(j.task for j in jobs.values() if j.task is not None), return_exceptions=True
        )

    async def end_key(self, key: str, why: str) -> None:
        session = self._live.get(key)
        if session is not None:
            await self.end(session, why)

    def _idle_limit(self, session: Session) -> float:
        if session.kind == "legacy":
            return min(self.settings.legacy_idle_timeout, self.settings.idle_timeout)
        return self.settings.idle_timeout

    async def reap_idle(self) -> int:
        """End every session unused for longer than its idle limit (idle_timeout, or
        legacy_idle_timeout for legacy MCP sessions); returns how many."""
        now = time.monotonic()
        idle = [
            s
            for s in self._live.values()
            if s.busy == 0 and s.last_used < now - self._idle_limit(s)
        ]
        await asyncio.gather(
            *(self.end(s, f"idle for over {describe_seconds(self._idle_limit(s))}") for s in idle)
        )
        return len(idle)

    async def _reap_forever(self) -> None:
        shortest = min(self.settings.idle_timeout, self.settings.legacy_idle_timeout)
        period = min(max(shortest / 4, 0.5), 30.0)
        while True:
            await asyncio.sleep(period)
            try:
                await self.reap_idle()
                await self.pool.drop_stale()
            except Exception:
                log.exception("reaping idle sandboxes failed")


def _command_result(result: RunResult, queue_wait: float) -> CommandResult:
    return CommandResult(
        output=result.output,
        retval=result.retval,
        truncated=result.truncated,
        timed_out=result.timed_out,
        duration=result.duration,
        queue_wait=queue_wait,
        output_file=result.output_file,
    )


# The path a file tool works on travels in the environment: no shell quoting involved.
PATH_ENV = "POD_EXEC_MCP_PATH"

# Exit statuses of the file scripts, and what each means for the agent.
_FILE_STATUS = {
    3: "does not exist",
    4: "is a directory",
    5: "could not be read or written",
    6: "is larger than the limit",
    7: "is not a regular file",
}

# Open the path once, then check and read that same descriptor: a path that flips between
# a file and a device or FIFO can never be checked as one and read as the other. The open
# is non-blocking (a FIFO without a writer cannot hold it), follows symlinks (they are the
# sandbox's own, as is everything they can reach), and the read stops one byte past the
# limit (a growing file cannot stream for ever). Perl, because a shell cannot fstat what
# it opened; perl-base is Essential in Debian, so every Debian-based image has it.
_READ_FILE = """
exec perl -e '
use Fcntl qw(O_RDONLY O_NONBLOCK O_NOCTTY S_ISREG S_ISDIR);
sysopen(my $f, $ENV{POD_EXEC_MCP_PATH}, O_RDONLY | O_NONBLOCK | O_NOCTTY)
  or do { print "$!"; exit(($!{ENOENT} || $!{ENOTDIR}) ? 3 : 5) };
my @st = stat($f) or do { print "$!"; exit 5 };
exit 4 if S_ISDIR($st[2]);
exit 7 unless S_ISREG($st[2]);
if ($st[7] > MAX_BYTES) { print $st[7]; exit 6 }
binmode STDOUT;
my $left = MAX_BYTES + 1;
while ($left > 0) {
  my $n = sysread($f, my $chunk, $left < 65536 ? $left : 65536);
  defined $n or do { print STDERR "$!"; exit 5 };
  last if $n == 0;
  print $chunk;
  $left -= $n;
}
'
"""
# What the shell says when perl is not there (the sandbox removed it).
_NOT_FOUND = 127

# Atomic: written beside the target, then renamed over it; the executable bit is kept.
_WRITE_FILE = """
p=$POD_EXEC_MCP_PATH
[ -d "$p" ] && exit 4
d=$(dirname -- "$p")
mkdir -p -- "$d" || exit 5
t="$d/.pod_exec_mcp_write.$$"
if cat > "$t"; then
  if [ -x "$p" ]; then chmod +x "$t"; fi
  mv -f -- "$t" "$p" || { rm -f -- "$t"; exit 5; }
  case "$p" in /*) printf '%s' "$p" ;; *) printf '%s/%s' "$PWD" "$p" ;; esac
else
  rm -f -- "$t"; exit 5
fi
"""


def _check_path(path: str) -> None:
    if not path or "\x00" in path:
        raise SessionError("path must be a non-empty file path without NUL bytes.")


def _raise_for_file_status(result: RunResult, path: str, limit: int) -> None:
    if result.timed_out:
        raise SessionError(f"{path}: the file operation timed out ({result.kill_note}).")
    if result.retval == CWD_GONE:
        raise SessionError(
            f"{path} is relative to the shell's working directory {result.output.strip()}, "
            "which is gone: give an absolute path, or cd to a directory that exists."
        )
    what = _FILE_STATUS.get(result.retval)
    if result.retval == 6:
        raise SessionError(
            f"{path} is {result.output.strip()} bytes, over the {limit}-byte limit of the "
            "file tools; look at it in pieces with shell_exec (head, tail, sed -n, rg)."
        )
    if what is not None:
        detail = f" ({result.output.strip()})" if result.output.strip() else ""
        raise SessionError(f"{path} {what}{detail}.")
    if result.retval != 0:
        raise SessionError(
            f"{path}: the file operation failed with status {result.retval}: "
            f"{result.output.strip()}"
        )
