"""The whole HTTP app (create_app) in-process over the in-memory engine: no podman, no
socket. HTTP guards, both MCP eras, the audit trail, metrics, and every tool's argument
checks run here exactly as the real server runs them; only the sandbox is fake."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine
from fastmcp import Client
from fastmcp.utilities.asgi_transport import run_asgi_lifespan
from fastmcp.utilities.tests import ASGIServer
from harness import INITIALIZE, JSON_HEADERS, error_text, new_session, sh, structured

from pod_exec_mcp import audit
from pod_exec_mcp.app import App, create_app
from pod_exec_mcp.auth import auth_provider
from pod_exec_mcp.config import Settings
from pod_exec_mcp.http import MCP_PATH
from pod_exec_mcp.instances import Instance

TOKEN = "token-inprocess-0123456789abcdef"


class Running:
    """One in-process server: its app, its fake engine, and the audit events it emitted."""

    def __init__(self, app: App, engine: FakeEngine) -> None:
        self.app = app
        self.engine = engine
        self.asgi = ASGIServer(url=f"http://127.0.0.1{MCP_PATH}", app=app.asgi,
                               transport_type="http")  # fmt: skip
        self.events: list[audit.AuditEvent] = []

    def client(self, legacy: bool = False, **kwargs: Any) -> Client:
        if legacy:
            kwargs["mode"] = "legacy"
        return self.asgi.client(**kwargs)

    def calls(self, tool: str) -> list[audit.ToolCall]:
        return [e for e in self.events if isinstance(e, audit.ToolCall) and e.tool == tool]


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Instance]:
    found = Instance.acquire(tmp_path)
    yield found
    found.release()


async def _running(
    instance: Instance, settings: Settings, auth: Any = None
) -> AsyncIterator[Running]:
    engine = FakeEngine()
    app = create_app(settings, engine, instance, auth)
    running = Running(app, engine)
    unsubscribe = audit.subscribe(running.events.append)
    try:
        async with run_asgi_lifespan(app.asgi):
            yield running
    finally:
        unsubscribe()
        app.metrics.close()


@pytest.fixture
async def srv(instance: Instance) -> AsyncIterator[Running]:
    async for running in _running(instance, Settings()):
        yield running


@pytest.fixture
async def authed(instance: Instance) -> AsyncIterator[Running]:
    settings = Settings(auth_token=TOKEN)
    async for running in _running(instance, settings, auth_provider(settings)):
        yield running


async def _post(running: Running, body: dict[str, Any] | bytes, **headers: str) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with running.asgi.http_client() as http:
        return await http.post(MCP_PATH, content=content, headers={**JSON_HEADERS, **headers})


# --- HTTP security ---------------------------------------------------------------------


async def test_own_host_and_origin_are_let_in(srv: Running) -> None:
    assert (await _post(srv, INITIALIZE)).status_code == 200
    assert (await _post(srv, INITIALIZE, Origin="http://127.0.0.1")).status_code == 200


async def test_foreign_origin_is_refused(srv: Running) -> None:
    assert (await _post(srv, INITIALIZE, Origin="http://evil.example")).status_code == 403


async def test_foreign_host_is_refused(srv: Running) -> None:
    assert (await _post(srv, INITIALIZE, Host="evil.example")).status_code in (400, 403, 421)


async def test_allowed_hosts_and_origins_settings(instance: Instance) -> None:
    settings = Settings(allowed_hosts=["mcp.example"], allowed_origins=["https://app.example"])
    async for running in _running(instance, settings):
        assert (await _post(running, INITIALIZE, Host="mcp.example")).status_code == 200
        ok = await _post(running, INITIALIZE, Host="mcp.example", Origin="https://app.example")
        assert ok.status_code == 200
        assert (await _post(running, INITIALIZE, Origin="https://x.example")).status_code == 403


async def test_oversized_body_is_refused_before_parsing(instance: Instance) -> None:
    async for running in _running(instance, Settings(max_request_bytes=65536)):
        response = await _post(running, b"x" * 70000)
        assert response.status_code == 413
        assert "larger than 65536 bytes" in response.text


async def test_bearer_token_is_required_when_configured(authed: Running) -> None:
    assert (await _post(authed, INITIALIZE)).status_code == 401
    wrong = await _post(authed, INITIALIZE, Authorization="Bearer not-the-token")
    assert wrong.status_code == 401
    right = await _post(authed, INITIALIZE, Authorization=f"Bearer {TOKEN}")
    assert right.status_code == 200


async def test_metrics_need_the_token_but_health_does_not(authed: Running) -> None:
    async with authed.asgi.http_client() as http:
        assert (await http.get("/metrics")).status_code == 401
        good = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200
        assert (await http.get("/healthz")).text == "ok\n"
        # Without podman, create_app has nothing to ask: ready.
        assert (await http.get("/readyz")).status_code == 200


async def test_client_with_token_runs_commands(authed: Running) -> None:
    async with authed.client(legacy=True, auth=TOKEN) as client:
        assert (await sh(client, "echo hi"))["output"] == "echo hi"
    (call,) = authed.calls("shell_exec")
    # The audit trail names the principal by a hash, never by the token.
    assert call.principal is not None and TOKEN not in call.principal


async def test_refusal_says_how_to_authenticate(authed: Running) -> None:
    refused = await _post(authed, INITIALIZE)
    assert refused.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert authed.engine.started == []


# --- the two eras ----------------------------------------------------------------------


async def test_legacy_call_without_session_starts_one_sandbox(srv: Running) -> None:
    async with srv.client(legacy=True) as client:
        await sh(client, "true")
        await sh(client, "true")
        assert len(srv.engine.started) == 1
    # Both calls ran in the one implicit session, recorded as legacy.
    calls = srv.calls("shell_exec")
    assert [c.era for c in calls] == ["legacy", "legacy"]
    assert calls[0].session is not None and calls[0].session == calls[1].session


async def test_two_legacy_connections_get_two_sandboxes(srv: Running) -> None:
    async with srv.client(legacy=True) as a, srv.client(legacy=True) as b:
        await sh(a, "true")
        await sh(b, "true")
    assert len(set(srv.engine.started)) == 2


async def test_modern_call_without_session_is_refused_and_starts_nothing(srv: Running) -> None:
    async with srv.client() as client:
        result = await client.call_tool("shell_exec", {"command": "true"}, raise_on_error=False)
    assert "create_session" in error_text(result)
    assert srv.engine.started == []
    (call,) = srv.calls("shell_exec")
    assert call.era == "modern" and call.outcome == "error"


async def test_modern_session_create_use_end(srv: Running) -> None:
    async with srv.client() as client:
        sid = await new_session(client)
        assert len(sid) >= 32 and len(srv.engine.running) == 1
        assert (await sh(client, "echo x", session_id=sid))["output"] == "echo x"
        ended = structured(await client.call_tool("end_session", {"session_id": sid}))
        assert ended["ended"] is True and srv.engine.running == {}
        after = await client.call_tool(
            "shell_exec", {"command": "true", "session_id": sid}, raise_on_error=False
        )
        assert "ended" in error_text(after)


async def test_explicit_session_is_shared_across_eras(srv: Running) -> None:
    async with srv.client() as modern, srv.client(legacy=True) as legacy:
        sid = await new_session(modern)
        await sh(legacy, "true", session_id=sid)
    # One sandbox: the legacy call used the explicit session, not an implicit one.
    assert len(srv.engine.started) == 1


async def test_unknown_session_id_names_the_fix(srv: Running) -> None:
    async with srv.client() as client:
        result = await client.call_tool(
            "shell_exec", {"command": "true", "session_id": "nope"}, raise_on_error=False
        )
    text = error_text(result)
    assert "unknown session_id" in text and "create_session" in text


async def test_engine_failure_reaches_the_agent_as_text(srv: Running) -> None:
    srv.engine.fail_start = "podman run failed: no space left"
    async with srv.client() as client:
        result = await client.call_tool("create_session", {}, raise_on_error=False)
    assert "could not start a sandbox: podman run failed: no space left" in error_text(result)


# --- audit trail and metrics -----------------------------------------------------------


async def test_audit_records_a_command(srv: Running) -> None:
    async with srv.client() as client:
        sid = await new_session(client)
        await sh(client, "echo audited", session_id=sid)
    (call,) = srv.calls("shell_exec")
    assert (call.command, call.retval, call.outcome, call.era) == ("echo audited", 0, "ok",
                                                                   "modern")  # fmt: skip
    assert call.session == srv.calls("create_session")[0].session
    started = [e for e in srv.events if isinstance(e, audit.SandboxEvent)]
    assert [e.action for e in started] == ["started"]


async def test_audit_cuts_long_commands_to_the_setting(instance: Instance) -> None:
    async for running in _running(instance, Settings(audit_command_chars=5)):
        async with running.client(legacy=True) as client:
            await sh(client, "echo 0123456789")
        (call,) = running.calls("shell_exec")
        assert call.command is not None and len(call.command) <= 6
        assert call.command_chars == len("echo 0123456789")


async def test_metrics_count_tool_calls_and_sandboxes(srv: Running) -> None:
    async with srv.client(legacy=True) as client:
        await sh(client, "true")
        await client.call_tool("read_job", {"job_id": "nope"}, raise_on_error=False)
    async with srv.asgi.http_client() as http:
        text = (await http.get("/metrics")).text
    assert 'tool="shell_exec"' in text and 'outcome="ok"' in text and 'era="legacy"' in text
    assert 'tool="read_job"' in text and 'outcome="error"' in text
    started = [line for line in text.splitlines() if "sandbox_starts" in line and "{" in line]
    assert started and any(line.split()[-1] == "1.0" for line in started)


# --- every tool's argument checks ------------------------------------------------------

BAD_ARGUMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("shell_exec", {}, "command"),
    ("shell_exec", {"command": 5}, "command"),
    ("shell_exec", {"command": "a\x00b"}, "NUL byte"),
    ("shell_exec", {"command": "x" * 100_001}, "bytes"),
    ("shell_exec", {"command": "true", "timeout": -1}, "timeout"),
    ("shell_exec", {"command": "true", "timeout": 10**9}, "timeout"),
    ("shell_exec", {"command": "true", "timeout": "soon"}, "timeout"),
    ("shell_exec", {"command": "true", "session_id": ""}, "session_id"),
    ("shell_exec", {"command": "true", "bogus": 1}, "bogus"),
    ("create_session", {"egress_allow": "example.com"}, "egress_allow"),
    ("create_session", {"egress_deny": [5]}, "egress_deny"),
    ("end_session", {}, "session_id"),
    ("end_session", {"session_id": ""}, "session_id"),
    ("end_session", {"session_id": "nope"}, "unknown session_id"),
    ("start_job", {}, "command"),
    ("start_job", {"command": "a\x00b"}, "NUL byte"),
    ("read_job", {}, "job_id"),
    ("read_job", {"job_id": "nope"}, "job"),
    ("read_job", {"job_id": "nope", "wait": -1}, "wait"),
    ("read_job", {"job_id": "nope", "wait": 10**6}, "wait"),
    ("stop_job", {}, "job_id"),
    ("stop_job", {"job_id": "nope"}, "job"),
    ("read_file", {}, "path"),
    ("read_file", {"path": "f", "encoding": "utf-16"}, "encoding"),
    ("read_file", {"path": "f", "offset": "one"}, "offset"),
    ("write_file", {"path": "f"}, "content"),
    ("write_file", {"content": "x"}, "path"),
    ("write_file", {"path": "f", "content": "!!", "encoding": "base64"}, "base64"),
    ("write_file", {"path": "f", "content": "x", "encoding": "rot13"}, "encoding"),
    ("shell_exec", {"command": "true", "background_after": -1}, "background_after"),
    ("shell_exec", {"command": "true", "idempotency_key": ""}, "idempotency_key"),
    ("shell_exec", {"command": "true", "idempotency_key": "x" * 201}, "idempotency_key"),
    ("edit_file", {"path": "f", "old": "a"}, "new"),
    ("edit_file", {"path": "f", "new": "a"}, "old"),
    ("edit_file", {"path": "f", "old": "", "new": "a"}, "old must be"),
    ("create_session", {"snapshot_id": "snap_nope"}, "unknown snapshot_id"),
    ("create_session", {"snapshot_id": "../x"}, "malformed"),
    ("snapshot_session", {"memory": True}, "file-system snapshots only"),
    ("snapshot_session", {"memory": "lots"}, "memory"),
    ("snapshot_session", {"session_id": "nope"}, "unknown session_id"),
    ("list_snapshots", {"bogus": 1}, "bogus"),
    ("delete_snapshot", {}, "snapshot_id"),
    ("delete_snapshot", {"snapshot_id": "snap_nope"}, "unknown snapshot_id"),
    ("delete_snapshot", {"snapshot_id": "a/b"}, "malformed"),
    ("fork_session", {"count": 0}, "count"),
    ("fork_session", {"count": 9}, "count"),
    ("fork_session", {"count": "two"}, "count"),
    ("fork_session", {"session_id": "nope"}, "unknown session_id"),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    BAD_ARGUMENTS,
    ids=[f"{tool}-{i}" for i, (tool, _, _) in enumerate(BAD_ARGUMENTS)],
)
async def test_bad_arguments_give_a_clear_tool_error(
    srv: Running, tool: str, arguments: dict[str, Any], expected: str
) -> None:
    async with srv.client(legacy=True) as client:
        result = await client.call_tool(tool, arguments, raise_on_error=False)
    assert expected.lower() in error_text(result).lower()
    # A refused call never starts a sandbox for nothing, and is audited as an error.
    (call,) = srv.calls(tool)
    assert call.outcome == "error"


async def test_every_tool_has_argument_checks_here(srv: Running) -> None:
    async with srv.client(legacy=True) as client:
        tools = {t.name for t in await client.list_tools()}
    assert tools == {tool for tool, _, _ in BAD_ARGUMENTS}


async def test_file_tools_round_trip_through_the_app(srv: Running) -> None:
    async with srv.client(legacy=True) as client:
        text = await client.call_tool("read_file", {"path": "f", "offset": -1},
                                      raise_on_error=False)  # fmt: skip
        assert "offset is a line number from 1" in error_text(text)
        b64 = await client.call_tool(
            "read_file", {"path": "f", "encoding": "base64", "limit": 10**9}, raise_on_error=False
        )
        assert "with encoding base64" in error_text(b64)


# --- snapshots and forks (file system only) --------------------------------------------

SECOND = "token-inprocess-second-456789abcdef"


async def _snapshot(client: Client, sid: str) -> dict[str, Any]:
    return structured(await client.call_tool("snapshot_session", {"session_id": sid}))


async def test_snapshot_list_restore_fork_delete(srv: Running) -> None:
    async with srv.client() as client:
        sid = await new_session(client)
        taken = await _snapshot(client, sid)
        assert taken["snapshot_id"].startswith("snap_") and len(taken["snapshot_id"]) >= 24
        assert taken["size"] == srv.engine.snapshot_size and taken["took"] >= 0
        listed = structured(await client.call_tool("list_snapshots", {}))["snapshots"]
        assert [s["snapshot_id"] for s in listed] == [taken["snapshot_id"]]
        assert listed[0]["created"].endswith("+00:00")
        (kept,) = srv.engine.snapshots
        restored = structured(
            await client.call_tool("create_session", {"snapshot_id": taken["snapshot_id"]})
        )["session_id"]
        forks = structured(await client.call_tool("fork_session", {"session_id": sid, "count": 2}))[
            "session_ids"
        ]
        assert len(set(forks) | {sid, restored}) == 4
        images = [spec.image for spec in srv.engine.running.values()]
        # The source and the forks' passing copy: the forks started from the copy, which
        # is gone; the restored session started from the kept snapshot.
        assert images.count(kept) == 1 and images.count(Settings().image) == 1
        assert list(srv.engine.snapshots) == [kept]
        for fork in forks:
            assert (await sh(client, "echo in-fork", session_id=fork))["retval"] == 0
        deleted = await client.call_tool("delete_snapshot", {"snapshot_id": taken["snapshot_id"]})
        assert structured(deleted)["deleted"] is True and srv.engine.snapshots == {}
        assert structured(await client.call_tool("list_snapshots", {}))["snapshots"] == []
        again = await client.call_tool(
            "create_session", {"snapshot_id": taken["snapshot_id"]}, raise_on_error=False
        )
        assert "unknown snapshot_id" in error_text(again)
        # The source session was never touched.
        assert (await sh(client, "echo source", session_id=sid))["retval"] == 0


async def test_another_principal_cannot_see_or_use_a_snapshot(instance: Instance) -> None:
    settings = Settings(auth_token=f"{TOKEN},{SECOND}")
    async for running in _running(instance, settings, auth_provider(settings)):
        async with running.client(auth=TOKEN) as mine, running.client(auth=SECOND) as other:
            sid = await new_session(mine)
            snapshot_id = (await _snapshot(mine, sid))["snapshot_id"]
            assert structured(await other.call_tool("list_snapshots", {}))["snapshots"] == []
            for tool, arguments in (
                ("create_session", {"snapshot_id": snapshot_id}),
                ("delete_snapshot", {"snapshot_id": snapshot_id}),
                ("snapshot_session", {"session_id": sid}),
                ("fork_session", {"session_id": sid}),
            ):
                refused = await other.call_tool(tool, arguments, raise_on_error=False)
                assert "unknown" in error_text(refused), tool
            assert len(running.engine.snapshots) == 1 and len(running.engine.running) == 1
            listed = structured(await mine.call_tool("list_snapshots", {}))["snapshots"]
            assert [s["snapshot_id"] for s in listed] == [snapshot_id]


async def test_snapshot_bounds_give_clear_errors(instance: Instance) -> None:
    settings = Settings(max_snapshots_per_principal=1, max_snapshot_bytes="1500")
    async for running in _running(instance, settings):
        async with running.client() as client:
            sid = await new_session(client)
            await _snapshot(client, sid)
            second = await client.call_tool(
                "snapshot_session", {"session_id": sid}, raise_on_error=False
            )
            assert "maximum of 1 snapshots" in error_text(second)
            assert "POD_EXEC_MCP_MAX_SNAPSHOTS_PER_PRINCIPAL" in error_text(second)
            assert len(running.engine.snapshots) == 1
    async for running in _running(instance, Settings(max_snapshot_bytes="1500")):
        async with running.client() as client:
            sid = await new_session(client)
            await _snapshot(client, sid)
            # 1000 + 1000 bytes would pass 1500: the second is taken, then not kept.
            over = await client.call_tool(
                "snapshot_session", {"session_id": sid}, raise_on_error=False
            )
            text = error_text(over)
            assert "1000 bytes of the 1500 allowed" in text and "not kept" in text
            assert len(running.engine.snapshots) == 1
    async for running in _running(instance, Settings(max_snapshots_per_principal=0)):
        async with running.client() as client:
            sid = await new_session(client)
            off = await client.call_tool(
                "snapshot_session", {"session_id": sid}, raise_on_error=False
            )
            assert "turned off" in error_text(off)
            # Forks still work: their passing copy does not stay.
            forks = await client.call_tool("fork_session", {"session_id": sid})
            assert len(structured(forks)["session_ids"]) == 1
            assert running.engine.snapshots == {}


async def test_forks_count_against_the_sandbox_limits(instance: Instance) -> None:
    async for running in _running(instance, Settings(max_sandboxes=2)):
        async with running.client() as client:
            sid = await new_session(client)
            refused = await client.call_tool(
                "fork_session", {"session_id": sid, "count": 2}, raise_on_error=False
            )
            text = error_text(refused)
            assert "cannot fork 2 session(s)" in text and "maximum of 2 sandboxes" in text
            # Refused before any copy was made, and nothing was started.
            assert running.engine.snapshots == {} and len(running.engine.started) == 1
            forks = structured(await client.call_tool("fork_session", {"session_id": sid}))
            assert len(forks["session_ids"]) == 1 and len(running.engine.running) == 2


async def test_failed_snapshot_and_strict_servers_say_why(instance: Instance) -> None:
    async for running in _running(instance, Settings()):
        running.engine.fail_snapshot = "podman import failed: no space left on device"
        async with running.client() as client:
            sid = await new_session(client)
            failed = await client.call_tool(
                "snapshot_session", {"session_id": sid}, raise_on_error=False
            )
            assert "no space left on device" in error_text(failed)
            forked = await client.call_tool(
                "fork_session", {"session_id": sid}, raise_on_error=False
            )
            assert "no space left on device" in error_text(forked)
            # The failed fork's session is gone: only the source runs.
            assert len(running.engine.running) == 1
    async for running in _running(instance, Settings(strict=True)):
        async with running.client() as client:
            sid = await new_session(client)
            for tool in ("snapshot_session", "fork_session"):
                refused = await client.call_tool(tool, {"session_id": sid}, raise_on_error=False)
                assert "tmpfs" in error_text(refused), tool


async def test_memory_snapshots_are_refused_and_described(srv: Running) -> None:
    async with srv.client() as client:
        tools = {t.name: t for t in await client.list_tools()}
        sid = await new_session(client)
        refused = await client.call_tool(
            "snapshot_session", {"session_id": sid, "memory": True}, raise_on_error=False
        )
    assert "file-system snapshots only" in error_text(refused) and srv.engine.snapshots == {}
    for name in ("snapshot_session", "fork_session"):
        assert "FILE-SYSTEM ONLY" in (tools[name].description or "")
