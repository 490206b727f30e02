"""Host side of the persistent in-sandbox exec agent (protocol: docs/agent-protocol.md).

One `AgentChannel` is one `podman exec -i CTR /.pod_exec_mcp/agent serve` process; many
commands run over it at once. Pure stdlib asyncio, no global state: every channel owns its
subprocess, its reader task and its heartbeat task.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pod_exec_mcp.agent_streams import STREAM_FRAMES, StreamHandler, StreamMux

PROTOCOL_VERSION = 1
# Where sandboxes get the agent: its image mounted read-only (docs/agent-protocol.md).
DEFAULT_AGENT_IMAGE = "pod_exec_mcp_agent"
AGENT_DIR = "/.pod_exec_mcp"
AGENT_PATH = f"{AGENT_DIR}/agent"
HEADER = struct.Struct(">BBHII")  # type, flags, reserved, id, payload length
MAX_PAYLOAD = 1024 * 1024

# Frame types (docs/agent-protocol.md).
T_HELLO, T_RUN, T_STDIN, T_STDIN_END, T_STOP, T_PING, T_SHUTDOWN = range(1, 8)
T_HELLO_OK, T_STARTED, T_OUTPUT, T_EXIT, T_ERROR, T_PONG, T_BYE = range(0x81, 0x88)
F_STDIN_FOLLOWS = 1
X_STOPPED, X_ALL_KILLED, X_SPILLED, X_DEADLINE, X_SPILL_FAILED, X_SPILL_CUT = 1, 2, 4, 8, 16, 32
FLD_COMMAND, FLD_CWD, FLD_ENV, FLD_SPILL_PATH, FLD_SPILL_MAX = 1, 2, 3, 4, 5
ERROR_NAMES = {
    1: "bad frame",
    2: "bad version",
    3: "unknown id",
    4: "duplicate id",
    5: "start failed",
    6: "unsupported",
    7: "limit",
    8: "internal",
}

# The agent's own deadline trails the host's, so that the host's STOP normally wins and
# the agent's only fires if the host side stalls.
AGENT_DEADLINE_SLACK = 2.0
# After a STOP the agent reports within grace + 10 s of SIGKILL rounds; allow for that.
STOP_REPORT_SLACK = 20.0
# A healthy supervisor reports within moments of its grace; one silent this much longer
# was most likely stopped (SIGSTOP) from inside, as may be the agent: the caller's
# take-over then kills the tree by a path the sandbox cannot stop. Sooner, if the caller
# sees the supervisor or the agent stopped (checked this often while the stop runs).
TAKE_OVER_AFTER = 2.0
STUCK_CHECK_EVERY = 0.5
STDERR_TAIL = 4096


def mount_arguments(agent_volume: str) -> list[str]:
    """`podman run` arguments that give a sandbox the agent, read-only, at AGENT_PATH,
    from a volume holding the agent image's files (podman_engine.agent_volume).

    A volume, not `--mount type=image`: Podman 4.3 refuses an image mount in a
    user-namespaced container (idmap), and gVisor sees it empty; a read-only named volume
    works in both, rootless and through remote Podman alike."""
    return ["--volume", f"{agent_volume}:{AGENT_DIR}:ro"]


def init_command(lifetime: float | None) -> list[str]:
    """The sandbox's command (instead of `--init ... sleep LIFETIME`): the agent as PID 1,
    reaping zombies and ending the container after `lifetime` seconds (None or 0: never)."""
    return [AGENT_PATH, "init", f"{max(0, int(lifetime or 0))}"]


def serve_argv(podman: Sequence[str], container: str) -> list[str]:
    """The argv for `AgentChannel.attach`; `podman` may carry options (e.g. --url)."""
    return [*podman, "exec", "-i", container, AGENT_PATH, "serve"]


def fd_serve_argv(
    podman: Sequence[str], container: str, child_fd: int, pass_fd: int | None = None
) -> list[str]:
    """The argv for `AgentChannel.attach(..., sock=...)`: the agent's channel is the socket
    `child_fd`, moved to fd 3 (by a small Python exec wrapper: POSIX shells cannot name fds
    above 9) and passed into the sandbox with `podman exec --preserve-fds`, so frames skip
    the copy through Podman's stdio relay. `pass_fd`, moved to fd 4, is the agent's end of
    the pass socket (splice). Local Podman only: a remote client cannot pass descriptors."""
    fds = [child_fd] if pass_fd is None else [child_fd, pass_fd]
    move = (
        "import fcntl, os, sys; fds = [int(f) for f in sys.argv[1].split(',')]; "
        # Out of the way first, so that moving one cannot overwrite another.
        "high = [fcntl.fcntl(f, fcntl.F_DUPFD, 100) for f in fds]; "
        "[os.close(f) for f in fds]; "
        "[(os.dup2(h, 3 + i, inheritable=True), os.close(h)) for i, h in enumerate(high)]; "
        "os.execvp(sys.argv[2], sys.argv[2:])"
    )
    serve = ["serve", "--fd", "3"] + ([] if pass_fd is None else ["--pass-fd", "4"])
    return [
        sys.executable, "-c", move, ",".join(map(str, fds)),
        *podman, "exec", f"--preserve-fds={len(fds)}", container, AGENT_PATH, *serve,
    ]  # fmt: skip


class AgentError(Exception):
    """The channel failed (agent died, protocol error). The sandbox itself may be fine."""


class AgentCommandError(AgentError):
    """The agent refused or could not start one command (e.g. fork failed: pids exhausted).

    The channel itself is still alive (`AgentChannel.alive`) and can run other commands.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} ({ERROR_NAMES.get(code, 'error')} {code})")
        self.code = code


@dataclass(frozen=True)
class AgentRun:
    status: int  # exit status as podman exec gives it (128+N for signal N)
    stopped: bool  # the tree was stopped (timeout or cancel)
    all_killed: bool  # after a stop: the subtree was verified empty
    survivors: int
    output_bytes: int
    spilled_to: str | None
    # The whole output was to be kept in a file, but creating or writing it failed (the
    # sandbox's disk full, or the path made unwritable from inside).
    spill_failed: bool = False
    # The file keeps only the head and the tail (the output passed its SPILL_MAX).
    spill_cut: bool = False
    # The agent did not report the stop in time, so the caller's take-over killed the tree.
    taken_over: bool = False


@dataclass(frozen=True)
class TakeOver:
    """What a take-over (see AgentChannel.run) did."""

    survivors: int  # processes still alive afterwards
    verified: bool  # the whole tree was walked; False: found by its exec id only


class TakeOverHooks(Protocol):
    """How the caller ends a command whose stop the agent does not report: each is given
    the command's supervisor pid in the container (0 if the agent never said it)."""

    async def stuck(self, supervisor_pid: int) -> bool:
        """Whether the supervisor or the agent is stopped now, as seen from outside."""
        ...

    async def take_over(self, supervisor_pid: int) -> TakeOver | None:
        """Kill the command's tree without the agent; None if it could not."""
        ...


@dataclass
class _Pending:
    on_output: Callable[[bytes], None]
    done: asyncio.Future[AgentRun]
    spill_path: str | None
    # An exception raised by on_output: the command is stopped and run() re-raises it.
    callback_error: BaseException | None = None
    output_bytes: int = 0
    started: asyncio.Future[tuple[int, int]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _frame(ftype: int, fid: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, 0, 0, fid, len(payload)) + payload


def _field(tag: int, value: bytes) -> bytes:
    return struct.pack(">BI", tag, len(value)) + value


def _ms(seconds: float) -> int:
    return max(0, min(int(seconds * 1000), 0xFFFFFFFF))


def encode_run(
    command: str,
    *,
    deadline: float,
    grace: float,
    env: Mapping[str, str] | None,
    has_stdin: bool,
    cwd: str | None,
    spill_path: str | None,
    spill_after: int,
    spill_max: int = 0,
) -> bytes:
    """The RUN payload: a 24-byte fixed part, then tagged fields."""
    flags = F_STDIN_FOLLOWS if has_stdin else 0
    spill = spill_after if spill_path else 0
    out = [struct.pack(">IIIIQ", _ms(deadline), _ms(grace), flags, 0, spill)]
    # surrogatepass: a lone surrogate from JSON reaches the shell as the bytes it names,
    # as it would through podman exec's argv, instead of failing here.
    out.append(_field(FLD_COMMAND, command.encode("utf-8", "surrogatepass")))
    if cwd is not None:
        out.append(_field(FLD_CWD, cwd.encode()))
    for name, value in (env or {}).items():
        if not name or "=" in name or "\0" in name + value:
            raise ValueError(f"invalid environment variable name or value: {name!r}")
        out.append(_field(FLD_ENV, f"{name}={value}".encode()))
    if spill:
        out.append(_field(FLD_SPILL_PATH, str(spill_path).encode()))
        if spill_max:
            out.append(_field(FLD_SPILL_MAX, str(spill_max).encode()))
    payload = b"".join(out)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("command, cwd and environment exceed the agent's 1 MiB frame limit")
    return payload


async def _done_within(
    done: asyncio.Future[AgentRun], timeout: float | None, stop: asyncio.Event | None
) -> AgentRun | None:
    """The command's result if it ends within `timeout` and before `stop` is set; else
    None. Never cancels `done`."""
    waiters: set[asyncio.Future[Any]] = {done}
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopping is not None:
        waiters.add(stopping)
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopping is not None:
            stopping.cancel()
    return done.result() if done.done() else None


class AgentChannel:
    """One long-lived agent in one sandbox; see docs/agent-protocol.md."""

    agent_pid: int  # in the container's pid namespace
    protocol_version: int

    def __init__(
        self, proc: asyncio.subprocess.Process, heartbeat_interval: float, heartbeat_timeout: float
    ) -> None:
        self._proc = proc
        self._interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._hello: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._bye = asyncio.Event()
        self._dead: str | None = None
        self._closed = False
        self._stderr = bytearray()
        self._tasks: list[asyncio.Task[None]] = []
        self.agent_pid = 0
        self.protocol_version = 0
        self._last_rx = asyncio.get_running_loop().time()
        # Multiplexed byte streams (the egress proxy's connections): agent_streams.py.
        self._mux = StreamMux(self._send, None)
        # Where frames come from and go to: the agent's stdio, or a passed-down socket.
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    async def attach(
        cls,
        argv: Sequence[str],
        *,
        handshake_timeout: float = 10.0,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 30.0,
        on_stream: StreamHandler | None = None,
        sock: socket.socket | None = None,
        child_sock: socket.socket | None = None,
        pass_sock: socket.socket | None = None,
        child_pass_sock: socket.socket | None = None,
    ) -> AgentChannel:
        """Start the agent (argv is the full command, e.g. [podman, exec, -i, CTR,
        /.pod_exec_mcp/agent, serve]), handshake; AgentError if it cannot.

        The agent stops every command and exits if no frame arrives for heartbeat_timeout
        seconds; this side sends a PING every heartbeat_interval seconds. `on_stream`
        serves each connection the agent accepts once `listen` was called.

        With `sock` and `child_sock` (a socketpair; argv from `fd_serve_argv`), frames go
        over `sock` instead of the agent's stdio; with `pass_sock` and `child_pass_sock`
        too, streams can be spliced (agent_streams.py). All are owned by the channel from
        here.
        """
        pipe = asyncio.subprocess.PIPE
        children = [s for s in (child_sock, child_pass_sock) if s is not None]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=pipe if sock is None else asyncio.subprocess.DEVNULL,
                stdout=pipe if sock is None else asyncio.subprocess.DEVNULL,
                stderr=pipe,
                limit=4 * MAX_PAYLOAD,
                pass_fds=[s.fileno() for s in children],
            )
        except OSError as exc:
            for own in (sock, pass_sock):
                if own is not None:
                    own.close()
            raise AgentError(f"cannot start the agent ({argv[0]}): {exc}") from exc
        finally:
            for child in children:
                child.close()  # the agent's ends now live in podman and the agent only
        chan = cls(proc, heartbeat_interval, heartbeat_timeout)
        if sock is not None:
            chan._reader, chan._writer = await asyncio.open_connection(
                sock=sock, limit=4 * MAX_PAYLOAD
            )
        else:
            assert proc.stdout is not None and proc.stdin is not None
            chan._reader, chan._writer = proc.stdout, proc.stdin
        chan._mux = StreamMux(chan._send, on_stream, pass_socket=pass_sock)
        chan._tasks = [
            asyncio.create_task(chan._read_frames()),
            asyncio.create_task(chan._read_stderr()),
        ]
        try:
            hello = struct.pack(">HHI", PROTOCOL_VERSION, PROTOCOL_VERSION, _ms(heartbeat_timeout))
            await chan._send(_frame(T_HELLO, 0, hello))
            version, pid = await asyncio.wait_for(asyncio.shield(chan._hello), handshake_timeout)
        except (AgentError, TimeoutError) as exc:
            why = str(exc) if isinstance(exc, AgentError) else "no answer to HELLO"
            await chan._abort()
            raise AgentError(f"the agent did not start: {why}{chan._stderr_note()}") from None
        except BaseException:
            await chan._abort()
            raise
        chan.agent_pid = pid
        chan.protocol_version = version
        chan._tasks.append(asyncio.create_task(chan._heartbeat()))
        return chan

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed and self._proc.returncode is None

    async def run(
        self,
        command: str,
        *,
        timeout: float | None,
        kill_grace: float,
        on_output: Callable[[bytes], None],
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        cwd: str | None = None,
        spill_path: str | None = None,
        spill_after: int = 0,
        spill_max: int = 0,
        stop: asyncio.Event | None = None,
        take_over: TakeOverHooks | None = None,
    ) -> AgentRun:
        """Run `/bin/sh -lc command`; on_output gets its merged output as it arrives.

        `timeout` None: no deadline (a background job). Setting `stop` stops the command's
        tree as a timeout would, and returns its result with stopped=True.

        On timeout: STOP with kill_grace, return with stopped=True. On CancelledError: STOP,
        wait for the stop to finish (shielded from a second cancel), re-raise. If the stop
        is not reported TAKE_OVER_AFTER seconds after the grace (the supervisor or the
        agent stopped from inside), `take_over` kills the tree and the result says so. AgentError if
        the channel dies mid-run; AgentCommandError if the agent cannot start the command.
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, not {timeout}")
        if not self.alive:
            raise AgentError(f"the agent channel is closed{self._why()}")
        payload = encode_run(
            command,
            deadline=timeout + AGENT_DEADLINE_SLACK if timeout is not None else 0,
            grace=kill_grace,
            env=env,
            has_stdin=stdin is not None,
            cwd=cwd,
            spill_path=spill_path,
            spill_after=spill_after,
            spill_max=spill_max,
        )
        rid = next(self._ids) % 0xFFFFFFFF + 1  # ids are u32 and never 0
        done: asyncio.Future[AgentRun] = asyncio.get_running_loop().create_future()
        pending = self._pending[rid] = _Pending(on_output, done, spill_path)
        try:
            frames = [_frame(T_RUN, rid, payload)]
            if stdin is not None:
                view = memoryview(stdin)
                frames += [
                    _frame(T_STDIN, rid, bytes(view[i : i + MAX_PAYLOAD]))
                    for i in range(0, len(stdin), MAX_PAYLOAD)
                ]
                frames.append(_frame(T_STDIN_END, rid))
            await self._send(b"".join(frames))
            try:
                finished = await _done_within(done, timeout, stop)
                result = (
                    finished
                    if finished is not None
                    else await self._stop(rid, done, kill_grace, take_over)
                )
            except asyncio.CancelledError:
                await self._stop_shielded(rid, done, kill_grace, take_over)
                raise
            if pending.callback_error is not None:
                raise pending.callback_error
            return result
        finally:
            self._pending.pop(rid, None)

    async def listen(self, address: str, port: int, timeout: float = 10.0) -> int:
        """Have the agent listen on address:port (loopback) in the sandbox and relay each
        connection as a stream to `on_stream`; returns the port. ConnectionError (with the
        agent's reason) if it cannot, e.g. an agent without stream support."""
        if not self.alive:
            raise AgentError(f"the agent channel is closed{self._why()}")
        rid = next(self._ids) % 0xFFFFFFFF + 1
        return await self._mux.listen(rid, address, port, timeout)

    async def close(self) -> None:
        """Ask the agent to stop everything and exit; then end the podman exec client.

        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._dead is None:
            with contextlib.suppress(AgentError, OSError):
                await self._send(_frame(T_SHUTDOWN, 0, struct.pack(">I", 2000)))
                await asyncio.wait_for(self._bye.wait(), 2.0 + STOP_REPORT_SLACK)
        await self._abort()

    async def abort(self) -> None:
        """End the channel now, without asking the agent to stop anything (the container
        is about to be removed, or the agent is already gone). Idempotent; never raises."""
        await self._abort()

    # ---- internals ----

    async def _stop(
        self,
        rid: int,
        done: asyncio.Future[AgentRun],
        grace: float,
        take_over: TakeOverHooks | None,
    ) -> AgentRun:
        if not done.done():
            with contextlib.suppress(AgentError):
                await self._send(_frame(T_STOP, rid, struct.pack(">I", _ms(grace))))
        pending = self._pending.get(rid)
        started = pending.started if pending is not None else None
        patience = grace + (TAKE_OVER_AFTER if take_over is not None else STOP_REPORT_SLACK)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + patience

        def supervisor_pid() -> int:
            # 0: the agent never took the RUN (the take-over then finds the command by its
            # exec id, if anything of it runs at all).
            ok = started is not None and started.done() and started.exception() is None
            return started.result()[0] if ok and started is not None else 0

        while (left := give_up - loop.time()) > 0:
            try:
                step = min(left, STUCK_CHECK_EVERY) if take_over is not None else left
                return await asyncio.wait_for(asyncio.shield(done), step)
            except TimeoutError:
                pass
            except AgentError:
                if take_over is None:
                    raise
                # The agent died under the stop (killed from inside, say): a supervisor
                # stopped from inside would never see it go, and its tree would live on.
                break
            if take_over is not None and await take_over.stuck(supervisor_pid()):
                break  # it will not report: no need to wait out the grace
        if take_over is not None:
            taken = await take_over.take_over(supervisor_pid())
            if done.done() and done.exception() is None:
                return done.result()  # the agent reported after all
            if taken is not None:
                return AgentRun(
                    status=128 + signal.SIGKILL,
                    stopped=True,
                    all_killed=taken.verified and taken.survivors == 0,
                    survivors=taken.survivors,
                    output_bytes=pending.output_bytes if pending is not None else 0,
                    spilled_to=None,
                    taken_over=True,
                )
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(done), STOP_REPORT_SLACK)
        raise AgentError("the agent did not report the stopped command")

    async def _stop_shielded(
        self,
        rid: int,
        done: asyncio.Future[AgentRun],
        grace: float,
        take_over: TakeOverHooks | None,
    ) -> None:
        stop = asyncio.ensure_future(self._stop(rid, done, grace, take_over))
        while not stop.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(stop)
        with contextlib.suppress(Exception):
            stop.result()

    async def _send(self, data: bytes, more: bytes | memoryview = b"") -> None:
        if self._dead is not None:
            raise AgentError(f"the agent channel is gone{self._why()}")
        stdin = self._writer
        assert stdin is not None
        try:
            stdin.write(data)
            if more:
                stdin.write(more)  # a stream's data, not copied into one frame first
            await stdin.drain()
        except (ConnectionError, OSError) as exc:
            self._fail(f"writing to the agent failed: {exc}")
            raise AgentError(f"the agent channel is gone{self._why()}") from None

    async def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(AgentError):
            await self._send(data)

    async def _heartbeat(self) -> None:
        """PING the agent; and if it answers nothing for heartbeat_timeout (e.g. it was
        SIGSTOPped from inside the sandbox), fail the channel so the caller re-attaches."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(AgentError):
            while self._dead is None:
                await asyncio.sleep(self._interval)
                if loop.time() - self._last_rx > self._heartbeat_timeout:
                    # Silent, or was this event loop blocked? Give the reader one more round
                    # to take in whatever is already waiting before giving up.
                    await self._send(_frame(T_PING, 0))
                    await asyncio.sleep(self._interval)
                if loop.time() - self._last_rx > self._heartbeat_timeout:
                    self._fail(f"the agent answered nothing for {self._heartbeat_timeout:g} s")
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
                    return
                await self._send(_frame(T_PING, 0))

    async def _read_frames(self) -> None:
        stdout = self._reader
        assert stdout is not None
        try:
            while True:
                header = await stdout.readexactly(HEADER.size)
                ftype, flags, reserved, fid, length = HEADER.unpack(header)
                if flags or reserved or length > MAX_PAYLOAD:
                    self._fail(f"malformed frame from the agent (type {ftype:#x})")
                    return
                payload = await stdout.readexactly(length)
                self._last_rx = asyncio.get_running_loop().time()
                self._dispatch(ftype, fid, payload)
        except asyncio.IncompleteReadError:
            await self._reap_briefly()
            self._fail(f"the agent exited (status {self._proc.returncode})")
        except Exception as exc:  # a bug here must fail the runs, not hang them
            self._fail(f"reading from the agent failed: {exc!r}")

    def _dispatch(self, ftype: int, fid: int, payload: bytes) -> None:
        if ftype in STREAM_FRAMES:
            self._mux.dispatch(ftype, fid, payload)
            return
        pending = self._pending.get(fid)
        if ftype == T_OUTPUT:
            if pending is not None:
                pending.output_bytes += len(payload)
            if pending is not None and pending.callback_error is None:
                try:
                    pending.on_output(payload)
                except Exception as exc:  # the caller's bug: stop its command, not the channel
                    pending.callback_error = exc
                    stop = _frame(T_STOP, fid, struct.pack(">I", 0))
                    self._tasks.append(asyncio.create_task(self._send_quietly(stop)))
        elif ftype == T_EXIT:
            status, flags, survivors, nbytes = struct.unpack(">iIIQ", payload[:20])
            if pending is not None and not pending.done.done():
                pending.done.set_result(
                    AgentRun(
                        status=status,
                        stopped=bool(flags & X_STOPPED),
                        all_killed=bool(flags & X_ALL_KILLED),
                        survivors=survivors,
                        output_bytes=nbytes,
                        spilled_to=pending.spill_path if flags & X_SPILLED else None,
                        spill_failed=bool(flags & X_SPILL_FAILED),
                        spill_cut=bool(flags & X_SPILL_CUT),
                    )
                )
        elif ftype == T_STARTED:
            if pending is not None and not pending.started.done():
                pending.started.set_result(struct.unpack(">II", payload[:8]))
        elif ftype == T_ERROR:
            code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 0
            message = payload[2:].decode(errors="replace")
            if fid != 0 and self._mux.error(fid, message):
                pass  # the answer to a LISTEN
            elif fid == 0:
                if not self._hello.done():
                    self._hello.set_exception(AgentError(message))
                else:
                    self._fail(f"the agent reported a channel error: {message}")
            elif pending is not None and not pending.done.done():
                pending.done.set_exception(AgentCommandError(code, message))
            # An ERROR for an id no longer pending (e.g. a STOP that crossed EXIT) is moot.
        elif ftype == T_HELLO_OK:
            version, _, pid = struct.unpack(">HHI", payload[:8])
            if not self._hello.done():
                self._hello.set_result((version, pid))
        elif ftype == T_BYE:
            self._bye.set()
        # PONG and frame types of later versions need no action.

    async def _read_stderr(self) -> None:
        stderr = self._proc.stderr
        assert stderr is not None
        while chunk := await stderr.read(65536):
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL]

    def _fail(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
        self._mux.fail(why)
        self._bye.set()
        error = AgentError(f"{why}{self._stderr_note()}")
        if not self._hello.done():
            self._hello.set_exception(error)
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.set_exception(error)

    def _why(self) -> str:
        return f": {self._dead}" if self._dead else ""

    def _stderr_note(self) -> str:
        text = self._stderr.decode(errors="replace").strip()
        return f"; agent stderr: {text[-500:]}" if text else ""

    async def _reap_briefly(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), 1.0)

    async def _abort(self) -> None:
        """End the podman exec client and every task; never raises."""
        if self._dead is None:
            self._dead = "closed"
        self._closed = True
        stdin = self._writer
        if stdin is not None:
            with contextlib.suppress(Exception):
                stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 5.0)
        await self._mux.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(BaseException):
                    await task
        self._fail("closed")


__all__ = [
    "AGENT_PATH",
    "DEFAULT_AGENT_IMAGE",
    "AgentChannel",
    "AgentCommandError",
    "AgentError",
    "AgentRun",
    "fd_serve_argv",
    "init_command",
    "mount_arguments",
    "serve_argv",
]
