"""Sessions in both MCP eras: persistence, isolation, explicit sessions (issue 2)."""

from __future__ import annotations

import asyncio

from conftest import ServerProcess, error_text, new_session, podman, sh, structured, wait_until


async def test_tool_contract_has_output_schema(server: ServerProcess) -> None:
    async with server.client() as client:
        tools = {t.name: t for t in await client.list_tools()}
    assert {"shell_exec", "create_session", "end_session"} <= set(tools)
    schema = tools["shell_exec"].output_schema
    assert {"output", "retval"} <= set(schema["required"])
    assert schema["properties"]["output"]["type"] == "string"
    assert schema["properties"]["retval"]["type"] == "integer"
    assert "create_session" in tools["shell_exec"].description


async def test_merged_output_keeps_order_and_retval(server: ServerProcess) -> None:
    script = "for i in $(seq 1 40); do echo out$i; echo err$i >&2; done; exit 7"
    async with server.client(legacy=True) as client:
        result = await sh(client, script)
        missing = await sh(client, "no_such_command_xyz")
        ok = await sh(client, "true")
    expected = "".join(f"out{i}\nerr{i}\n" for i in range(1, 41))
    assert result["output"] == expected
    assert result["retval"] == 7
    assert missing["retval"] == 127 and "not found" in missing["output"]
    assert ok == {**ok, "output": "", "retval": 0}


async def test_legacy_session_state_persists(server: ServerProcess) -> None:
    async with server.client(legacy=True) as client:
        await sh(client, "echo persisted > /workspace/note && mkdir -p /opt/x")
        again = await sh(client, "cat /workspace/note; test -d /opt/x && echo /opt/x; pwd; id -un")
    assert again["output"] == "persisted\n/opt/x\n/workspace\nroot\n"


async def test_legacy_sessions_are_isolated(server: ServerProcess) -> None:
    async with server.client(legacy=True) as a, server.client(legacy=True) as b:
        await sh(a, "echo mine > /workspace/secret")
        seen = await sh(b, "cat /workspace/secret")
        host_a = (await sh(a, "hostname"))["output"]
        host_b = (await sh(b, "hostname"))["output"]
    assert seen["retval"] != 0 and "No such file" in seen["output"]
    assert host_a != host_b


async def test_concurrent_first_calls_start_one_container(server: ServerProcess) -> None:
    before = {c["Id"] for c in server.containers()}
    async with server.client(legacy=True) as client:
        results = await asyncio.gather(*(sh(client, "hostname") for _ in range(6)))
        during = {c["Id"] for c in server.containers()} - before
    assert len({r["output"] for r in results}) == 1
    assert len(during) == 1


async def test_delete_removes_the_legacy_container(server: ServerProcess) -> None:
    before = {c["Id"] for c in server.containers()}
    async with server.client(legacy=True) as client:
        await sh(client, "true")
        mine = {c["Id"] for c in server.containers()} - before
        assert len(mine) == 1
    # Leaving the client sends DELETE; the session's container goes with it.
    assert wait_until(lambda: not mine & {c["Id"] for c in server.containers()}, timeout=15)


async def test_modern_call_without_session_is_refused_and_starts_nothing(
    server: ServerProcess,
) -> None:
    before = len(server.containers())
    async with server.client() as client:
        result = await client.call_tool("shell_exec", {"command": "true"}, raise_on_error=False)
    assert "create_session" in error_text(result)
    assert len(server.containers()) == before


async def test_modern_session_create_use_end(server: ServerProcess) -> None:
    async with server.client() as client:
        before = {c["Id"] for c in server.containers()}
        sid = await new_session(client)
        assert len(sid) >= 32
        started = {c["Id"] for c in server.containers()} - before
        assert len(started) == 1
        await sh(client, "echo kept > /workspace/f", session_id=sid)
        assert (await sh(client, "cat /workspace/f", session_id=sid))["output"] == "kept\n"
        other = await new_session(client)
        assert (await sh(client, "cat /workspace/f", session_id=other))["retval"] != 0
        ended = structured(await client.call_tool("end_session", {"session_id": sid}))
        assert ended["ended"] is True
        assert not started & {c["Id"] for c in server.containers()}
        after = await client.call_tool(
            "shell_exec", {"command": "true", "session_id": sid}, raise_on_error=False
        )
        assert "ended" in error_text(after)
        again = await client.call_tool("end_session", {"session_id": sid}, raise_on_error=False)
        assert "ended" in error_text(again)
        await client.call_tool("end_session", {"session_id": other})


async def test_session_ids_are_hashed_in_names_and_labels(server: ServerProcess) -> None:
    async with server.client() as client:
        sid = await new_session(client)
        try:
            inspect = podman("inspect", *[c["Id"] for c in server.containers()]).stdout
            assert sid not in inspect
        finally:
            await client.call_tool("end_session", {"session_id": sid})


async def test_unknown_and_malformed_session_ids(server: ServerProcess) -> None:
    async with server.client() as client:
        unknown = await client.call_tool(
            "shell_exec", {"command": "true", "session_id": "A" * 32}, raise_on_error=False
        )
        assert "unknown session_id" in error_text(unknown)
        for bad in ("../../etc", "", "a b", "x" * 200):
            result = await client.call_tool(
                "shell_exec", {"command": "true", "session_id": bad}, raise_on_error=False
            )
            assert "session_id" in error_text(result)


async def test_explicit_sessions_work_from_legacy_clients_too(server: ServerProcess) -> None:
    async with server.client() as modern:
        sid = await new_session(modern)
        await sh(modern, "echo shared > /workspace/s", session_id=sid)
    async with server.client(legacy=True) as legacy:
        assert (await sh(legacy, "cat /workspace/s", session_id=sid))["output"] == "shared\n"
        # ...and the legacy session's own sandbox is a different one.
        assert (await sh(legacy, "cat /workspace/s"))["retval"] != 0
        await legacy.call_tool("end_session", {"session_id": sid})


async def test_commands_of_different_sessions_run_at_once(server: ServerProcess) -> None:
    """Each command records when it ran; with a blocking server the windows could not overlap."""
    probe = "s=$(date +%s%N); sleep 2; echo $s $(date +%s%N)"
    async with server.client(legacy=True) as a, server.client(legacy=True) as b:
        await asyncio.gather(sh(a, "true"), sh(b, "true"))
        ra, rb = await asyncio.gather(sh(a, probe), sh(b, probe))
    (a0, a1), (b0, b1) = (map(int, r["output"].split()) for r in (ra, rb))
    assert a0 < b1 and b0 < a1, "the two commands did not overlap in time"
