"""The exec agent (image/agent/) as a process of this host, without Podman.

The sources are compiled with the host's gcc and the Containerfile's own flags (static
where the host has a static libc), and `agent serve` is driven by the real host-side
client (AgentChannel) over its stdio pipes and over a socketpair (`serve --fd N`), as the
server drives it in a sandbox. Skipped where there is no gcc.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pod_exec_mcp.agent_channel import PROTOCOL_VERSION, AgentChannel, AgentRun

SOURCES = Path(__file__).resolve().parent.parent / "image" / "agent"
GCC = shutil.which("gcc")
pytestmark = pytest.mark.skipif(GCC is None, reason="no gcc on this host to build the agent")


def containerfile_flags() -> list[str]:
    """The gcc flags of the Containerfile's build line, so the two cannot drift apart."""
    text = (SOURCES / "Containerfile").read_text()
    match = re.search(r"RUN gcc (.*?) -o /agent /src/\*\.c", text)
    assert match, "the Containerfile no longer builds /agent from /src/*.c"
    return match.group(1).split()


def compile_agent(out: Path, flags: list[str]) -> Path:
    assert GCC is not None
    cmd = [GCC, *flags, "-o", str(out), *map(str, sorted(SOURCES.glob("*.c")))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def static_libc() -> bool:
    assert GCC is not None
    found = subprocess.run([GCC, "-print-file-name=libc.a"], capture_output=True, text=True)
    return os.path.isabs(found.stdout.strip())


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    flags = containerfile_flags()
    if not static_libc():  # the build's flags all the same, but linked dynamically
        flags = [f for f in flags if f != "-static"]
    return compile_agent(tmp_path_factory.mktemp("agent") / "agent", flags)


@asynccontextmanager
async def attached(binary: Path, transport: str) -> AsyncIterator[AgentChannel]:
    if transport == "stdio":
        chan = await AgentChannel.attach([str(binary), "serve"])
    else:
        ours, theirs = socket.socketpair()
        argv = [str(binary), "serve", "--fd", str(theirs.fileno())]
        chan = await AgentChannel.attach(argv, sock=ours, child_sock=theirs)
    try:
        yield chan
    finally:
        await chan.close()


async def run(chan: AgentChannel, command: str) -> tuple[AgentRun, bytes]:
    out = bytearray()
    done = await chan.run(command, timeout=60, kill_grace=1, on_output=out.extend)
    return done, bytes(out)


def test_the_containerfile_build_line_compiles_here(tmp_path: Path) -> None:
    """Exactly the Containerfile's flags, static included (the image's build is the same
    line in a Debian container)."""
    if not static_libc():
        pytest.skip("no static libc (libc.a) on this host")
    binary = compile_agent(tmp_path / "agent", containerfile_flags())
    done = subprocess.run([binary, "--version"], capture_output=True, text=True)
    assert done.stdout == f"pod_exec_mcp agent, protocol version {PROTOCOL_VERSION}\n"
    # No interpreter: the binary runs in any sandbox image.
    assert b"/ld-linux" not in binary.read_bytes()


@pytest.mark.parametrize("transport", ["stdio", "socket"])
async def test_hello_run_and_exit_status(agent: Path, transport: str) -> None:
    async with attached(agent, transport) as chan:
        assert chan.protocol_version == PROTOCOL_VERSION
        assert chan.agent_pid > 0 and chan.agent_pid != os.getpid()
        done, out = await run(chan, "echo hi")
        assert (done.status, out, done.stopped, done.output_bytes) == (0, b"hi\n", False, 3)
        done, out = await run(chan, "echo out; echo err >&2; exit 3")
        assert (done.status, out) == (3, b"out\nerr\n")
        done, _ = await run(chan, "kill -9 $$")
        assert done.status == 128 + 9
    assert not chan.alive


async def test_stop_kills_a_tree_that_detached(agent: Path) -> None:
    """STOP reaches a process whose parent exited (re-parented to the supervisor, the
    subreaper), and EXIT says the subtree was verified empty."""
    async with attached(agent, "stdio") as chan:
        out = bytearray()
        stop = asyncio.Event()

        def on_output(chunk: bytes) -> None:
            out.extend(chunk)
            if out.endswith(b"\n"):
                stop.set()

        # The subshell prints its background sleep's pid and exits: the sleep is orphaned.
        done = await chan.run(
            "(sleep 300 & echo $!); sleep 300",
            timeout=None,
            kill_grace=0.5,
            on_output=on_output,
            stop=stop,
        )
        orphan = int(out)
        try:
            assert done.stopped and done.all_killed and done.survivors == 0, done
            assert not process_exists(orphan)
        finally:
            kill_stray_sleep(orphan)


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def kill_stray_sleep(pid: int) -> None:
    """Kill pid if it is still one of our `sleep 300`s (a failed stop left it on the host)."""
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00300\x00":
            os.kill(pid, 9)
    except (FileNotFoundError, ProcessLookupError):
        pass


# Numbered lines, so that the head and the tail the file keeps can be checked exactly.
_NUMBERED = "i=0; while [ $i -lt {n} ]; do printf '%07d\\n' $i; i=$((i+1)); done"


@pytest.mark.parametrize("lines", [1000, 200_000], ids=["under-the-bound", "ten-times-over"])
async def test_the_spill_file_keeps_head_and_tail_within_its_bound(
    agent: Path, tmp_path: Path, lines: int
) -> None:
    """Issue 23: the whole-output file of a command never grows past SPILL_MAX; past it,
    it holds the exact head and the newest tail in order, with a line between saying how
    much was cut (before, one `yes` wrote 10 GB in 30 s)."""
    bound = 256 * 1024
    path = tmp_path / "out" / "spill.log"
    expected = b"".join(b"%07d\n" % i for i in range(lines))
    async with attached(agent, "socket") as chan:
        out = bytearray()
        done = await chan.run(
            _NUMBERED.format(n=lines), timeout=120, kill_grace=1, on_output=out.extend,
            spill_path=str(path), spill_after=1024, spill_max=bound,
        )  # fmt: skip
    assert bytes(out) == expected  # the host still saw every byte
    assert done.spilled_to == str(path) and not done.spill_failed, done
    kept = path.read_bytes()
    if len(expected) <= bound:
        assert not done.spill_cut and kept == expected, done
        return
    assert done.spill_cut, done
    head, tail = bound // 2, bound - bound // 2
    line = b"\n[pod_exec_mcp: %d bytes cut here; the first %d and last %d kept]\n" % (
        len(expected) - bound, head, tail,
    )  # fmt: skip
    assert kept == expected[:head] + line + expected[-tail:]
    assert not (tmp_path / "out" / "spill.log.part").exists()
