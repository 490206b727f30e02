"""Nothing leaks: signals, fail-fast start-up, reaping, limits, sweeping (issues 2 and 4)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ServerProcess,
    containers_of,
    error_text,
    new_session,
    run_cli,
    sh,
    start_server,
    wait_until,
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_removes_every_container(launch: Any, sig: signal.Signals) -> None:
    server = launch()
    async with server.client(legacy=True) as legacy, server.client() as modern:
        await sh(legacy, "true")
        sid = await new_session(modern)
        await sh(modern, "true", session_id=sid)
        assert len(server.containers()) == 2
        # Stop the server while both clients are still connected and a command runs.
        running = asyncio.create_task(
            legacy.call_tool("shell_exec", {"command": "sleep 370"}, raise_on_error=False)
        )
        await asyncio.sleep(1)
        returncode = await asyncio.to_thread(server.stop, sig)
        running.cancel()
    assert returncode == 0, server.log()
    assert server.containers() == []
    assert "every sandbox of this server was removed" in server.log()


def test_no_podman_on_path_fails_fast(server_env: dict[str, str], run_dir: Path) -> None:
    server = start_server({**server_env, "PATH": "/nonexistent"}, run_dir, wait=False)
    assert server.proc.wait(timeout=60) != 0
    log = server.log().strip()
    assert log.splitlines() == [log] and "podman not found" in log
    assert "serving MCP" not in log


def test_missing_image_fails_fast(server_env: dict[str, str], run_dir: Path) -> None:
    server = start_server(server_env, run_dir, "--image", "no_such_image_xyz", wait=False)
    assert server.proc.wait(timeout=60) != 0
    log = server.log()
    assert "no_such_image_xyz" in log and "pod_exec_mcp_build" in log
    assert "serving MCP" not in log


def test_bad_settings_fail_with_the_flag_named(server_env: dict[str, str]) -> None:
    done = run_cli({**server_env, "POD_EXEC_MCP_MAX_SANDBOXES": "many"}, "--port", "0")
    assert done.returncode == 2
    assert "--max-sandboxes / POD_EXEC_MCP_MAX_SANDBOXES" in done.stderr
    done = run_cli(server_env, "--port", "99999")
    assert done.returncode == 2 and "--port" in done.stderr


async def test_idle_sandboxes_are_reaped(launch: Any) -> None:
    server = launch("--idle-timeout", "2")
    async with server.client() as client, server.client(legacy=True) as legacy:
        # The legacy sandbox first: starting it may take longer than the idle timeout.
        await sh(legacy, "touch /workspace/old")
        sid = await new_session(client)
        await sh(client, "true", session_id=sid)
        # A command longer than the idle timeout is not reaped while it runs.
        assert (await sh(client, "sleep 3; echo alive", session_id=sid))["output"] == "alive\n"
        assert await asyncio.to_thread(wait_until, lambda: server.containers() == [], 20)
        result = await client.call_tool(
            "shell_exec", {"command": "true", "session_id": sid}, raise_on_error=False
        )
        assert "idle" in error_text(result) and "create_session" in error_text(result)
        # A legacy client cannot reconnect by itself: it is told once, then gets a fresh one.
        told = await legacy.call_tool("shell_exec", {"command": "true"}, raise_on_error=False)
        assert "idle" in error_text(told) and "fresh sandbox" in error_text(told)
        fresh = await sh(legacy, "ls /workspace; echo fresh")
        assert fresh["output"] == "fresh\n"
    server.stop()


async def test_sandbox_limit_gives_a_clear_error(launch: Any) -> None:
    server = launch("--max-sandboxes", "2")
    async with server.client() as client:
        first, second = await new_session(client), await new_session(client)
        third = await client.call_tool("create_session", {}, raise_on_error=False)
        assert "maximum of 2 sandboxes" in error_text(third)
        async with server.client(legacy=True) as legacy:
            refused = await legacy.call_tool(
                "shell_exec", {"command": "true"}, raise_on_error=False
            )
            assert "maximum of 2 sandboxes" in error_text(refused)
        # Nothing was evicted to make room.
        assert (await sh(client, "echo ok", session_id=first))["output"] == "ok\n"
        await client.call_tool("end_session", {"session_id": second})
        assert await new_session(client)
    server.stop()


async def live_and_killed_servers(launch: Any) -> tuple[ServerProcess, ServerProcess]:
    """Two servers with a session each; the second then dies by SIGKILL, leaving its
    container behind."""
    alive, doomed = launch(), launch()
    async with alive.client() as a, doomed.client() as d:
        await new_session(a)
        await new_session(d)
    doomed.stop(signal.SIGKILL)
    return alive, doomed


async def test_sigkilled_servers_containers_are_swept_and_live_ones_kept(
    launch: Any, server_env: dict[str, str]
) -> None:
    alive, doomed = await live_and_killed_servers(launch)
    assert len(doomed.containers()) == 1  # left behind by the killed server

    listing = run_cli(server_env, "--list-containers").stdout
    assert "ORPHANED" in listing and "server alive" in listing

    # The next server's start-up sweep removes the orphan, and only the orphan.
    launch()
    assert doomed.containers() == []
    assert len(alive.containers()) == 1
    alive.stop()


async def test_cleanup_command_removes_only_orphans(
    launch: Any, server_env: dict[str, str]
) -> None:
    alive, doomed = await live_and_killed_servers(launch)
    done = run_cli(server_env, "--cleanup")
    assert done.returncode == 0 and "removed 1 orphaned" in done.stdout
    assert doomed.containers() == [] and len(alive.containers()) == 1
    done = run_cli(server_env, "--cleanup-all")
    assert done.returncode == 0
    assert alive.containers() == []
    alive.stop()


async def test_sandbox_lifetime_bounds_a_container_of_a_dead_server(launch: Any) -> None:
    server = launch("--sandbox-lifetime", "3")
    async with server.client() as client:
        await new_session(client)
    instance = server.instance
    server.stop(signal.SIGKILL)
    assert len(containers_of(instance)) == 1
    # No server is left to remove it: the container's own init ends it, and --rm removes it.
    assert await asyncio.to_thread(wait_until, lambda: containers_of(instance) == [], 30)


def test_help_explains_every_setting(server_env: dict[str, str]) -> None:
    from pod_exec_mcp.config import Settings, cli_flag, env_var

    done = run_cli(server_env, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for name in Settings.model_fields:
        assert cli_flag(name) in text and env_var(name) in text


def test_server_env_defaults_are_used(server_env: dict[str, str], run_dir: Path) -> None:
    server: ServerProcess = start_server(
        {**server_env, "MCP_PORT": "1"}, run_dir, wait=False
    )  # the --port flag from start_server wins over MCP_PORT
    try:
        assert wait_until(lambda: "serving MCP at" in server.log(), 90)
        assert f":{server.port}" in server.log()
    finally:
        server.stop()


async def test_warm_pool_serves_first_calls_and_leaves_nothing(launch: Any) -> None:
    server = launch("--warm-pool", "2")
    assert await asyncio.to_thread(wait_until, lambda: len(server.containers()) == 2, 30)
    pooled = {c["Id"] for c in server.containers()}
    async with server.client() as client, server.client(legacy=True) as legacy:
        sid = await new_session(client)
        assert (await sh(client, "echo from-pool", session_id=sid))["output"] == "from-pool\n"
        await sh(legacy, "true")
        in_use = {c["Id"] for c in server.containers()}
        # Both sessions got pooled sandboxes, and the pool refills behind them.
        assert pooled <= in_use
        assert await asyncio.to_thread(wait_until, lambda: len(server.containers()) == 4, 30)
    assert server.stop() == 0
    assert server.containers() == []


async def test_pool_never_hands_out_a_sandbox_past_its_lifetime(launch: Any) -> None:
    """Regression: pooled sandboxes were judged by a fixed 600 s age while their init exits
    after sandbox_lifetime, so a session could get a dead one ("The sandbox broke")."""
    server = launch("--warm-pool", "1", "--sandbox-lifetime", "3")
    seen: list[str] = []

    def pooled() -> bool:
        # Kept from the same listing: with a 3 s lifetime it may be gone by the next one.
        seen[:] = [c["Id"] for c in server.containers()]
        return bool(seen)

    assert await asyncio.to_thread(wait_until, pooled, 30)
    first = seen[0]

    def first_ended() -> bool:
        running = {c["Id"] for c in server.containers() if c.get("State") == "running"}
        return first not in running

    # The first pooled sandbox's init exits at its lifetime: ask for one only after that.
    assert await asyncio.to_thread(wait_until, first_ended, 60)
    async with server.client() as client:
        sid = await new_session(client)
        assert (await sh(client, "echo alive", session_id=sid))["output"] == "alive\n"
    assert server.stop() == 0
    assert server.containers() == []
