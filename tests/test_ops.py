"""What an operator relies on (issue 14): the logs and their audit trail, /metrics, the health
endpoints, settings refused at start, and --list-containers. All against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    IMAGE,
    ServerProcess,
    error_text,
    new_session,
    podman,
    run_cli,
    sh,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from pod_exec_mcp import __version__
from pod_exec_mcp.auth import principal_of

TOKEN = "ops-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEX32 = r"^[0-9a-f]{32}$"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def ops(launch: Any) -> Iterator[ServerProcess]:
    """One server with auth on and JSON logs (its output is not a terminal: auto is json)."""
    server = launch("--audit-command-chars", "24", env={"POD_EXEC_MCP_AUTH_TOKEN": TOKEN})
    yield server
    server.stop()


def log_events(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line of the server's log, parsed: each one must be a JSON object."""
    events = []
    for number, line in enumerate(server.log().splitlines(), 1):
        event = json.loads(line)  # a line that is not JSON fails the test here
        assert isinstance(event, dict), f"line {number} is not an object: {line}"
        events.append(event)
    return events


def audit(server: ServerProcess, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in log_events(server)
        if e.get("logger") == "pod_exec_mcp.audit" and all(e.get(k) == v for k, v in match.items())
    ]


def get(server: ServerProcess, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{server.port}{path}", headers=headers, timeout=30)


def scrape(server: ServerProcess) -> Samples:
    response = get(server, "/metrics", **AUTH)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples) -> dict[str, float]:
    """Every sample that changed, as `name{labels}`: its change."""
    changes = {}
    for key in set(before) | set(after):
        delta = after.get(key, 0.0) - before.get(key, 0.0)
        if delta and not key[0].endswith(("_created", "_sum", "_bucket")):
            name, labels = key
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels))
            changes[f"{name}{{{shown}}}"] = round(delta, 6)
    return changes


# --- logs and the audit trail --------------------------------------------------------------


async def test_json_logs_carry_the_audit_trail_of_both_eras(ops: ServerProcess) -> None:
    principal = principal_of(TOKEN)
    async with ops.client(legacy=True, auth=TOKEN) as legacy, ops.client(auth=TOKEN) as modern:
        assert (await sh(legacy, "echo legacy-call"))["retval"] == 0
        sid = await new_session(modern)
        long_command = "echo modern-call; exit 3  # and a long tail that is cut"
        assert (await sh(modern, long_command, session_id=sid))["retval"] == 3
        timed = await sh(modern, "sleep 30", session_id=sid, timeout=1)
        assert timed["timed_out"]
        refused = await modern.call_tool(
            "shell_exec", {"command": "true", "session_id": "no-such"}, raise_on_error=False
        )
        assert "unknown session_id" in error_text(refused)
        await modern.call_tool("end_session", {"session_id": sid})

    (old,) = audit(ops, event="tool_call", era="legacy")
    assert old["tool"] == "shell_exec" and old["principal"] == principal
    assert old["command"] == "echo legacy-call" and old["command_chars"] == 16
    assert (old["retval"], old["timed_out"], old["truncated"], old["outcome"]) == (
        0,
        False,
        False,
        "ok",
    )
    for field in ("duration", "exec_duration", "queue_wait"):
        assert isinstance(old[field], float) and old[field] >= 0, field
    assert old["time"].endswith("Z") and old["level"] == "info"
    legacy_start = audit(ops, event="sandbox_started", session=old["session"])
    assert [e["reason"] for e in legacy_start] == ["new"]

    calls = audit(ops, event="tool_call", era="modern")
    assert [c["tool"] for c in calls] == [
        "create_session",
        "shell_exec",
        "shell_exec",
        "shell_exec",
        "end_session",
    ]
    created, ran, timed_out, unknown, ended = calls
    key = created["session"]
    assert key != old["session"] and all(c["principal"] == principal for c in calls)
    assert [c["session"] for c in (ran, timed_out, ended)] == [key, key, key]
    assert ran["command"] == long_command[:24] + "…" and ran["command_chars"] == len(long_command)
    assert (ran["retval"], ran["outcome"]) == (3, "ok")
    assert (timed_out["retval"], timed_out["timed_out"], timed_out["outcome"]) == (
        124,
        True,
        "timed_out",
    )
    assert unknown["outcome"] == "error" and "unknown session_id" in unknown["error"]
    assert unknown["session"] is None and "retval" not in unknown
    # The session's whole history, as the README's jq example reconstructs it.
    history = [e["event"] for e in log_events(ops) if e.get("session") == key]
    assert history == [
        "sandbox_started",
        "tool_call",
        "tool_call",
        "tool_call",
        "sandbox_removed",
        "tool_call",
    ]
    (removed,) = audit(ops, event="sandbox_removed", session=key)
    assert removed["reason"] == "ended by end_session"
    assert removed["container"].startswith("pod_exec_mcp-") and key[:12] in removed["container"]
    # Hashes only: neither the token nor the session id the client holds is ever logged.
    assert TOKEN not in ops.log() and sid not in ops.log()
    assert re.match(HEX32, key) and re.match(HEX32, old["session"])


async def test_command_text_is_left_out_when_turned_off(launch: Any) -> None:
    server = launch("--audit-command-chars", "0", "--log-format", "text")
    async with server.client(legacy=True) as client:
        assert (await sh(client, "echo private-words"))["output"] == "private-words\n"
    server.stop()
    log = server.log()
    lines = [line for line in log.splitlines() if "pod_exec_mcp.audit: tool_call" in line]
    assert len(lines) == 1 and "command_chars=18" in lines[0] and "command=" not in lines[0]
    assert "private-words" not in log
    # Text format: every event on one line that starts with its time and level.
    assert all(line[:4].isdigit() and "Z " in line[:30] for line in log.splitlines()), log


# --- metrics -------------------------------------------------------------------------------


async def test_metrics_parse_and_count_each_call_exactly_once(ops: ServerProcess) -> None:
    assert get(ops, "/metrics").status_code == 401
    assert get(ops, "/metrics", Authorization="Bearer wrong-token-0123456789").status_code == 401
    first = scrape(ops)
    assert value(first, "pod_exec_mcp_exec_slots") == 16
    assert value(first, "pod_exec_mcp_build_info", version=__version__) == 1

    async with ops.client(legacy=True, auth=TOKEN) as legacy:
        before = scrape(ops)
        await sh(legacy, "true")
        after = scrape(ops)
        assert moved(before, after) == {
            "pod_exec_mcp_tool_calls_total{era=legacy,outcome=ok,tool=shell_exec}": 1,
            "pod_exec_mcp_sandbox_starts_total{reason=new}": 1,
            "pod_exec_mcp_command_duration_seconds_count{}": 1,
            "pod_exec_mcp_exec_queue_wait_seconds_count{}": 1,
            "pod_exec_mcp_sessions{era=legacy}": 1,
            "pod_exec_mcp_sandboxes{role=session}": 1,
        }
        before = after
        await sh(legacy, "sleep 30", timeout=1)
        after = scrape(ops)
        assert moved(before, after) == {
            "pod_exec_mcp_tool_calls_total{era=legacy,outcome=timed_out,tool=shell_exec}": 1,
            "pod_exec_mcp_command_timeouts_total{}": 1,
            "pod_exec_mcp_command_kills_total{reason=timeout}": 1,
            "pod_exec_mcp_command_duration_seconds_count{}": 1,
            "pod_exec_mcp_exec_queue_wait_seconds_count{}": 1,
        }

    # The legacy client's DELETE ends its session: let that settle before counting on.
    def legacy_removed() -> bool:
        now = scrape(ops)
        removed = ("pod_exec_mcp_sandbox_removals_total", "mcp_session_ended")
        return value(now, removed[0], reason=removed[1]) == 1 + value(
            first, removed[0], reason=removed[1]
        )

    assert await asyncio.to_thread(wait_until, legacy_removed, 90)
    async with ops.client(auth=TOKEN) as modern:
        before = scrape(ops)
        sid = await new_session(modern)
        after = scrape(ops)
        changes = moved(before, after)
        assert changes == {
            "pod_exec_mcp_tool_calls_total{era=modern,outcome=ok,tool=create_session}": 1,
            "pod_exec_mcp_sandbox_starts_total{reason=new}": 1,
            "pod_exec_mcp_sessions{era=modern}": 1,
            "pod_exec_mcp_sandboxes{role=session}": 1,
        }
        before = after
        await modern.call_tool("end_session", {"session_id": sid})
        after = scrape(ops)
        changes = moved(before, after)
        assert changes == {
            "pod_exec_mcp_tool_calls_total{era=modern,outcome=ok,tool=end_session}": 1,
            "pod_exec_mcp_sandbox_removals_total{reason=end_session}": 1,
            "pod_exec_mcp_sessions{era=modern}": -1,
            "pod_exec_mcp_sandboxes{role=session}": -1,
        }


async def test_a_cancelled_command_is_audited_and_counted_as_a_kill(ops: ServerProcess) -> None:
    before = scrape(ops)
    async with ops.client(legacy=True, auth=TOKEN) as legacy:
        await sh(legacy, "true")  # the sandbox exists, so the next call starts its command
        running = asyncio.create_task(
            legacy.call_tool("shell_exec", {"command": "sleep 60 # cancel-me"})
        )

        def started() -> bool:
            return any(
                "sleep 60" in podman("top", c["Id"], "args", check=False).stdout
                for c in ops.containers()
            )

        # Cancel only once the command runs in the sandbox (not while it is on its way).
        assert await asyncio.to_thread(wait_until, started, 30)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

        def counted() -> bool:
            return bool(audit(ops, event="tool_call", outcome="cancelled"))

        assert await asyncio.to_thread(wait_until, counted, 30)
    (event,) = audit(ops, event="tool_call", outcome="cancelled")
    assert event["command"] == "sleep 60 # cancel-me" and event["error"]
    changes = moved(before, scrape(ops))
    assert changes["pod_exec_mcp_command_kills_total{reason=cancelled}"] == 1
    assert (
        changes["pod_exec_mcp_tool_calls_total{era=legacy,outcome=cancelled,tool=shell_exec}"] == 1
    )


# --- health --------------------------------------------------------------------------------


def test_health_endpoints_answer_without_auth(ops: ServerProcess) -> None:
    for path in ("/healthz", "/readyz"):
        response = get(ops, path)
        assert (response.status_code, response.text) == (200, "ok\n"), path


def test_readyz_fails_when_the_image_is_removed(launch: Any) -> None:
    tag = f"pod_exec_mcp_ops_tmp_{os.getpid()}"
    podman("tag", IMAGE, tag)
    try:
        server = launch(env={"POD_EXEC_MCP_IMAGE": tag})
        assert get(server, "/readyz").status_code == 200
    finally:
        podman("rmi", tag)  # only the tag goes: IMAGE still names the image
    # Readiness is cached for a few seconds; it turns within a bounded time.
    assert wait_until(lambda: get(server, "/readyz").status_code == 503, 30)
    response = get(server, "/readyz")
    assert response.text == "not ok\n"  # no details over HTTP ...
    assert get(server, "/healthz").status_code == 200  # ... and the process still serves
    assert any(
        e["event"].startswith("not ready") and tag in e["event"] for e in log_events(server)
    )  # ... the reason is in the log
    assert server.stop() == 0


# --- settings checked at start -------------------------------------------------------------


def one_line(done: Any) -> str:
    assert done.returncode != 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "serving" not in done.stderr and done.stdout == ""
    return lines[0]


def refused_with(server_env: dict[str, str], *args: str) -> str:
    """Start a server that must refuse; returns its one line, after checking that its port
    never accepted a connection while it ran."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = run_cli(server_env, "--port", str(port), *args)
    with socket.socket() as after:
        assert after.connect_ex(("127.0.0.1", port)) != 0
    return one_line(done)


def test_a_malformed_size_is_refused_before_anything_starts(server_env: dict[str, str]) -> None:
    line = refused_with(server_env, "--memory", "2x")
    assert "--memory / POD_EXEC_MCP_MEMORY" in line and "'2x'" in line
    line = refused_with(server_env, "--strict", "--tmpfs-size", "lots")
    assert "--tmpfs-size / POD_EXEC_MCP_TMPFS_SIZE" in line


def test_settings_podman_refuses_are_found_at_start(server_env: dict[str, str]) -> None:
    # Well-formed, but below what the runtime can set: only a real start finds out.
    line = json.loads(refused_with(server_env, "--memory", "1k"))
    assert line["level"] == "critical"
    assert "--memory / POD_EXEC_MCP_MEMORY" in line["event"] and "podman said" in line["event"]
    # Without a disk limit too (no loop disk then, where the host gives them): the check
    # still starts its sandbox rather than only creating it.
    for without_disk_limit in (["--strict"], ["--disk-limit", "0"]):
        line = json.loads(refused_with(server_env, "--memory", "1k", *without_disk_limit))
        assert "--memory / POD_EXEC_MCP_MEMORY" in line["event"], without_disk_limit
    line = json.loads(refused_with(server_env, "--extra-run-args=--no-such-flag"))
    assert "--extra-run-args / POD_EXEC_MCP_EXTRA_RUN_ARGS" in line["event"]
    assert "--no-such-flag" in line["event"]
    # The throw-away sandbox of the check is gone.
    assert podman("ps", "-aq", "--filter", "label=io.pod_exec_mcp.session=preflight").stdout == ""


def test_a_taken_port_is_one_line_before_serving(server_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(server_env, "--port", str(port))
    line = json.loads(one_line(done))
    assert f"port {port}" in line["event"] and "--port / MCP_PORT" in line["event"]


# --- --list-containers ---------------------------------------------------------------------


async def test_list_containers_shows_age_last_use_kind_and_owner(
    ops: ServerProcess, server_env: dict[str, str], tmp_path: Path
) -> None:
    earlier = {c["Names"][0] for c in ops.containers()}  # earlier tests' may still be going
    async with ops.client(legacy=True, auth=TOKEN) as legacy, ops.client(auth=TOKEN) as modern:
        await sh(legacy, "true")
        sid = await new_session(modern)
        names = {c["Names"][0] for c in ops.containers()} - earlier
        assert len(names) == 2

        def rows(env: dict[str, str]) -> dict[str, list[str]]:
            done = run_cli(env, "--list-containers")
            assert done.returncode == 0, done.stderr
            lines = done.stdout.splitlines()
            assert lines[0].split() == [
                "CONTAINER", "NAME", "STATE", "AGE", "LAST", "USE", "KIND", "SERVER"
            ]  # fmt: skip
            return {line.split()[1]: line.split() for line in lines[1:] if line.split()[1] in names}

        # The server records kind and last use every few seconds.
        assert await asyncio.to_thread(
            wait_until,
            lambda: {r[6] for r in rows(server_env).values()} == {"legacy", "explicit"},
            20,
        )
        for row in rows(server_env).values():
            assert row[2] == "running" and row[3][-1] in "smh" and row[5] == "ago"
            assert row[7:] == ["server", "alive"]
        # From another state dir, the same containers belong to "another state dir".
        other = {**server_env, "XDG_STATE_HOME": str(tmp_path / "state")}
        for row in rows(other).values():
            assert row[4:] == ["-", "?", "another", "state", "dir"]
        await modern.call_tool("end_session", {"session_id": sid})
