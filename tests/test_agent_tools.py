"""What agents need next, end to end over MCP in both eras (issue 13): a shell that
behaves like one terminal, background jobs, file tools, whole outputs kept, Python in the
image, one-shot legacy clients reaped, and errors and metadata written for agents."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import pytest
from conftest import ServerProcess, error_text, new_session, sh, structured

from pod_exec_mcp.shell_state import JOBS_DIR, OUTPUT_DIR

ERAS = pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "modern"])


@pytest.fixture(scope="module")
def server(launch: Any) -> ServerProcess:
    return launch("--kill-grace", "1")


async def _args(client: Any, legacy: bool) -> dict[str, Any]:
    return {} if legacy else {"session_id": await new_session(client)}


async def call(client: Any, tool: str, **arguments: Any) -> dict[str, Any]:
    return structured(await client.call_tool(tool, arguments, raise_on_error=False))


@ERAS
async def test_cwd_and_exported_variables_carry_over(server: ServerProcess, legacy: bool) -> None:
    async with server.client(legacy=legacy) as client, server.client(legacy=legacy) as other:
        args, others = await _args(client, legacy), await _args(other, legacy)
        await sh(client, "mkdir -p /tmp/proj && cd /tmp/proj && export FOO=bar", **args)
        assert (await sh(client, "pwd; echo $FOO", **args))["output"] == "/tmp/proj\nbar\n"
        await sh(client, "python3 -m venv v && . v/bin/activate", **args)
        assert (await sh(client, "command -v python3", **args))["output"] == (
            "/tmp/proj/v/bin/python3\n"
        )
        # A call that changes nothing keeps the state (it is not rewritten); a `cd` alone,
        # and an `unset` alone, are each saved.
        await sh(client, "true", **args)
        await sh(client, "cd /tmp", **args)
        assert (await sh(client, "pwd; echo $FOO", **args))["output"] == "/tmp\nbar\n"
        await sh(client, "unset FOO", **args)
        assert (await sh(client, "pwd; echo x${FOO}x", **args))["output"] == "/tmp\nxx\n"
        await sh(client, "cd /tmp/proj", **args)
        # A command that exits early still leaves its state; the next call is a fresh shell.
        await sh(client, "cd /; export BAZ=1; exit 3", **args)
        assert (await sh(client, "pwd; echo $BAZ", **args))["output"] == "/\n1\n"
        # Not across sessions.
        assert (await sh(other, "pwd; echo x${FOO}x", **others))["output"] == "/workspace\nxx\n"


@ERAS
async def test_job_is_read_incrementally_and_its_status_arrives(
    server: ServerProcess, legacy: bool
) -> None:
    async with server.client(legacy=legacy) as client:
        args = await _args(client, legacy)
        job = await call(
            client,
            "start_job",
            command="for i in 1 2 3; do echo tick $i; sleep 1; done; exit 7",
            **args,
        )
        seen, reads = "", 0
        state: dict[str, Any] = {"running": True}
        while state["running"] and reads < 20:
            state = await call(client, "read_job", job_id=job["job_id"], wait=5)
            seen += state["output"]
            reads += 1
        assert seen == "tick 1\ntick 2\ntick 3\n"
        assert reads >= 3  # the output came in pieces, as it was printed
        assert state["retval"] == 7 and state["running"] is False
        assert (
            state["log_file"]
            and (await sh(client, f"cat {state['log_file']}", **args))["output"] == seen
        )


async def test_stop_job_kills_a_term_ignoring_job(server: ServerProcess) -> None:
    async with server.client() as client:
        sid = await new_session(client)
        job = await call(
            client,
            "start_job",
            command="trap '' TERM; sleep 411 & while :; do sleep 412; done",
            session_id=sid,
        )
        await asyncio.sleep(1)
        final = await call(client, "stop_job", job_id=job["job_id"])
        assert final["running"] is False
        assert "every process it started were killed" in final["output"]
        left = await sh(client, "ps -eo args= | grep -E '^sleep 41[12]' || true", session_id=sid)
        assert left["output"] == ""


async def test_jobs_belong_to_their_principal_session_and_end_with_it(
    server: ServerProcess,
) -> None:
    async with server.client() as client:
        sid = await new_session(client)
        job = await call(client, "start_job", command="sleep 413", session_id=sid)
        await client.call_tool("end_session", {"session_id": sid})
        gone = await client.call_tool("read_job", {"job_id": job["job_id"]}, raise_on_error=False)
        assert "unknown job_id" in error_text(gone)
        malformed = await client.call_tool("read_job", {"job_id": "../x"}, raise_on_error=False)
        assert "malformed" in error_text(malformed) and "http" not in error_text(malformed)


@ERAS
async def test_write_then_read_text_and_a_megabyte_of_bytes(
    server: ServerProcess, legacy: bool
) -> None:
    async with server.client(legacy=legacy) as client:
        args = await _args(client, legacy)
        text = "héllo\n'quotes' \"and\" $(not run)\n" * 3
        written = await call(client, "write_file", path="a/b/c.txt", content=text, **args)
        assert written["bytes_written"] == len(text.encode())
        back = await call(client, "read_file", path="/workspace/a/b/c.txt", **args)
        assert back["content"] == text and back["total_lines"] == 6
        part = await call(client, "read_file", path="a/b/c.txt", offset=2, limit=2, **args)
        assert part["content"] == "'quotes' \"and\" $(not run)\nhéllo\n"
        assert part["next_offset"] == 4

        blob = os.urandom(1024 * 1024)
        encoded = base64.b64encode(blob).decode()
        await call(
            client, "write_file", path="blob.bin", content=encoded, encoding="base64", **args
        )
        got, offset = b"", 0
        while offset is not None:
            piece = await call(
                client, "read_file", path="blob.bin", encoding="base64", offset=offset, **args
            )
            got += base64.b64decode(piece["content"])
            offset = piece["next_offset"]
        assert got == blob

        for path, expected in (("nope.txt", "does not exist"), ("/tmp", "is a directory")):
            failed = await client.call_tool(
                "read_file", {"path": path, **args}, raise_on_error=False
            )
            assert expected in error_text(failed)


async def test_a_cut_output_is_kept_whole_in_a_file(server: ServerProcess) -> None:
    async with server.client() as client:
        sid = await new_session(client)
        result = await sh(client, "seq 1 300000", session_id=sid)
        assert result["truncated"] and result["output_file"]
        assert f"the whole output is in {result['output_file']}" in result["output"]
        check = await sh(
            client, f"seq 1 300000 | cmp - {result['output_file']} && echo same", session_id=sid
        )
        assert check["output"] == "same\n"


async def test_a_cut_output_that_could_not_be_kept_says_so(server: ServerProcess) -> None:
    # The agent cannot create the file (its directory is now a plain file): the result
    # must not pretend the omitted bytes are anywhere.
    async with server.client() as client:
        sid = await new_session(client)
        block = await sh(
            client,
            f"mkdir -p {OUTPUT_DIR} && rm -rf {OUTPUT_DIR} && touch {OUTPUT_DIR} && seq 1 300000",
            session_id=sid,
        )
        assert block["truncated"] and not block["output_file"], block
        assert "the whole output could not be kept in a file in the sandbox" in block["output"]
        assert "the whole output is in" not in block["output"]
        # Nothing else is broken: the next command runs.
        assert (await sh(client, "echo ok", session_id=sid))["output"] == "ok\n"


async def test_fresh_sandbox_has_python_and_git_that_work(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        assert (await sh(client, "python3 -c 'print(1)'"))["output"] == "1\n"
        done = await sh(
            client,
            "cd $(mktemp -d) && git init -q && echo x > f && git add f && git commit -qm x "
            "&& git commit -q --amend && git log --format=%an",
        )
        assert done["retval"] == 0, done
        assert done["output"] == "pod_exec_mcp agent\n"


async def test_login_profile_acts_as_debians_without_starting_processes(
    server: ServerProcess,
) -> None:
    """The image's /etc/profile (image/profile) runs for every command: it sets Debian's
    PATH for root and for other users and sources profile.d as run-parts would pick its
    scripts, yet starts no process of its own (Debian's starts `id` and `run-parts`)."""
    async with server.client(legacy=True) as client:
        done = await sh(
            client,
            "mkdir -p /etc/profile.d && echo 'export FROM_PROFILE_D=yes' > /etc/profile.d/zz.sh"
            " && echo 'export HIDDEN=yes' > /etc/profile.d/.hidden.sh"
            " && echo 'export OTHER=yes' > /etc/profile.d/other.txt"
            " && sh -lc 'echo \"$PATH $FROM_PROFILE_D ${HIDDEN-no} ${OTHER-no}\"'"
            # (HOME as the user's own: bash, our /bin/sh, says so when ~/.profile is not
            # readable, as root's is not for nobody)
            " && HOME=/nonexistent setpriv --reuid=65534 --regid=65534 --clear-groups"
            " sh -lc 'echo \"$PATH\"'"
            # The last field of /proc/loadavg: the last pid made in this pid namespace.
            " && read _ _ _ _ before < /proc/loadavg && sh -lc true"
            " && read _ _ _ _ after < /proc/loadavg && echo $((after - before))",
        )
        assert done["retval"] == 0, done
        assert done["output"].splitlines() == [
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin yes no no",
            "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games",
            "1",  # the login shell itself, and nothing it started
        ]


async def test_one_shot_legacy_sandbox_is_reaped(launch: Any) -> None:
    server = launch("--legacy-idle-timeout", "2")
    async with server.client(legacy=True) as client:
        await sh(client, "true")
        assert len(server.containers()) == 1
        for _ in range(60):
            if not server.containers():
                break
            await asyncio.sleep(0.25)
        assert server.containers() == []
        told = await client.call_tool("shell_exec", {"command": "true"}, raise_on_error=False)
        assert "idle for over 2 s" in error_text(told)


async def test_server_metadata_and_errors_are_written_for_agents(server: ServerProcess) -> None:
    from pod_exec_mcp import __version__

    async with server.client(legacy=True) as client:
        assert client.initialize_result.server_info.version == __version__
        tools = {t.name: t for t in await client.list_tools()}
        assert set(tools) >= {
            "shell_exec", "create_session", "end_session", "start_job", "read_job",
            "stop_job", "read_file", "write_file",
        }  # fmt: skip
        for tool in tools.values():
            assert tool.title and tool.annotations is not None
            assert tool.annotations.read_only_hint is not None
        assert tools["read_file"].annotations.read_only_hint is True
        assert "start_job" in tools["shell_exec"].description
        bad = await client.call_tool(
            "shell_exec", {"command": "true", "session_id": "not valid!"}, raise_on_error=False
        )
        assert "malformed" in error_text(bad) and "pydantic" not in error_text(bad)
        missing = await client.call_tool("shell_exec", {}, raise_on_error=False)
        assert error_text(missing).startswith("invalid arguments for shell_exec: command is")


APP = """\
from http.server import BaseHTTPRequestHandler, HTTPServer


def add(a, b):
    return a - b


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(add(2, 3)).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", 8099), Handler).serve_forever()
"""

TEST = """\
from app import add


def test_add():
    assert add(2, 3) == 5
"""


async def test_a_scripted_coding_agent_session(server: ServerProcess) -> None:
    """An agent's working session, unchanged: write a project, see its test fail, fix it,
    commit, run the server as a job, curl it, stop it. Each step is one tool call."""
    async with server.client() as client:
        sid = await new_session(client)

        async def tool(name: str, **arguments: Any) -> dict[str, Any]:
            return await call(client, name, session_id=sid, **arguments)

        async def run(command: str) -> dict[str, Any]:
            return await tool("shell_exec", command=command)

        assert (await run("mkdir -p proj && cd proj && git init -q && pwd"))["output"] == (
            "/workspace/proj\n"
        )
        await tool("write_file", path="app.py", content=APP)
        await tool("write_file", path="test_app.py", content=TEST)
        assert (await run("python3 -m venv .venv && . .venv/bin/activate"))["retval"] == 0
        assert (await run("pip --version"))["output"].startswith("pip ")
        failing = await run(
            "python3 -m unittest -q 2>&1; python3 -c 'import test_app as t; t.test_add()'"
        )
        assert failing["retval"] != 0 and "AssertionError" in failing["output"]
        source = (await tool("read_file", path="app.py"))["content"]
        await tool("write_file", path="app.py", content=source.replace("a - b", "a + b"))
        assert (await run("python3 -c 'import test_app as t; t.test_add()'"))["retval"] == 0
        await run("printf '.venv/\\n__pycache__/\\n' > .gitignore")
        assert (await run("git add -A && git commit -qm 'add: fix the sum'"))["retval"] == 0
        assert (await run("git log --oneline | wc -l"))["output"].strip() == "1"
        job = await tool("start_job", command="python3 app.py")
        body = ""
        for _ in range(40):
            got = await run("curl -s localhost:8099/ || true")
            body = got["output"]
            if body == "5":
                break
            await asyncio.sleep(0.25)
        assert body == "5"
        assert (await tool("read_job", job_id=job["job_id"]))["running"] is True
        stopped = await tool("stop_job", job_id=job["job_id"])
        assert stopped["running"] is False
        assert (await run("git status --porcelain"))["output"] == ""
        await client.call_tool("end_session", {"session_id": sid})
        # Ended means gone: the work and its job went with it, and the id is refused.
        after = await client.call_tool(
            "shell_exec", {"command": "true", "session_id": sid}, raise_on_error=False
        )
        assert after.is_error and "has ended (ended by end_session)" in error_text(after)


async def test_yes_cannot_fill_the_sandboxs_disk(launch: Any) -> None:
    """Issue 23: 15 s of `yes` and a `yes` job left 10 GB of spill files and a full disk.
    Each file now keeps at most --max-spill-bytes (head and tail, the cut said in the file
    and in the result), and the oldest files go past --max-spill-total-bytes."""
    mib = 1024 * 1024
    server = launch("--max-spill-bytes", str(8 * mib), "--max-spill-total-bytes", str(12 * mib))
    async with server.client() as client:
        sid = await new_session(client)
        ran = await sh(client, "yes", timeout=15, session_id=sid)
        file = ran["output_file"]
        cut = await sh(client, f"wc -c < {file}; grep -c 'bytes cut here' {file}", session_id=sid)
        job = structured(
            await client.call_tool("start_job", {"command": "yes", "session_id": sid})
        )["job_id"]
        log = f"{JOBS_DIR}/{job}.log"
        # Until its log is full (it then wraps: `yes` writes 8 MiB in well under a second).
        await sh(
            client, f"until [ $(stat -c %s {log} 2>/dev/null || echo 0) -ge {8 * mib} ]; "
            "do sleep 0.1; done", session_id=sid, timeout=60,
        )  # fmt: skip
        stopped = structured(await client.call_tool("stop_job", {"job_id": job, "session_id": sid}))
        job_cut = await sh(client, f"wc -c < {log}; grep -c 'bytes cut here' {log}", session_id=sid)
        # The pruning runs after each cut call and kept log; wait until it is done.
        total = await sh(
            client, f"for i in $(seq 100); do t=$(cat {OUTPUT_DIR}/*.log {JOBS_DIR}/*.log "
            f"2>/dev/null | wc -c); [ $t -le {12 * mib} ] && break; sleep 0.1; done; echo $t",
            session_id=sid,
        )  # fmt: skip
    assert ran["retval"] == 124 and file, ran
    assert f"{file} keeps its first {4 * mib} and last {4 * mib} bytes" in ran["output"], ran
    size, lines = cut["output"].split()
    assert lines == "1" and 8 * mib < int(size) < 8 * mib + 200, cut
    assert stopped["running"] is False, stopped
    size, lines = job_cut["output"].split()
    assert lines == "1" and 8 * mib < int(size) < 8 * mib + 200, job_cut
    assert int(total["output"]) <= 12 * mib, total


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
async def test_a_re_sent_call_runs_once(server: ServerProcess, legacy: bool) -> None:
    """Issue 23: a client whose stream broke sends the call again; with the same
    idempotency_key it must not run twice. Three sends, two of them at once."""
    async with server.client(legacy=legacy) as client:
        created = [
            structured(await client.call_tool("create_session", {"idempotency_key": "s-1"}))
            for _ in range(2)
        ]
        args = {} if legacy else {"session_id": created[0]["session_id"]}
        call = {
            "command": "sleep 1; echo ran >> /tmp/runs; wc -l < /tmp/runs",
            "idempotency_key": "k-1", **args,
        }  # fmt: skip
        both = await asyncio.gather(*(client.call_tool("shell_exec", call) for _ in range(2)))
        third = await client.call_tool("shell_exec", call)
        other = await client.call_tool(
            "shell_exec", {**call, "command": "true"}, raise_on_error=False
        )
        written = [
            structured(
                await client.call_tool(
                    "write_file",
                    {"path": "/tmp/w", "content": "x", "idempotency_key": "w-1", **args},
                )
            )
            for _ in range(2)
        ]
        runs = await sh(client, "wc -l < /tmp/runs", **args)
    assert created[0] == created[1], created
    results = [structured(r) for r in (*both, third)]
    assert results[0] == results[1] == results[2], results
    assert results[0]["output"] == "1\n", results
    assert runs["output"] == "1\n", runs
    assert "first used with other arguments" in error_text(other)
    assert written[0] == written[1], written


async def test_the_text_content_is_the_plain_output(server: ServerProcess) -> None:
    """Issue 25: hosts that give the model the text content showed one escaped JSON line.
    The text is now the output, then one status line; structuredContent is unchanged."""
    async with server.client() as client:
        sid = await new_session(client)
        ran = await client.call_tool(
            "shell_exec", {"command": "printf 'a\\nb\\n'", "session_id": sid}
        )
        failed = await client.call_tool(
            "shell_exec", {"command": "echo no; exit 3", "session_id": sid}
        )
        read = await client.call_tool("read_file", {"path": "/etc/hostname", "session_id": sid})
    assert ran.content[0].text == "a\nb\n[exit status 0]", ran.content
    assert structured(ran)["output"] == "a\nb\n" and structured(ran)["retval"] == 0
    assert failed.content[0].text == "no\n[exit status 3]", failed.content
    text = read.content[0].text
    assert text.startswith(structured(read)["content"]) and "/etc/hostname:" in text, text


async def test_the_shell_and_python_are_what_agents_expect(server: ServerProcess) -> None:
    """Issue 25: /bin/sh was dash (`source: not found`, `[[` not found, `{1..3}` literal),
    the first pip install failed on PEP 668, and a job's Python output was block-buffered."""
    async with server.client() as client:
        sid = await new_session(client)
        bash = await sh(
            client,
            "python3 -m venv venv && source venv/bin/activate && [[ -n $VIRTUAL_ENV ]] && "
            "echo {1..3}",
            session_id=sid,
            timeout=120,
        )
        pip = await sh(client, "pip install --no-index pod-exec-mcp-nothing", session_id=sid)
        job = structured(
            await client.call_tool(
                "start_job",
                {"command": "python3 -c 'import time; print(\"up\"); time.sleep(60)'",
                 "session_id": sid},
            )
        )["job_id"]  # fmt: skip
        read = structured(
            await client.call_tool("read_job", {"job_id": job, "wait": 20, "session_id": sid})
        )
        await client.call_tool("stop_job", {"job_id": job, "session_id": sid})
    assert bash["output"] == "1 2 3\n", bash
    assert "externally-managed-environment" not in pip["output"], pip
    assert "No matching distribution" in pip["output"], pip
    assert read["output"] == "up\n" and read["running"], read


async def test_a_gone_working_directory_is_said_and_paths_come_back_absolute(
    server: ServerProcess,
) -> None:
    """Issue 25: a removed working directory silently fell back to /workspace (dangerous
    right before an `rm`), and write_file echoed a relative path as given."""
    async with server.client() as client:
        sid = await new_session(client)
        await sh(client, "mkdir -p /tmp/here && cd /tmp/here", session_id=sid)
        wrote = structured(
            await client.call_tool(
                "write_file", {"path": "sub/f.txt", "content": "x", "session_id": sid}
            )
        )
        await sh(client, "mkdir -p /tmp/here2 && cd /tmp/here2", session_id=sid)
        await sh(client, "rm -rf /tmp/here2", session_id=sid)  # from inside it
        gone = await sh(client, "pwd", session_id=sid)
        await sh(client, "mkdir -p /tmp/here3 && cd /tmp/here3 && rmdir /tmp/here3", session_id=sid)
        gone_too = await sh(client, "pwd", session_id=sid)
        await sh(client, "mkdir -p /tmp/here2 && cd /tmp/here2", session_id=sid)
        await sh(client, "rm -rf /tmp/here2", session_id=sid)
        refused = await client.call_tool(
            "write_file", {"path": "g.txt", "content": "x", "session_id": sid},
            raise_on_error=False,
        )  # fmt: skip
        absolute = await client.call_tool(
            "write_file", {"path": "/tmp/abs.txt", "content": "x", "session_id": sid}
        )
    assert wrote["path"] == "/tmp/here/sub/f.txt", wrote
    assert gone["output"].startswith(
        "[pod_exec_mcp: the working directory /tmp/here2 is gone, so this runs in /workspace]\n"
    ), gone
    assert gone_too["output"].startswith(
        "[pod_exec_mcp: the working directory /tmp/here3 is gone, so this runs in /workspace]\n"
    ), gone_too
    assert "relative to the shell's working directory /tmp/here2, which is gone" in (
        error_text(refused)
    )
    assert structured(absolute)["path"] == "/tmp/abs.txt"


async def test_edit_file_replaces_one_occurrence(server: ServerProcess) -> None:
    """Issue 25: every change rewrote the whole file."""
    async with server.client() as client:
        sid = await new_session(client)
        await sh(
            client, "printf 'a = 1\\nb = 2\\nb = 2\\n' > f.py && chmod +x f.py", session_id=sid
        )
        edited = structured(
            await client.call_tool(
                "edit_file", {"path": "f.py", "old": "a = 1", "new": "a = 10", "session_id": sid}
            )
        )
        twice = await client.call_tool(
            "edit_file", {"path": "f.py", "old": "b = 2", "new": "b = 3", "session_id": sid},
            raise_on_error=False,
        )  # fmt: skip
        nowhere = await client.call_tool(
            "edit_file", {"path": "f.py", "old": "zzz", "new": "y", "session_id": sid},
            raise_on_error=False,
        )  # fmt: skip
        after = await sh(client, "cat f.py; test -x f.py && echo executable", session_id=sid)
    assert edited == {"path": "/workspace/f.py", "bytes_written": 19}, edited
    assert "2 times in it" in error_text(twice)
    assert "nowhere in it" in error_text(nowhere)
    assert after["output"] == "a = 10\nb = 2\nb = 2\nexecutable\n", after
