"""Commands under real agents: timeouts that kill, bounded output, cancel, progress (issue 3)."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from typing import Any

import pytest
from conftest import (
    FIGURES,
    ServerProcess,
    error_text,
    new_session,
    podman,
    sh,
    structured,
    wait_until,
)

# `ps` lines of the processes a test started, identified by their arguments. The sandbox's
# own init runs `sleep <lifetime>`, so tests use sleep durations nothing else uses.
LEFTOVERS = "ps -eo args= | grep -E '^(sleep 3[0-9][0-9]|yes|sh -c trap)' || true"


@pytest.fixture(scope="module")
def server(launch: Any) -> ServerProcess:
    # Progress every second keeps the progress test short; everything else is default.
    return launch("--progress-interval", "1", "--kill-grace", "2")


async def test_timeout_kills_the_whole_tree(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        result = await sh(
            client,
            "echo before; sleep 300 & sleep 301 & setsid sleep 302 & sleep 303; echo never",
            timeout=2,
        )
        left = await sh(client, LEFTOVERS)
    assert result["retval"] == 124
    assert result["timed_out"] is True
    assert result["output"].startswith("before\n")
    assert "timed out after 2 s" in result["output"]
    assert "never" not in result["output"]
    assert left["output"] == ""


async def test_sigterm_ignoring_command_is_killed(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        result = await sh(
            client, "sh -c \"trap '' TERM; while :; do sleep 0.2; done\" & wait", timeout=2
        )
        left = await sh(client, "ps -eo args= | grep -c '^sh -c trap' || true")
    assert result["retval"] == 124
    assert left["output"].strip() == "0"


async def test_default_timeout_and_timeout_validation(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        for bad in (-1, 0, 10**6, "soon"):
            result = await client.call_tool(
                "shell_exec", {"command": "true", "timeout": bad}, raise_on_error=False
            )
            assert "timeout" in error_text(result)
        assert (await sh(client, "echo ok", timeout=1.5))["output"] == "ok\n"


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "modern"])
async def test_cancel_kills_the_command(server: ServerProcess, legacy: bool) -> None:
    async with server.client(legacy=legacy) as client:
        args: dict[str, Any] = {} if legacy else {"session_id": await new_session(client)}
        with pytest.raises(Exception, match="timed out"):
            # The client gives up after 2 s and cancels the request.
            await client.call_tool(
                "shell_exec", {"command": "sleep 340 & sleep 341", **args}, timeout=2
            )
        for _ in range(40):
            left = await sh(client, LEFTOVERS, **args)
            if left["output"] == "":
                break
            await asyncio.sleep(0.5)
        assert left["output"] == ""
        if args:
            await client.call_tool("end_session", args)


async def test_50_mb_of_output_is_capped_with_head_and_tail(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        started = time.monotonic()
        result = await sh(
            client, "echo FIRST; head -c 50000000 /dev/zero | tr '\\0' x; echo; echo LAST"
        )
        FIGURES["50 MB of output, call round trip, s"] = round(time.monotonic() - started, 2)
        after = await sh(client, "echo still fine")
    out = result["output"]
    assert result["retval"] == 0
    assert result["truncated"] is True
    assert out.startswith("FIRST\nxxx")
    assert out.endswith("xxx\nLAST\n")
    assert "bytes of output omitted" in out
    assert len(out.encode()) < 65536 + 300
    assert after["output"] == "still fine\n"


async def test_endless_output_stops_at_the_timeout(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        result = await sh(client, "yes", timeout=3)
        left = await sh(client, LEFTOVERS)
    assert result["retval"] == 124 and result["truncated"] is True
    # The marker says what was killed: with the agent, every process the command started;
    # through podman exec, what its process group and exec id could find.
    head, found, marker = result["output"].rpartition("[pod_exec_mcp: timed out after 3 s; ")
    assert found and head.endswith("y\n" * 10) and marker.endswith(" were killed]")
    assert left["output"] == ""


async def test_binary_output_comes_back_readable(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        bad = await sh(client, "printf 'ok \\377\\376 end\\n'")
        noise = await sh(client, "head -c 20000 /dev/urandom")
    assert bad["output"] == "ok \ufffd\ufffd end\n"
    assert noise["retval"] == 0 and isinstance(noise["output"], str)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "modern"])
async def test_progress_is_reported_on_long_commands(server: ServerProcess, legacy: bool) -> None:
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with server.client(legacy=legacy) as client:
        args: dict[str, Any] = {} if legacy else {"session_id": await new_session(client)}
        result = await client.call_tool(
            "shell_exec", {"command": "sleep 3.5; echo done", **args}, progress_handler=on_progress
        )
        if args:
            await client.call_tool("end_session", args)
    assert structured(result)["output"] == "done\n"
    assert len(seen) >= 2
    assert seen[0][0] < seen[-1][0]
    assert "running for" in (seen[-1][1] or "")


async def test_commands_of_one_session_may_run_concurrently(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        first, second = await asyncio.gather(
            sh(client, "sleep 1; echo a > /workspace/a; echo one"),
            sh(client, "sleep 1; echo b > /workspace/b; echo two"),
        )
        both = await sh(client, "cat /workspace/a /workspace/b")
    assert (first["output"], second["output"], both["output"]) == ("one\n", "two\n", "a\nb\n")


async def test_container_killed_from_outside_is_reported_and_recovered(
    server: ServerProcess,
) -> None:
    async with server.client() as client:
        sid = await new_session(client)
        await sh(client, "touch /workspace/old", session_id=sid)
        (container,) = [c["Id"] for c in server.containers() if c["State"] == "running"][-1:]
        podman("rm", "-f", "-t", "0", container)
        broken = await client.call_tool(
            "shell_exec", {"command": "echo hi", "session_id": sid}, raise_on_error=False
        )
        message = error_text(broken)
        assert "fresh sandbox" in message and "lost" in message
        fresh = await sh(client, "cat /workspace/old; echo hi", session_id=sid)
        assert fresh["output"].endswith("hi\n") and "No such file" in fresh["output"]
        await client.call_tool("end_session", {"session_id": sid})


async def test_command_killed_with_its_container_is_not_a_retval(server: ServerProcess) -> None:
    """A container that dies mid-command gives a tool error, never a made-up exit status."""
    async with server.client() as client:
        sid = await new_session(client)
        await sh(client, "true", session_id=sid)
        ids = {c["Id"] for c in server.containers()}
        running = asyncio.create_task(
            client.call_tool(
                "shell_exec", {"command": "sleep 360", "session_id": sid}, raise_on_error=False
            )
        )
        await asyncio.sleep(1.5)
        newest = [c["Id"] for c in server.containers() if c["Id"] in ids]
        podman("kill", *newest, check=False)
        result = await running
        assert "sandbox" in error_text(result)
        await client.call_tool("end_session", {"session_id": sid})


async def test_concurrency_limit_queues_calls(launch: Any) -> None:
    limited = launch("--max-concurrent-execs", "1")
    probe = "s=$(date +%s%N); sleep 1; echo $s $(date +%s%N)"
    async with limited.client(legacy=True) as a, limited.client(legacy=True) as b:
        await asyncio.gather(sh(a, "true"), sh(b, "true"))
        results = await asyncio.gather(sh(a, probe), sh(b, probe), sh(a, probe))
    windows = sorted(tuple(map(int, r["output"].split())) for r in results)
    assert all(r["retval"] == 0 for r in results)
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end <= start, f"commands overlapped despite a limit of 1: {windows}"
    limited.stop()


_KILLED_CLIENT = """
import asyncio, sys
from fastmcp import Client

async def main() -> None:
    async with Client(sys.argv[1], mode="legacy") as client:
        print("calling", flush=True)
        await client.call_tool("shell_exec", {"command": "sleep 355 & sleep 356", "timeout": 120})

asyncio.run(main())
"""


async def test_legacy_client_killed_mid_command_leaves_no_process(server: ServerProcess) -> None:
    """A disconnect is a cancellation (MCP transport spec); a legacy session outlives its
    connection, so the server must notice the dropped request itself."""
    before = {c["Id"] for c in server.containers()}
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_CLIENT, server.url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        assert (await asyncio.wait_for(client.stdout.readline(), 60)) == b"calling\n"

        def sandbox_of_client() -> list[str]:
            return [c["Id"] for c in server.containers() if c["Id"] not in before]

        assert await asyncio.to_thread(wait_until, lambda: len(sandbox_of_client()) == 1, 60)
        (sandbox,) = sandbox_of_client()

        def sleeps() -> str:
            return podman("exec", sandbox, "/bin/sh", "-c", LEFTOVERS, check=False).stdout

        assert await asyncio.to_thread(wait_until, lambda: "sleep 356" in sleeps(), 30)
    finally:
        client.kill()
        await client.wait()
    assert await asyncio.to_thread(wait_until, lambda: sleeps() == "", 30), sleeps()


async def _read_until_done(client: Any, job_id: str, **args: Any) -> list[dict[str, Any]]:
    """read_job answers until the one that says the job ended (each waits up to 20 s)."""
    reads: list[dict[str, Any]] = []
    while not reads or reads[-1]["running"]:
        assert len(reads) < 20, reads
        got = await client.call_tool("read_job", {"job_id": job_id, "wait": 20, **args})
        reads.append(structured(got))
    return reads


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
async def test_a_long_call_goes_on_as_a_job_and_finishes(
    server: ServerProcess, legacy: bool
) -> None:
    """Issue 23: clients give up at 60 s and then the command was killed. A call still
    running after background_after returns its output so far as a running job, which
    finishes; its final output and exit status come in one read_job answer."""
    async with server.client(legacy=legacy) as client:
        args = {} if legacy else {"session_id": await new_session(client)}
        first = structured(
            await client.call_tool(
                "shell_exec",
                {"command": "echo start; sleep 4; echo end; exit 3", "timeout": 60,
                 "background_after": 1, **args},
            )
        )  # fmt: skip
        reads = await _read_until_done(client, first["job_id"], **args)
        after = await sh(client, "pwd", **args)  # the session goes on as before
    assert first["running"] is True and first["retval"] == -1 and first["job_id"], first
    so_far, marker = first["output"].split("[pod_exec_mcp: ")
    assert marker.startswith("still running after 1 s") and "read_job" in marker, first
    assert not first["timed_out"], first
    # Nothing lost, nothing twice: what the call had, then what the job gave.
    assert so_far + "".join(r["output"] for r in reads) == "start\nend\n", (first, reads)
    assert reads[-1]["retval"] == 3 and reads[-1]["running"] is False, reads
    assert after["retval"] == 0, after


async def test_a_backgrounded_call_still_ends_at_its_timeout(server: ServerProcess) -> None:
    async with server.client() as client:
        sid = await new_session(client)
        first = structured(
            await client.call_tool(
                "shell_exec",
                {"command": "sleep 100", "timeout": 3, "background_after": 1, "session_id": sid},
            )
        )
        reads = await _read_until_done(client, first["job_id"], session_id=sid)
        left = await sh(client, "ps -eo args | grep -c '^sleep 100' || true", session_id=sid)
        bad = await client.call_tool(
            "shell_exec",
            {"command": "true", "background_after": -1, "session_id": sid},
            raise_on_error=False,
        )
    assert first["running"] and first["job_id"], first
    assert reads[-1]["retval"] == 124, reads
    assert "timed out after 3 s" in reads[-1]["output"], reads
    assert "were killed" in reads[-1]["output"], reads
    assert left["output"] == "0\n", left
    assert "background_after must be a number of seconds" in error_text(bad)
