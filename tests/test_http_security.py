"""Only the intended clients get in, and hostile input leaves the server healthy (issue 4)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    FIGURES,
    ServerProcess,
    error_text,
    new_session,
    run_cli,
    sh,
    start_server,
    structured,
)
from harness import INITIALIZE, JSON_HEADERS

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"


def post(server: ServerProcess, body: bytes | dict[str, Any], **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url, content=content, headers={**JSON_HEADERS, **headers}, timeout=30)


async def assert_healthy(server: ServerProcess, **client_args: Any) -> None:
    async with server.client(legacy=True, **client_args) as client:
        assert (await sh(client, "echo healthy"))["output"] == "healthy\n"


def test_foreign_origin_and_host_are_refused(server: ServerProcess) -> None:
    assert post(server, INITIALIZE).status_code == 200
    assert post(server, INITIALIZE, Origin="http://evil.example").status_code == 403
    assert post(server, INITIALIZE, Host="evil.example").status_code in (400, 403, 421)
    assert post(server, INITIALIZE, Origin=f"http://localhost:{server.port}").status_code == 200


def test_allowed_hosts_and_origins_setting(launch: Any) -> None:
    server = launch("--allowed-hosts", "mcp.example", "--allowed-origins", "https://app.example")
    assert post(server, INITIALIZE, Host="mcp.example").status_code == 200
    assert post(server, INITIALIZE, Origin="https://app.example").status_code == 200
    assert post(server, INITIALIZE, Origin="https://other.example").status_code == 403
    server.stop()


async def test_bearer_tokens_and_principal_isolation(launch: Any) -> None:
    server = launch("--auth-token", f"{TOKEN_A},{TOKEN_B}")
    assert post(server, INITIALIZE).status_code == 401
    assert post(server, INITIALIZE, Authorization="Bearer wrong-token-000000").status_code == 401
    async with server.client(auth=TOKEN_A) as a, server.client(auth=TOKEN_B) as b:
        sid = await new_session(a)
        assert (await sh(a, "echo mine", session_id=sid))["output"] == "mine\n"
        stolen = await b.call_tool(
            "shell_exec", {"command": "true", "session_id": sid}, raise_on_error=False
        )
        made_up = await b.call_tool(
            "shell_exec", {"command": "true", "session_id": "Z" * 32}, raise_on_error=False
        )
        # Another principal's id is indistinguishable from one that never existed.
        assert error_text(stolen).replace(sid, "ID") == error_text(made_up).replace("Z" * 32, "ID")
        refused_end = await b.call_tool("end_session", {"session_id": sid}, raise_on_error=False)
        assert "unknown session_id" in error_text(refused_end)
        assert (await sh(a, "echo still", session_id=sid))["output"] == "still\n"
        await a.call_tool("end_session", {"session_id": sid})
    server.stop()


def test_non_loopback_bind_requires_a_token(
    server_env: dict[str, str], run_dir: Path, launch: Any
) -> None:
    refused = start_server(server_env, run_dir, host="0.0.0.0", wait=False)
    assert refused.proc.wait(timeout=60) != 0
    assert "refusing to listen on 0.0.0.0 without authentication" in refused.log()
    assert "serving MCP" not in refused.log()
    served = launch(host="0.0.0.0", env={"POD_EXEC_MCP_AUTH_TOKEN": TOKEN_A})
    assert post(served, INITIALIZE).status_code == 401
    assert post(served, INITIALIZE, Authorization=f"Bearer {TOKEN_A}").status_code == 200
    served.stop()


def test_generated_token_file_turns_auth_on(
    server_env: dict[str, str], run_dir: Path, launch: Any
) -> None:
    env = {**server_env, "XDG_CONFIG_HOME": str(run_dir / "token-config")}
    made = run_cli(env, "--generate-token")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    path = run_dir / "token-config" / "pod_exec_mcp" / "auth_token"
    assert path.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = run_cli(env, "--generate-token")
    assert again.returncode != 0 and "already exists" in again.stderr
    server = launch(env={"XDG_CONFIG_HOME": env["XDG_CONFIG_HOME"]})
    assert post(server, INITIALIZE).status_code == 401
    assert post(server, INITIALIZE, Authorization=f"Bearer {token}").status_code == 200
    server.stop()


async def test_bad_tool_input_gets_clear_errors(server: ServerProcess) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"command": "echo " + "x" * 2_000_000}, "over the limit"),
        ({"command": "echo a\x00b"}, "NUL"),
        ({}, "command"),
        ({"command": 123}, "command"),
        ({"command": ["ls"]}, "command"),
        ({"command": "true", "timeout": -5}, "timeout"),
        ({"command": "true", "timeout": "abc"}, "timeout"),
        ({"command": "true", "session_id": "../../etc"}, "session_id"),
    ]
    async with server.client(legacy=True) as client:
        for arguments, expected in cases:
            result = await client.call_tool("shell_exec", arguments, raise_on_error=False)
            assert expected in error_text(result), arguments
    await assert_healthy(server)


async def test_malformed_json_rpc_and_huge_bodies(server: ServerProcess) -> None:
    assert post(server, b"{not json").status_code == 400
    assert post(server, {"jsonrpc": "2.0", "method": 5}).status_code == 400
    huge = b'{"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"p": "' + b"a" * (16 << 20)
    try:
        status = post(server, huge + b'"}}').status_code
    except httpx.TransportError:
        status = 413  # the server may close before the client finished sending
    assert status == 413
    await assert_healthy(server)


async def test_hundred_sessions_at_once(launch: Any) -> None:
    """100 sessions opened at once, then a command in each, all at the same time."""
    server = launch("--max-sandboxes", "100")
    async with server.client() as client:
        started = time.monotonic()
        created = await asyncio.gather(
            *(client.call_tool("create_session", {}, raise_on_error=False) for _ in range(100))
        )
        opened = time.monotonic() - started
        ids = [structured(r)["session_id"] for r in created]
        held = len(server.containers())
        started = time.monotonic()
        results = await asyncio.gather(
            *(sh(client, f"echo {i}", session_id=sid) for i, sid in enumerate(ids))
        )
        ran = time.monotonic() - started
        refused = await client.call_tool("create_session", {}, raise_on_error=False)
        assert "maximum of 100" in error_text(refused)
        await asyncio.gather(*(client.call_tool("end_session", {"session_id": sid}) for sid in ids))
    assert held == 100
    assert [r["output"] for r in results] == [f"{i}\n" for i in range(100)]
    assert server.containers() == []
    FIGURES["sessions held at once"] = held
    FIGURES["100 create_session at once, s"] = round(opened, 1)
    FIGURES["100 concurrent commands across them, s"] = round(ran, 1)
    server.stop()


@pytest.mark.parametrize("bad", ["abc", "-1"])
def test_bad_cli_values_exit_non_zero(server_env: dict[str, str], bad: str) -> None:
    done = run_cli(server_env, "--default-timeout", bad)
    assert done.returncode == 2 and "--default-timeout" in done.stderr
