"""End to end over MCP: kills that cannot be escaped, and no sandbox (or file) lost to a
hiccup. The agent itself is tested at its own level in test_agent.py; here every attack
goes through shell_exec, as an agent would send it (issue 10)."""

from __future__ import annotations

import asyncio
import os
import shlex
from typing import Any

import pytest
from conftest import GVISOR, ServerProcess, error_text, new_session, sh, structured

# These are the exec agent's guarantees: one `podman exec` per command cannot give them
# (each attack here succeeds against exec_channel=podman-exec; that is why the agent exists).
pytestmark = pytest.mark.skipif(
    os.environ.get("POD_EXEC_MCP_EXEC_CHANNEL") == "podman-exec",
    reason="guarantees of the exec agent, which exec_channel=podman-exec does not use",
)

# Processes the attacks leave behind, by arguments nothing else uses.
SURVIVORS = "ps -eo args= | grep -E '^(sleep 4[0-9][0-9]|perl -e)' | grep -v grep || true"

ESCAPES = {
    "env scrubbed": (
        "env -u POD_EXEC_MCP_EXEC_ID setsid sh -c "
        "'trap \"\" TERM; while :; do sleep 401; done' & sleep 402"
    ),
    "uid change": (
        "setsid setpriv --reuid=65534 --regid=65534 --clear-groups sh -c "
        "'trap \"\" TERM; while :; do sleep 403; done' & sleep 404"
    ),
    "non-dumpable": (
        # prctl(PR_SET_DUMPABLE, 0) after setsid: its environ can no longer be read.
        "setsid python3 -c 'import ctypes, os; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
        'os.execvp("sleep", ["sleep", "405"])\' & sleep 406'
    ),
}


# Known gaps of the gVisor profile (runsc 2022-12), kept visible: strict, so a fixed gVisor
# (or agent) turns them into failures to remove.
GVISOR_GAP = pytest.mark.xfail(
    GVISOR,
    strict=True,
    reason="gVisor: orphans go to PID 1, not to the agent's subreaper supervisor; one that "
    "also dropped the command's id variable escapes the kill",
)
GVISOR_INIT_GAP = pytest.mark.xfail(
    GVISOR,
    strict=True,
    reason="gVisor: the sandbox's own root can SIGKILL its init (PID 1) or exhaust the "
    "Sentry's pids, which ends the sandbox (its files are lost; the session gets a new one)",
)


@pytest.fixture(scope="module")
def server(launch: Any) -> ServerProcess:
    return launch("--kill-grace", "1")


@pytest.mark.parametrize(
    "escape",
    [pytest.param(e, marks=GVISOR_GAP) if e == "env scrubbed" else e for e in ESCAPES],
    ids=list(ESCAPES),
)
async def test_timeout_kills_every_escape(server: ServerProcess, escape: str) -> None:
    async with server.client() as client:
        sid = await new_session(client)
        result = await sh(client, ESCAPES[escape], session_id=sid, timeout=2)
        assert result["timed_out"] and result["retval"] == 124
        assert "the command and every process it started were killed" in result["output"]
        assert (await sh(client, SURVIVORS, session_id=sid))["output"] == ""
        await client.call_tool("end_session", {"session_id": sid})


@GVISOR_INIT_GAP
async def test_killing_everything_inside_keeps_the_sandbox_and_its_files(
    server: ServerProcess,
) -> None:
    async with server.client() as client:
        sid = await new_session(client)
        await sh(client, "echo precious > /workspace/work.txt", session_id=sid)
        containers = {c["Id"] for c in server.containers()}
        for attack in ("pkill sleep", "kill -9 -1", "pkill -9 -f /.pod_exec_mcp/agent"):
            # The attack may take the call's own agent with it: then the call says so.
            await client.call_tool(
                "shell_exec", {"command": attack, "session_id": sid}, raise_on_error=False
            )
            after = await sh(client, "cat /workspace/work.txt", session_id=sid)
            assert after["output"] == "precious\n", attack
        assert {c["Id"] for c in server.containers()} == containers
        await client.call_tool("end_session", {"session_id": sid})


@GVISOR_INIT_GAP
async def test_zombie_storm_keeps_the_files(launch: Any) -> None:
    server = launch("--pids-limit", "256", "--kill-grace", "1")
    async with server.client() as client:
        sid = await new_session(client)
        await sh(client, "echo precious > /workspace/work.txt", session_id=sid)
        storm = (
            "perl -e 'for (1..1100){my $p=fork(); last unless defined $p; "
            "exit 0 if $p==0} sleep 100'"
        )
        result = await sh(client, storm, session_id=sid, timeout=8)
        assert result["timed_out"]
        after = await sh(client, "cat /workspace/work.txt; " + SURVIVORS, session_id=sid)
        assert after["output"] == "precious\n"


FILL_PIDS = """
import os, time
kids = []
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(300)
        os._exit(0)
    kids.append(pid)
print("full", flush=True)
for kid in kids:
    os.waitpid(kid, 0)
"""


@pytest.mark.skipif(
    GVISOR, reason="gVisor's own threads count against --pids-limit: 48 cannot start runsc"
)
async def test_momentary_pid_shortage_is_reported_and_passes(launch: Any) -> None:
    server = launch("--pids-limit", "48")
    async with server.client() as client:
        sid = await new_session(client)
        await sh(client, "echo precious > /workspace/work.txt", session_id=sid)
        # Take every pid (forks fail at the limit), held by a job that waits for its
        # children: nothing exits until the test stops it, so the next command finds no
        # pid whatever the machine's speed. (Not sh: dash exits when a fork fails.)
        held = structured(
            await client.call_tool(
                "start_job",
                {
                    "command": f"python3 -c {shlex.quote(FILL_PIDS)}",
                    "session_id": sid,
                },
            )
        )
        seen = ""
        for _ in range(20):
            read = await client.call_tool(
                "read_job", {"job_id": held["job_id"], "session_id": sid, "wait": 5}
            )
            seen += structured(read)["output"]
            if "full" in seen:
                break
        assert seen == "full\n", seen
        starved = await client.call_tool(
            "shell_exec", {"command": "echo hi", "session_id": sid}, raise_on_error=False
        )
        assert starved.is_error, starved
        message = error_text(starved)
        assert "intact" in message and "broke" not in message, message
        stopped = await client.call_tool(
            "stop_job", {"job_id": held["job_id"], "session_id": sid}, raise_on_error=False
        )
        assert not stopped.is_error, error_text(stopped)
        for _ in range(40):
            done = await client.call_tool(
                "shell_exec",
                {"command": "cat /workspace/work.txt", "session_id": sid},
                raise_on_error=False,
            )
            if not done.is_error:
                break
            await asyncio.sleep(0.5)
        assert done.structured_content["output"] == "precious\n"


# `test`, not `ls`: gVisor of 2022 answers ls's statx with EINVAL.
AFTER = "test -e /tmp/after && echo /tmp/after"


async def test_background_job_of_a_finished_call_keeps_running(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        await sh(client, "rm -f /tmp/after; (sleep 1; echo tick; touch /tmp/after) &")
        for _ in range(40):
            if (await sh(client, AFTER))["output"] == "/tmp/after\n":
                break
            await asyncio.sleep(0.25)
        assert (await sh(client, AFTER))["output"] == "/tmp/after\n"
        # A server started with & keeps answering after its call returned.
        await sh(client, "cd /tmp && python3 -m http.server 8765 >/dev/null 2>&1 &")
        for _ in range(40):
            got = await sh(client, "curl -s -o /dev/null -w '%{http_code}' localhost:8765/")
            if got["output"] == "200":
                break
            await asyncio.sleep(0.25)
        assert got["output"] == "200"
