"""Idle legacy MCP sessions cannot lock working clients out (issue 22, item 7).

The rule is tested on its own with a clock of the test's (no podman, no HTTP); then a real
server is flooded with initializes that are never used, and a real legacy client still
gets in and runs a command.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from conftest import FIGURES, sh
from harness import INITIALIZE, JSON_HEADERS

from pod_exec_mcp.config import Settings
from pod_exec_mcp.legacy_sessions import Client, LegacySessions

ALICE = Client("alice", "192.0.2.7")
BOB = Client("bob", "192.0.2.8")


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(**settings: Any) -> tuple[LegacySessions, list[str], Clock]:
    clock = Clock()
    sessions = LegacySessions(Settings(**settings), clock)
    closed: list[str] = []
    sessions._close = closed.append
    return sessions, closed, clock


def open_(sessions: LegacySessions, session_id: str, client: Client) -> None:
    assert sessions.refusal(client) is None
    sessions.make_room(client)
    sessions.opened(session_id, client)


def test_at_the_cap_the_oldest_unused_session_gives_way() -> None:
    sessions, closed, _ = guard(max_legacy_sessions=3, max_legacy_sessions_per_client=3)
    for n in range(3):
        open_(sessions, f"s{n}", ALICE)
    sessions.used("s0")
    open_(sessions, "s3", BOB)
    assert closed == ["s1"]  # s0 works: it made a call
    sessions.used("s2")
    sessions.used("s3")
    refused = sessions.refusal(BOB)
    assert refused is not None and "the server already holds" in refused
    assert "MAX_LEGACY_SESSIONS" in refused and "all in use" in refused


def test_unused_sessions_expire_and_used_ones_do_not() -> None:
    sessions, closed, clock = guard(legacy_unused_timeout=60)
    open_(sessions, "idle", ALICE)
    open_(sessions, "working", ALICE)
    sessions.used("working")
    clock.now += 59
    assert sessions.expire() == 0
    clock.now += 2
    assert sessions.expire() == 1 and closed == ["idle"]
    clock.now += 10_000
    assert sessions.expire() == 0


def test_one_principal_or_address_cannot_take_every_place() -> None:
    sessions, closed, _ = guard(max_legacy_sessions=10, max_legacy_sessions_per_client=2)
    open_(sessions, "a1", ALICE)
    open_(sessions, "a2", ALICE)
    open_(sessions, "a3", ALICE)  # alice's oldest unused gives way, not bob's places
    assert closed == ["a1"]
    sessions.used("a2")
    sessions.used("a3")
    refused = sessions.refusal(ALICE)
    assert refused is not None and "this token already holds" in refused
    assert sessions.refusal(BOB) is None
    # Another token from the same address shares the address's share.
    mallory = Client("mallory", ALICE.address)
    assert sessions.refusal(mallory) is not None
    sessions.closed("a2")  # DELETE by the client
    assert sessions.refusal(ALICE) is None


def test_loopback_clients_share_no_per_address_bound() -> None:
    # Every client on this host is 127.0.0.1: a per-address bound would halve the cap.
    sessions, closed, _ = guard(max_legacy_sessions=4)
    for n in range(4):
        open_(sessions, f"s{n}", Client(None, "127.0.0.1"))
        sessions.used(f"s{n}")
    assert closed == []


async def test_idle_initializes_do_not_lock_out_a_real_legacy_client(launch: Any) -> None:
    cap = 50
    server = launch("--max-legacy-sessions", str(cap))
    statuses: dict[int, int] = {}
    # A working client, connected before the flood, keeps its session through it.
    async with httpx.AsyncClient(timeout=30) as raw, server.client(legacy=True) as early:
        assert (await sh(early, "echo early"))["retval"] == 0
        for _ in range(20 * cap):
            response = await raw.post(
                server.url, content=json.dumps(INITIALIZE), headers=JSON_HEADERS
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        async with server.client(legacy=True) as late:
            assert (await sh(late, "echo in"))["output"] == "in\n"
        assert (await sh(early, "echo still"))["output"] == "still\n"
    FIGURES[f"{20 * cap} idle legacy initializes, cap {cap}"] = f"HTTP statuses {statuses}"
    assert statuses == {200: 20 * cap}
    server.stop()
