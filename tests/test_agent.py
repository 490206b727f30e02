"""The in-sandbox exec agent (image/agent/) and its client (pod_exec_mcp.agent_channel).

Against real Podman and the real images: pod_exec_mcp_base (POD_EXEC_MCP_IMAGE) and
pod_exec_mcp_agent (POD_EXEC_MCP_AGENT_IMAGE), both built by `pod_exec_mcp_build`.
Sandboxes are started here directly with podman, the way the server is to start them:
the agent image mounted read-only, `agent init` as PID 1, no `--init`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import statistics
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import FIGURES, IMAGE, podman, wait_until

from pod_exec_mcp.agent_channel import (
    AGENT_PATH as AGENT,
)
from pod_exec_mcp.agent_channel import (
    DEFAULT_AGENT_IMAGE,
    HEADER,
    T_BYE,
    T_ERROR,
    T_HELLO_OK,
    T_PONG,
    T_STARTED,
    AgentChannel,
    AgentCommandError,
    AgentError,
    AgentRun,
    encode_run,
    init_command,
    mount_arguments,
    serve_argv,
)
from pod_exec_mcp.podman import Podman
from pod_exec_mcp.podman_engine import agent_volume

AGENT_IMAGE = os.environ.get("POD_EXEC_MCP_AGENT_IMAGE", DEFAULT_AGENT_IMAGE)
LABEL = "io.pod_exec_mcp.test.agent"
RUN_ID = uuid.uuid4().hex[:10]


DISTROLESS = """\
ARG BASE_IMAGE=docker.io/library/debian:trixie-slim
FROM ${BASE_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends busybox-static
FROM scratch
COPY --from=build /bin/busybox /bin/sh
"""


STRICT = [
    "--cap-drop=ALL", "--read-only", "--network=none",
    "--tmpfs", "/workspace:rw,size=64m,mode=1777", "--tmpfs", "/tmp:rw,size=64m,mode=1777",
]  # fmt: skip


def run_arguments(
    name: str,
    volume: str,
    pids_limit: int,
    lifetime: int = 3600,
    image: str = IMAGE,
    extra: Sequence[str] = (),
) -> list[str]:
    """`podman run` arguments for a sandbox with the agent (as the server uses them)."""
    return [
        "run", "--detach", "--rm", "--name", name, "--label", f"{LABEL}={RUN_ID}",
        "--pids-limit", str(pids_limit), "--memory", "1g",
        "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096",
        "--security-opt", "no-new-privileges",
        *mount_arguments(volume), *extra, image, *init_command(lifetime),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def agent_vol() -> str:
    """The volume holding the agent, made from its image as the server makes it."""
    rlimits = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
    return asyncio.run(agent_volume(Podman(), AGENT_IMAGE, rlimits))


@pytest.fixture(scope="module")
def new_sandbox(agent_vol: str) -> Iterator[Callable[..., str]]:
    """Start sandboxes on demand; every one is removed at teardown."""
    names: list[str] = []

    def start(
        pids_limit: int = 512, lifetime: int = 3600, image: str = IMAGE, extra: Sequence[str] = ()
    ) -> str:
        name = f"pem-agent-test-{RUN_ID}-{len(names)}"
        names.append(name)
        podman(*run_arguments(name, agent_vol, pids_limit, lifetime, image, extra))
        return name

    yield start
    if names:
        podman("rm", "--force", "--ignore", "--time", "0", *names, check=False)
    left = podman("ps", "-aq", "--filter", f"label={LABEL}={RUN_ID}").stdout.split()
    assert not left, f"containers left behind: {left}"


@pytest.fixture(scope="module")
def sandbox(new_sandbox: Callable[..., str]) -> str:
    return new_sandbox()


def attach_argv(name: str) -> list[str]:
    return serve_argv(["podman"], name)


@contextlib.asynccontextmanager
async def channel(
    name: str, argv: list[str] | None = None, **kwargs: Any
) -> AsyncIterator[AgentChannel]:
    chan = await AgentChannel.attach(argv or attach_argv(name), **kwargs)
    try:
        yield chan
    finally:
        await chan.close()


async def run(
    chan: AgentChannel, command: str, timeout: float = 30, **kwargs: object
) -> tuple[AgentRun, bytes]:
    out = bytearray()
    result = await chan.run(
        command, timeout=timeout, kill_grace=kwargs.pop("kill_grace", 1.0),  # type: ignore[arg-type]
        on_output=out.extend, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return result, bytes(out)


def processes(name: str) -> str:
    """`ps` inside the sandbox, through podman exec (independent of the agent)."""
    return podman("exec", name, "ps", "-eo", "pid,ppid,user,stat,args", check=False).stdout


def running(name: str) -> bool:
    done = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
    return done.stdout.strip() == "true"


async def test_output_status_order_stdin_env_cwd(sandbox: str) -> None:
    async with channel(sandbox) as chan:
        assert chan.alive and chan.agent_pid > 1
        result, out = await run(chan, "echo one; echo two >&2; echo three; pwd; exit 7")
        assert out == b"one\ntwo\nthree\n/workspace\n"
        assert (result.status, result.stopped, result.output_bytes) == (7, False, len(out))
        result, _ = await run(chan, "kill -TERM $$")
        assert result.status == 128 + signal.SIGTERM
        # Login shell, own session: the shell's pid is its session and group id.
        _, out = await run(
            chan, "ps -o sid=,pgid= -p $$; echo $$; echo $0; test -t 0 || echo no-tty"
        )
        sid, pgid, pid, arg0, tty = out.decode().split()
        assert sid == pgid == pid and arg0 == "/bin/sh" and tty == "no-tty"
        # stdin: empty by default, bytes when given (2.5 MiB, more than one frame).
        _, out = await run(chan, "wc -c")
        assert out.strip() == b"0"
        data = os.urandom(2 * 1024 * 1024 + 512 * 1024)
        _, out = await run(chan, "sha256sum", stdin=data)
        assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        # Extra env on top of podman exec's; cwd when given.
        _, out = await run(chan, 'echo "$EXTRA|$HOME|$PATH"', env={"EXTRA": "a b=c"})
        extra, home, path = out.decode().strip().split("|")
        assert extra == "a b=c" and home == "/root" and "/usr/bin" in path
        _, out = await run(chan, "pwd", cwd="/tmp")
        assert out == b"/tmp\n"
        result, out = await run(chan, "pwd", cwd="/no/such/dir")
        assert result.status == 127 and b"/no/such/dir" in out
        # Signal dispositions are reset even though the agent ignores SIGPIPE.
        _, out = await run(chan, "grep -E 'SigIgn|SigBlk' /proc/self/status")
        assert sorted(out.split()) == sorted([b"SigIgn:", b"0" * 16, b"SigBlk:", b"0" * 16]), out


CONTEXT = (
    "env | grep -v -e '^_=' | sort; id; cat /proc/self/cgroup; pwd; umask; ulimit -a; "
    "grep -E '^(Cap|Seccomp|NoNewPrivs|Uid|Gid|Groups)' /proc/self/status"
)


async def test_same_context_as_podman_exec(sandbox: str) -> None:
    """User, capabilities, seccomp, no-new-privileges, cgroup, env, cwd, limits: as a
    `podman exec CTR /bin/sh -lc` has them."""
    async with channel(sandbox) as chan:
        result, out = await run(chan, CONTEXT)
    raw = podman("exec", sandbox, "/bin/sh", "-lc", CONTEXT).stdout
    assert result.status == 0 and out.decode() == raw
    assert "NoNewPrivs:\t1" in raw and "Seccomp:\t2" in raw


async def test_eight_concurrent_runs(sandbox: str) -> None:
    async with channel(sandbox) as chan:
        commands = [f"sleep 0.$((RANDOM % 5)); echo run {i}; exit {i}" for i in range(8)]
        results = await asyncio.gather(*(run(chan, c) for c in commands))
        for i, (result, out) in enumerate(results):
            assert result.status == i and out == f"run {i}\n".encode()


ESCAPES = {
    "env-scrubbed-setsid": 'env -u SOMEVAR setsid sh -c \'trap "" TERM; '
    "while :; do sleep 1; done' escape_{m} &",
    "setpriv-uid-change": "setsid setpriv --reuid=65534 --regid=65534 --clear-groups "
    "sh -c 'trap \"\" TERM; while :; do sleep 1; done' escape_{m} &",
    "non-dumpable": 'setsid perl -e \'$| = 1; $0 = "escape_{m}"; $SIG{{TERM}} = "IGNORE"; '
    'syscall(157, 4, 0, 0, 0, 0); print "dumpable=", syscall(157, 3, 0, 0, 0, 0), "\\n"; '
    "sleep 1 while 1' &",
}


@pytest.mark.parametrize("escape", sorted(ESCAPES))
async def test_timeout_kills_escapes(new_sandbox: Callable[..., str], escape: str) -> None:
    name = new_sandbox()
    marker = uuid.uuid4().hex[:8]
    command = ESCAPES[escape].format(m=marker) + " sleep 0.5; echo started; sleep 300"
    async with channel(name) as chan:
        start = time.monotonic()
        result, out = await run(chan, command, timeout=2, kill_grace=0.5)
        FIGURES.setdefault("agent: deadline to result, TERM ignored, grace 0.5 s (ms)", []).append(
            round((time.monotonic() - start - 2) * 1000)
        )
        assert b"started" in out
        if escape == "non-dumpable":
            assert b"dumpable=0" in out
        assert result.stopped and result.all_killed and result.survivors == 0
        assert result.status == 128 + signal.SIGTERM
        ps = processes(name)
        assert marker not in ps and "sleep" not in ps, ps
        FIGURES.setdefault("agent: timeout kills verified empty", []).append(escape)


@pytest.mark.slow
async def test_survivors_are_reported_not_hidden(new_sandbox: Callable[..., str]) -> None:
    """A process the supervisor may not signal (another uid, no CAP_KILL) survives: the
    result must say so, never "all killed"."""
    name = new_sandbox(extra=["--cap-drop=KILL"])
    marker = uuid.uuid4().hex[:8]
    command = (
        "setsid setpriv --reuid=65534 --regid=65534 --clear-groups "
        f"sh -c 'sleep 1000; :' survivor_{marker} & sleep 300"
    )
    async with channel(name) as chan:
        result, _ = await run(chan, command, timeout=1, kill_grace=0.2)
    assert result.stopped and not result.all_killed and result.survivors >= 1, result
    assert marker in processes(name)


async def test_deadline_to_result_and_cancel(sandbox: str) -> None:
    async with channel(sandbox) as chan:
        samples = []
        for _ in range(5):
            start = time.monotonic()
            result, _ = await run(chan, "sleep 100", timeout=0.5, kill_grace=1)
            samples.append(time.monotonic() - start - 0.5)
            assert result.stopped and result.all_killed
        FIGURES["agent: deadline to result, sleep (ms, median of 5)"] = round(
            statistics.median(samples) * 1000, 1
        )
        # A cancelled run stops its tree before CancelledError reaches the caller.
        marker = uuid.uuid4().hex[:8]
        task = asyncio.create_task(run(chan, f"sh -c 'sleep 300; :' cancel_{marker} & wait"))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert marker not in processes(sandbox)
        assert (await run(chan, "echo ok"))[1] == b"ok\n"


async def test_background_job_outlives_the_call(sandbox: str) -> None:
    async with channel(sandbox) as chan:
        # The & child writes 2000 lines after the call returned: if the pipe were closed it
        # would die of SIGPIPE before touching the file.
        command = (
            "rm -f /tmp/after; (sleep 1; echo tick; i=0; while [ $i -lt 2000 ]; do "
            "echo line $i; i=$((i+1)); done; touch /tmp/after) & echo returned"
        )
        result, out = await run(chan, command)
        assert (result.status, out) == (0, b"returned\n")
        assert (await run(chan, "test -e /tmp/after"))[0].status != 0

        async def appeared() -> bool:
            for _ in range(100):
                if (await run(chan, "test -e /tmp/after"))[0].status == 0:
                    return True
                await asyncio.sleep(0.1)
            return False

        assert await appeared()

        async def supervisors_left() -> int:
            out = (await run(chan, "ps -e -o comm= | grep -c pem-supervisor"))[1]
            return int(out) - 1  # the one running this ps

        # A server started with & logs each request to the drained pipe and keeps serving
        # (as `python3 -m http.server &` would; the image has no python).
        port = random.randint(20000, 30000)
        listening = f"nc -lk 127.0.0.1 {port} & sleep 0.3"
        assert (await run(chan, listening))[0].status == 0
        for i in range(3):
            result, _ = await run(chan, f"echo request{i} | nc -N 127.0.0.1 {port}")
            assert result.status == 0, i
        await run(chan, f"pkill -f 'nc -lk 127.0.0.1 {port}'")

        # Once the background child is done, its supervisor has nothing left and exits.
        for _ in range(100):
            if await supervisors_left() == 0:
                break
            await asyncio.sleep(0.1)
        assert await supervisors_left() == 0


async def test_zombie_storm_is_stopped_and_the_agent_stays(
    new_sandbox: Callable[..., str],
) -> None:
    name = new_sandbox(pids_limit=128)
    storm = (
        "perl -e 'for (1..1100){my $p=fork(); last unless defined $p; exit 0 if $p==0} sleep 100'"
    )
    async with channel(name) as chan:
        await run(chan, "echo keep > /workspace/keep")
        result, _ = await run(chan, storm, timeout=3, kill_grace=0.5)
        assert result.stopped and result.all_killed
        assert chan.alive
        result, out = await run(chan, "cat /workspace/keep; ps -e --no-headers | wc -l")
        keep, count = out.split()
        assert keep == b"keep" and int(count) < 10, out
        assert "perl" not in processes(name)


async def test_fork_failure_is_an_error_and_the_agent_stays(
    new_sandbox: Callable[..., str],
) -> None:
    name = new_sandbox(pids_limit=64)
    # It keeps taking every pid that frees up, so the shortage lasts until it is stopped.
    hog = (
        "perl -e 'while (1) { my $p = fork(); "
        "if (!defined $p) { select(undef, undef, undef, 0.01); next } "
        "if (!$p) { sleep 1000; exit } }'"
    )
    async with channel(name) as chan:
        hog_task = asyncio.create_task(run(chan, hog, timeout=120, kill_grace=0.2))
        refused: AgentCommandError | None = None
        for _ in range(100):
            try:
                await run(chan, "true")
            except AgentCommandError as exc:
                refused = exc
                break
            await asyncio.sleep(0.1)
        assert refused is not None and "cannot start the command" in str(refused)
        assert chan.alive
        hog_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hog_task
        result, out = await run(chan, "echo back")
        assert (result.status, out) == (0, b"back\n")


async def test_killing_everything_inside_leaves_the_sandbox(
    new_sandbox: Callable[..., str],
) -> None:
    name = new_sandbox()
    async with channel(name) as chan:
        await run(chan, "echo kept > /workspace/kept")
        # The old design's lifetime bound was a plain `sleep` as PID 1; init now ignores all
        # of these, and the agent and its supervisors ignore TERM, so this call returns.
        result, out = await run(chan, "pkill sleep; kill 1; kill -9 1; kill -TERM -1; echo $?")
        assert (result.status, out) == (0, b"0\n")
        assert chan.alive
    assert running(name)
    # The agent killed from inside: its supervisors stop their trees (control pipe EOF).
    marker = uuid.uuid4().hex[:8]
    with pytest.raises(AgentError):
        async with channel(name) as chan:
            await run(
                chan,
                f"sh -c 'sleep 300; :' orphan_{marker} & sleep 0.2; kill -9 {chan.agent_pid}; wait",
            )
    assert await asyncio.to_thread(wait_until, lambda: marker not in processes(name), 30)
    with pytest.raises(AgentError):
        async with channel(name) as chan:
            await run(chan, "kill -9 -1; sleep 5")
    assert running(name)
    async with channel(name) as chan:
        result, out = await run(chan, "cat /workspace/kept")
        assert (result.status, out) == (0, b"kept\n")


async def test_host_gone_stops_commands(sandbox: str) -> None:
    # The podman exec client dies: the agent's stdin reaches EOF (or the heartbeat lapses).
    marker = uuid.uuid4().hex[:8]
    chan = await AgentChannel.attach(
        attach_argv(sandbox), heartbeat_interval=1, heartbeat_timeout=5
    )
    try:
        task = asyncio.create_task(run(chan, f"sh -c 'sleep 300; :' gone_{marker} & wait"))
        assert await asyncio.to_thread(wait_until, lambda: marker in processes(sandbox), 20)
        os.kill(chan._proc.pid, signal.SIGKILL)
        with pytest.raises(AgentError):
            await task
        assert await asyncio.to_thread(wait_until, lambda: marker not in processes(sandbox), 30)
    finally:
        await chan.close()


def test_heartbeat_stops_commands_when_the_host_hangs(sandbox: str) -> None:
    """The podman exec client is frozen (SIGSTOP): stdin stays open but no PING arrives."""
    marker = uuid.uuid4().hex[:8]
    hello = HEADER.pack(1, 0, 0, 0, 8) + struct.pack(">HHI", 1, 1, 2000)
    payload = encode_run(
        f"sh -c 'sleep 300; :' hb_{marker} & wait", deadline=0, grace=0.5, env=None,
        has_stdin=False, cwd=None, spill_path=None, spill_after=0,
    )  # fmt: skip
    run_frame = HEADER.pack(2, 0, 0, 1, len(payload)) + payload
    proc = subprocess.Popen(attach_argv(sandbox), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(hello + run_frame)
        proc.stdin.flush()
        assert wait_until(lambda: marker in processes(sandbox), 20)
        os.kill(proc.pid, signal.SIGSTOP)
        assert wait_until(lambda: marker not in processes(sandbox), 30)
    finally:
        proc.kill()
        proc.wait()


async def test_close_stops_background_children(sandbox: str) -> None:
    marker = uuid.uuid4().hex[:8]
    async with channel(sandbox) as chan:
        result, _ = await run(chan, f"sh -c 'sleep 300; :' bg_{marker} >/dev/null 2>&1 &")
        assert result.status == 0 and marker in processes(sandbox)
    assert not chan.alive
    assert marker not in processes(sandbox)
    await chan.close()  # idempotent


async def test_output_callback_error_stops_only_its_command(sandbox: str) -> None:
    def broken(_: bytes) -> None:
        raise RuntimeError("the caller's bug")

    async with channel(sandbox) as chan:
        with pytest.raises(RuntimeError, match="the caller's bug"):
            await chan.run("echo x; sleep 300", timeout=60, kill_grace=0.2, on_output=broken)
        assert chan.alive and (await run(chan, "echo ok"))[1] == b"ok\n"


def test_unread_output_keeps_the_agent_bounded(sandbox: str) -> None:
    """The host stops reading: the agent stops reading the pipe; its memory stays bounded."""
    hello = HEADER.pack(1, 0, 0, 0, 8) + struct.pack(">HHI", 1, 1, 0)
    command = b"yes 0123456789abcdefghijklmnopqrstuvwxyz"
    payload = struct.pack(">IIIIQ", 60_000, 100, 0, 0, 0) + struct.pack(">BI", 1, len(command))
    run_frame = HEADER.pack(2, 0, 0, 1, len(payload) + len(command)) + payload + command
    proc = subprocess.Popen(attach_argv(sandbox), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(hello + run_frame)
        proc.stdin.flush()
        header = proc.stdout.read(12)
        ftype, _, _, _, length = HEADER.unpack(header)
        agent_pid = struct.unpack(">HHI", proc.stdout.read(length)[:8])[2]
        assert ftype == T_HELLO_OK

        def rss_kb() -> int:
            status = podman("exec", sandbox, "cat", f"/proc/{agent_pid}/status").stdout
            (line,) = [x for x in status.splitlines() if x.startswith("VmRSS:")]
            return int(line.split()[1])

        samples = []
        for _ in range(5):  # `yes` would write gigabytes meanwhile if it were not blocked
            time.sleep(0.5)
            samples.append(rss_kb())
        FIGURES["agent: RSS while the host reads nothing (kB)"] = samples
        assert max(samples) < 16 * 1024, samples
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: "yes 0123" not in processes(sandbox), 30)


async def test_a_frozen_agent_fails_the_channel(sandbox: str) -> None:
    """`kill -STOP` on the agent from inside: the host notices by the missing PONGs."""
    chan = await AgentChannel.attach(
        attach_argv(sandbox), heartbeat_interval=0.5, heartbeat_timeout=3
    )
    pid = chan.agent_pid
    try:
        with pytest.raises(AgentError, match="answered nothing"):
            await run(chan, f"kill -STOP {pid}; sleep 300", timeout=120)
        assert not chan.alive
    finally:
        await chan.close()
        podman("exec", sandbox, "kill", "-CONT", str(pid), check=False)
    # Once continued it sees its stdin closed, stops its commands and exits.
    wait = f"for i in $(seq 300); do test -d /proc/{pid} || exit 0; sleep 0.1; done; exit 1"
    gone = await asyncio.to_thread(podman, "exec", sandbox, "sh", "-c", wait, check=False)
    assert gone.returncode == 0


async def test_spill_holds_every_byte(sandbox: str) -> None:
    async with channel(sandbox) as chan:
        path = f"/tmp/spill-{uuid.uuid4().hex[:6]}/deep/out.txt"
        command = "i=0; while [ $i -lt 30000 ]; do echo line $i; i=$((i+1)); done"
        result, out = await run(chan, command, spill_path=path, spill_after=100_000)
        assert result.spilled_to == path and result.output_bytes == len(out) > 100_000
        _, digest = await run(chan, f"sha256sum {path}")
        assert digest.split()[0].decode() == hashlib.sha256(out).hexdigest()
        result, _ = await run(chan, "echo small", spill_path=path + "2", spill_after=100_000)
        assert result.spilled_to is None
        assert (await run(chan, f"test -e {path}2"))[0].status != 0


async def test_ten_megabytes_arrive_intact(sandbox: str) -> None:
    async with channel(sandbox) as chan:
        size = 10 * 1024 * 1024
        expected = (b"0123456789abcdef\n" * (size // 17 + 1))[:size]
        samples = []
        for _ in range(3):
            start = time.monotonic()
            result, out = await run(chan, f"yes 0123456789abcdef | head -c {size}")
            samples.append(time.monotonic() - start)
            assert result.status == 0 and result.output_bytes == size and out == expected
        FIGURES["agent: 10 MB output (ms, median of 3)"] = round(statistics.median(samples) * 1000)


def test_malformed_input_gets_errors_not_a_crash(sandbox: str) -> None:
    hello = HEADER.pack(1, 0, 0, 0, 8) + struct.pack(">HHI", 1, 1, 0)
    bad_run = HEADER.pack(2, 0, 0, 5, 3) + b"abc"
    unknown = HEADER.pack(0x42, 0, 0, 6, 0)
    ping = HEADER.pack(6, 0, 0, 9, 2) + b"hi"
    garbage = b"\xff" * 12
    done = subprocess.run(
        attach_argv(sandbox),
        input=hello + bad_run + unknown + ping + garbage,
        capture_output=True,
        timeout=60,
    )
    frames, data = [], done.stdout
    while data:
        ftype, _, _, fid, length = HEADER.unpack(data[:12])
        frames.append((ftype, fid, data[12 : 12 + length]))
        data = data[12 + length :]
    assert [(t, i) for t, i, _ in frames] == [
        (T_HELLO_OK, 0), (T_ERROR, 5), (T_ERROR, 6), (T_PONG, 9), (T_ERROR, 0),
    ]  # fmt: skip
    assert frames[3][2] == b"hi"
    assert b"malformed frame header" in frames[4][2]
    # A version the agent does not speak is refused, and the agent exits.
    done = subprocess.run(
        attach_argv(sandbox),
        input=HEADER.pack(1, 0, 0, 0, 8) + struct.pack(">HHI", 7, 9, 0),
        capture_output=True,
        timeout=60,
    )
    assert done.stdout[0] == T_ERROR and b"protocol version 1" in done.stdout


@pytest.mark.slow
async def test_works_in_an_image_with_nothing_but_a_shell(
    new_sandbox: Callable[..., str], tmp_path: Path
) -> None:
    """Distroless-like: a scratch image whose only file is a static busybox as /bin/sh."""
    (tmp_path / "Containerfile").write_text(DISTROLESS)
    image = f"localhost/pod_exec_mcp_test_shell_only_{RUN_ID}"
    try:
        podman("build", "-q", "-t", image, str(tmp_path))
        name = new_sandbox(image=image)
        async with channel(name) as chan:
            result, out = await run(chan, "echo $0; ls /")
            assert (result.status, out) == (0, b"/bin/sh\nbin\ndev\netc\nproc\nrun\nsys\n")
            result, _ = await run(chan, "sleep 100 & sleep 100", timeout=1, kill_grace=0.2)
            assert result.stopped and result.all_killed
        podman("rm", "--force", "--time", "0", name)
    finally:
        podman("rmi", "--ignore", "--force", image, check=False)


async def test_strict_sandbox(new_sandbox: Callable[..., str]) -> None:
    """The server's strict mode: no capabilities, read-only root, tmpfs work dirs."""
    name = new_sandbox(extra=STRICT)
    marker = uuid.uuid4().hex[:8]
    async with channel(name) as chan:
        result, out = await run(chan, "echo hi > /workspace/f && cat /workspace/f; touch /x")
        assert result.status == 1 and out.startswith(b"hi\n") and b"Read-only" in out
        command = ESCAPES["env-scrubbed-setsid"].format(m=marker) + " sleep 300"
        result, _ = await run(chan, command, timeout=1, kill_grace=0.3)
        assert result.stopped and result.all_killed and marker not in processes(name)
        path = "/tmp/spill/out.txt"
        result, out = await run(chan, "seq 1 50000", spill_path=path, spill_after=1000)
        assert result.spilled_to == path
        assert (await run(chan, f"cat {path}"))[1] == out


@pytest.fixture
def remote_sandbox(tmp_path: Path, agent_vol: str) -> Iterator[tuple[list[str], str]]:
    """A sandbox started through a Podman API socket, as with CONTAINER_HOST."""
    sock = tmp_path / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    remote = ["podman", "--url", f"unix://{sock}"]
    name = f"pem-agent-test-{RUN_ID}-remote"
    try:
        assert wait_until(sock.exists, 30)
        subprocess.run(
            [*remote, *run_arguments(name, agent_vol, 256)], check=True, capture_output=True
        )
        yield remote, name
    finally:
        podman("rm", "--force", "--ignore", "--time", "0", name, check=False)
        service.terminate()
        service.wait(30)


@pytest.mark.slow
async def test_remote_podman(remote_sandbox: tuple[list[str], str]) -> None:
    remote, name = remote_sandbox
    async with channel(name, argv=serve_argv(remote, name)) as chan:
        result, out = await run(chan, "echo remote; pwd")
        assert (result.status, out) == (0, b"remote\n/workspace\n")
        # Host gone through the API socket: the agent still sees its stdin close.
        marker = uuid.uuid4().hex[:8]
        task = asyncio.create_task(run(chan, f"sh -c 'sleep 300; :' remote_{marker} & wait"))
        assert await asyncio.to_thread(wait_until, lambda: marker in processes(name), 20)
        os.kill(chan._proc.pid, signal.SIGKILL)
        with pytest.raises(AgentError):
            await task
        assert await asyncio.to_thread(wait_until, lambda: marker not in processes(name), 30)


def parse_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    frames = []
    while len(data) >= HEADER.size:
        ftype, flags, reserved, fid, length = HEADER.unpack(data[: HEADER.size])
        assert flags == reserved == 0 and length <= 1024 * 1024
        frames.append((ftype, fid, data[HEADER.size : HEADER.size + length]))
        data = data[HEADER.size + length :]
    assert not data, "a truncated frame from the agent"
    return frames


def test_fuzzed_frames_never_crash_the_agent(new_sandbox: Callable[..., str]) -> None:
    """Thousands of well-framed frames with mutated payloads: errors, never a crash."""
    name = new_sandbox()
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    good_run = encode_run(
        "echo fuzz", deadline=5, grace=0.1, env={"A": "b"}, has_stdin=False, cwd="/tmp",
        spill_path="/tmp/fuzz/spill", spill_after=3,
    )  # fmt: skip
    frames = [HEADER.pack(1, 0, 0, 0, 8) + struct.pack(">HHI", 1, 1, 0)]
    for _ in range(3000):
        ftype = rng.choice([2, 2, 2, 3, 4, 5, 6, 0x10, 0x42, 0x81])
        if ftype == 2:
            payload = bytearray(good_run)
            for _ in range(rng.randint(0, 3)):
                payload[rng.randrange(len(payload))] = rng.randrange(256)
            payload = payload[: rng.randint(0, len(payload))] if rng.random() < 0.3 else payload
        else:
            payload = bytearray(rng.randbytes(rng.randint(0, 40)))
        frames.append(HEADER.pack(ftype, 0, 0, rng.randint(0, 100), len(payload)) + payload)
    frames.append(HEADER.pack(6, 0, 0, 77, 0))  # PING
    frames.append(HEADER.pack(7, 0, 0, 0, 4) + struct.pack(">I", 100))  # SHUTDOWN
    done = subprocess.run(
        attach_argv(name), input=b"".join(frames), capture_output=True, timeout=120
    )
    got = parse_frames(done.stdout)
    assert done.returncode == 0, (seed, done.returncode, done.stderr[-500:])
    assert (T_PONG, 77, b"") in got and got[-1][0] == T_BYE, seed
    # Both paths were exercised: mutated RUNs that still ran, and ones that were refused.
    types = [t for t, _, _ in got]
    assert types.count(T_STARTED) > 10 and types.count(T_ERROR) > 100, (seed, len(types))
    assert "perl" not in processes(name) and running(name)


def test_init_ends_the_container_after_its_lifetime(new_sandbox: Callable[..., str]) -> None:
    name = new_sandbox(lifetime=2)
    assert running(name)
    assert wait_until(lambda: podman("container", "exists", name, check=False).returncode != 0, 60)


def test_agent_binary_is_read_only_for_sandbox_root(sandbox: str) -> None:
    script = (
        f"echo x > {AGENT} || echo no-write; rm -f {AGENT} || echo no-rm; "
        "mv /.pod_exec_mcp /moved || echo no-mv; umount /.pod_exec_mcp || echo no-umount; "
        f"{AGENT} --version"
    )
    out = podman("exec", sandbox, "sh", "-c", script, check=False).stdout
    assert out.split("\n")[:4] == ["no-write", "no-rm", "no-mv", "no-umount"], out
    assert "protocol version 1" in out


async def test_measure_round_trip_and_cost(sandbox: str) -> None:
    """Figures, not assertions: a warm `true` over the agent vs podman exec; agent cost."""
    async with channel(sandbox) as chan:
        for _ in range(5):
            await run(chan, "true")
        samples = []
        for _ in range(50):
            start = time.monotonic()
            await run(chan, "true")
            samples.append(time.monotonic() - start)
        raw = []
        for _ in range(20):
            start = time.monotonic()
            podman("exec", sandbox, "/bin/sh", "-lc", "true")
            raw.append(time.monotonic() - start)
        host = []
        for _ in range(20):
            start = time.monotonic()
            shell = await asyncio.create_subprocess_exec("/bin/sh", "-lc", "true")
            assert await shell.wait() == 0
            host.append(time.monotonic() - start)
        FIGURES["host sh -lc true (ms, median of 20)"] = round(statistics.median(host) * 1000, 2)
        agent_ms = statistics.median(samples) * 1000
        raw_ms = statistics.median(raw) * 1000
        FIGURES["agent: warm true round trip (ms, median of 50)"] = round(agent_ms, 2)
        FIGURES["podman exec sh -lc true (ms, median of 20)"] = round(raw_ms, 1)
        FIGURES["agent / podman exec"] = round(agent_ms / raw_ms, 3)
        # 16 at once, as 16 sessions would.
        start = time.monotonic()
        await asyncio.gather(*(run(chan, "true") for _ in range(16)))
        FIGURES["agent: 16 concurrent true (ms)"] = round((time.monotonic() - start) * 1000, 1)
        start = time.monotonic()
        procs = [
            await asyncio.create_subprocess_exec(
                "podman", "exec", sandbox, "/bin/sh", "-lc", "true"
            )
            for _ in range(16)
        ]
        await asyncio.gather(*(p.wait() for p in procs))
        FIGURES["podman exec: 16 concurrent true (ms)"] = round((time.monotonic() - start) * 1000)
        cmd = "yes 0123456789abcdef | head -c 10485760"
        raw = []
        for _ in range(3):
            start = time.monotonic()
            assert len(podman("exec", sandbox, "/bin/sh", "-lc", cmd).stdout) == 10485760
            raw.append(time.monotonic() - start)
        FIGURES["podman exec: 10 MB output (ms, median of 3)"] = round(
            statistics.median(raw) * 1000
        )
        _, out = await run(chan, f"grep VmRSS /proc/{chan.agent_pid}/status")
        FIGURES["agent: serve RSS"] = out.decode().split(":")[1].strip()
        _, out = await run(chan, "grep VmRSS /proc/1/status")
        FIGURES["agent: init RSS"] = out.decode().split(":")[1].strip()
        _, out = await run(chan, "ps -e --no-headers -o comm")
        FIGURES["agent: processes while running `ps` (init, agent, supervisor, sh/ps)"] = " ".join(
            out.decode().split()
        )
