"""The sessions layer's pure logic against an in-memory engine: no podman needed.

Limits, error texts, the warm pool, reaping, recovery and fairness. What touches real
containers is tested end to end in the other files.
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine

from pod_exec_mcp.config import Settings
from pod_exec_mcp.engine import EngineError, RunResult, Sandbox
from pod_exec_mcp.instances import Instance
from pod_exec_mcp.pool import max_pooled_age
from pod_exec_mcp.sessions import SessionError, Sessions, describe_seconds
from pod_exec_mcp.slots import ExecSlots


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Instance]:
    found = Instance.acquire(tmp_path)
    yield found
    found.release()


def make(instance: Instance, **settings: Any) -> tuple[Sessions, FakeEngine]:
    engine = FakeEngine()
    return Sessions(engine, Settings(**settings), instance), engine


async def test_explicit_session_runs_and_ends(instance: Instance) -> None:
    sessions, engine = make(instance)
    sid = await sessions.create_explicit(None)
    assert len(engine.running) == 1
    session = sessions.explicit(None, sid)
    result = await sessions.run(session, "echo hi", 5)
    assert (result.output, result.retval) == ("echo hi", 0)
    await sessions.end(session, "ended by end_session")
    assert engine.running == {}
    with pytest.raises(SessionError, match=r"has ended .ended by end_session."):
        sessions.explicit(None, sid)
    with pytest.raises(SessionError, match=r"unknown session_id 'nope'.*create_session"):
        sessions.explicit(None, "nope")


async def test_another_principal_cannot_see_a_session(instance: Instance) -> None:
    sessions, _ = make(instance)
    sid = await sessions.create_explicit("alice")
    with pytest.raises(SessionError, match="unknown session_id"):
        sessions.explicit("mallory", sid)


async def test_sandbox_limit_and_per_principal_cap(instance: Instance) -> None:
    sessions, _ = make(instance, max_sandboxes=4)
    await sessions.create_explicit("a")
    await sessions.create_explicit("a")
    with pytest.raises(SessionError, match="this client already holds its maximum of 2"):
        await sessions.create_explicit("a")
    await sessions.create_explicit("b")
    await sessions.create_explicit(None)  # no auth: only the server-wide limit applies
    with pytest.raises(SessionError, match=r"maximum of 4 sandboxes.*MAX_SANDBOXES"):
        await sessions.create_explicit("c")


async def test_failed_start_frees_the_slot(instance: Instance) -> None:
    sessions, engine = make(instance, max_sandboxes=1)
    engine.fail_start = "podman run failed: invalid size"
    with pytest.raises(SessionError, match="could not start a sandbox: podman run failed"):
        await sessions.create_explicit(None)
    engine.fail_start = None
    await sessions.create_explicit(None)


async def test_legacy_lookup_is_named_and_started_once(instance: Instance) -> None:
    sessions, engine = make(instance)
    first = sessions.legacy(None, "mcp-1")
    assert first.is_new and first.replaced_because is None
    again = sessions.legacy(None, "mcp-1")
    assert not again.is_new and again.session is first.session
    await asyncio.gather(*(sessions.run(first.session, "true", 5) for _ in range(5)))
    assert len(engine.started) == 1


async def test_reaped_legacy_session_says_why_once(instance: Instance) -> None:
    sessions, engine = make(instance, idle_timeout=8)
    found = sessions.legacy(None, "mcp-1")
    await sessions.run(found.session, "true", 5)
    found.session.last_used -= 10
    assert await sessions.reap_idle() == 1
    assert engine.running == {}
    told = sessions.legacy(None, "mcp-1")
    assert told.is_new and told.replaced_because == "idle for over 8 s"
    assert sessions.legacy(None, "mcp-1").replaced_because is None


async def test_busy_session_is_not_reaped(instance: Instance) -> None:
    sessions, engine = make(instance, idle_timeout=1)
    sid = await sessions.create_explicit(None)
    session = sessions.explicit(None, sid)
    release = asyncio.Event()

    async def slow(*_: object) -> None:
        await release.wait()

    engine.behaviour["slow"] = slow
    running = asyncio.create_task(sessions.run(session, "slow", 60))
    await asyncio.sleep(0)
    session.last_used -= 100
    assert await sessions.reap_idle() == 0
    release.set()
    await running


async def test_gone_sandbox_is_replaced_and_the_agent_told(instance: Instance) -> None:
    sessions, engine = make(instance)
    sid = await sessions.create_explicit(None)
    session = sessions.explicit(None, sid)
    engine.running.clear()  # removed from outside
    with pytest.raises(SessionError, match=r"broke .*fresh sandbox was started.*lost"):
        await sessions.run(session, "true", 5)
    assert len(engine.running) == 1
    assert (await sessions.run(session, "true", 5)).retval == 0


async def test_engine_failure_keeps_the_sandbox(instance: Instance) -> None:
    sessions, engine = make(instance)
    sid = await sessions.create_explicit(None)
    session = sessions.explicit(None, sid)

    def flaky(*_: object) -> None:
        raise EngineError("podman exec failed: exit status 125")

    engine.behaviour["flaky"] = flaky
    with pytest.raises(SessionError, match=r"podman failed .*intact: run the command again"):
        await sessions.run(session, "flaky", 5)
    assert engine.removed == [] and len(engine.running) == 1


async def test_unkillable_command_replaces_the_sandbox_and_says_so(instance: Instance) -> None:
    sessions, engine = make(instance)
    sid = await sessions.create_explicit(None)
    session = sessions.explicit(None, sid)
    engine.behaviour["bomb"] = lambda *_: RunResult("x", 124, False, True, 1.0, unkillable=True)
    result = await sessions.run(session, "bomb", 1)
    assert result.timed_out and "could not be killed" in result.output
    assert "fresh sandbox was started" in result.output
    assert len(engine.removed) == 1 and len(engine.running) == 1


async def test_replacement_that_cannot_start_ends_the_session(instance: Instance) -> None:
    sessions, engine = make(instance)
    sid = await sessions.create_explicit(None)
    session = sessions.explicit(None, sid)
    engine.running.clear()
    engine.fail_start = "out of space"
    with pytest.raises(SessionError, match=r"could not be started.*This session has ended"):
        await sessions.run(session, "true", 5)
    with pytest.raises(SessionError, match="has ended"):
        sessions.explicit(None, sid)


async def test_one_session_cannot_take_every_exec_slot(instance: Instance) -> None:
    sessions, engine = make(instance, max_concurrent_execs=4, max_execs_per_session=2)
    hog = sessions.explicit(None, await sessions.create_explicit(None))
    other = sessions.explicit(None, await sessions.create_explicit(None))
    release = asyncio.Event()

    async def slow(*_: object) -> None:
        await release.wait()

    engine.behaviour["sleep"] = slow
    hogging = [asyncio.create_task(sessions.run(hog, "sleep", 60)) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert engine.active_runs == 2  # the hog holds only its own share of slots
    result = await asyncio.wait_for(sessions.run(other, "echo", 5), 5)
    assert result.output == "echo" and result.queue_wait < 1
    release.set()
    await asyncio.gather(*hogging)
    assert engine.most_active_runs == 3


async def test_pool_hands_out_only_live_sandboxes_and_refills(instance: Instance) -> None:
    sessions, engine = make(instance, warm_pool=1)
    sessions.pool.fill()
    await sessions.pool.filled()
    pooled = next(iter(engine.running))
    engine.running.clear()  # the pooled sandbox died (its lifetime bound, say)
    sid = await sessions.create_explicit(None)
    session = sessions.explicit(None, sid)
    assert session.sandbox is not None and session.sandbox.name != pooled
    await sessions.pool.filled()
    assert len(sessions.pool) == 1  # refilled after the dead entry
    await sessions.close()
    assert engine.running == {}


async def test_pool_age_bound_follows_the_lifetime() -> None:
    assert max_pooled_age(3) == 1.5
    assert max_pooled_age(86400) == 600
    assert max_pooled_age(0) == 600


async def test_close_removes_everything_and_refuses_new_sessions(instance: Instance) -> None:
    sessions, engine = make(instance)
    await sessions.create_explicit(None)
    sessions.legacy(None, "m")
    await sessions.close()
    await sessions.close()  # idempotent
    assert engine.running == {}
    with pytest.raises(SessionError, match="shutting down"):
        await sessions.create_explicit(None)


def test_durations_read_as_people_write_them() -> None:
    assert describe_seconds(8) == "8 s"
    assert describe_seconds(90) == "90 s"
    assert describe_seconds(1800) == "30 min"
    assert describe_seconds(86400) == "24 h"
    assert describe_seconds(7260) == "121 min"


async def test_job_output_is_read_in_windows_and_stop_reports_the_kill(
    instance: Instance,
) -> None:
    sessions, engine = make(instance, max_jobs_per_session=1)
    session = sessions.explicit(None, await sessions.create_explicit(None))

    async def server(_: Sandbox, on_output: Any, stop: asyncio.Event) -> RunResult:
        on_output(b"listening\n")
        await stop.wait()
        return RunResult("", 143, False, True, 1.0, kill_note="all killed")

    engine.behaviour["serve"] = server
    job_id = await sessions.start_job(session, "alice", "serve")
    with pytest.raises(SessionError, match="already runs 1 jobs"):
        await sessions.start_job(session, "alice", "serve")
    with pytest.raises(SessionError, match="unknown job_id"):
        sessions.job("mallory", job_id)
    job = sessions.job("alice", job_id)
    first = await sessions.read_job(job, wait=5)
    assert (first.output, first.running, first.retval) == ("listening\n", True, None)
    empty = await sessions.read_job(job, wait=0)
    assert (empty.output, empty.running) == ("", True)
    final = await sessions.stop_job(job)
    assert final.running is False and final.retval == 143
    assert "stopped by stop_job; all killed" in final.output
    await sessions.end(session, "ended by end_session")
    with pytest.raises(SessionError, match="unknown job_id"):
        sessions.job("alice", job_id)


async def test_jobs_end_with_their_session(instance: Instance) -> None:
    sessions, engine = make(instance)
    session = sessions.explicit(None, await sessions.create_explicit(None))

    async def forever(*_: object) -> None:
        await asyncio.Event().wait()

    engine.behaviour["forever"] = forever
    job = sessions.job(None, await sessions.start_job(session, None, "forever"))
    await sessions.end(session, "ended by end_session")
    assert job.task is not None and job.task.done()


def test_text_and_base64_slices() -> None:
    from pod_exec_mcp.server import _base64_slice, _text_slice

    data = b"one\ntwo\nthree\n\xff\n"
    piece = _text_slice("f", data, 2, 2, 1000)
    assert (piece.content, piece.total_lines, piece.next_offset) == ("two\nthree\n", 4, 4)
    last = _text_slice("f", data, 4, 10, 1000)
    assert (last.content, last.next_offset) == ("\ufffd\n", None)
    cut = _text_slice("f", data, 1, 10, 8)
    assert (cut.content, cut.truncated, cut.next_offset) == ("one\ntwo\n", True, 3)
    chunk = _base64_slice("f", data, 4, 4)
    assert (chunk.content, chunk.next_offset, chunk.total_bytes) == ("dHdvCg==", 8, 16)
    with pytest.raises(SessionError, match="line number from 1"):
        _text_slice("f", data, 0, 1, 10)


async def test_exec_slots_go_round_robin_and_an_idle_session_goes_next(
    instance: Instance,
) -> None:
    # Two server-wide slots, held by the busy sessions a and b, each with more queued. The
    # idle session c's one command must get the very next slot that frees, ahead of a's and
    # b's queues; after it, a and b take turns.
    sessions, engine = make(instance, max_concurrent_execs=2, max_execs_per_session=4)
    busy = {name: sessions.explicit(None, await sessions.create_explicit(None)) for name in "ab"}
    idle = sessions.explicit(None, await sessions.create_explicit(None))
    gates: dict[str, asyncio.Event] = {}
    order: list[str] = []

    def gated(name: str) -> Any:
        async def act(*_: object) -> None:
            order.append(name)
            gates[name] = asyncio.Event()
            await gates[name].wait()

        return act

    tasks = []
    for round_ in range(3):
        for name, session in busy.items():
            command = f"{name}{round_}"
            engine.behaviour[command] = gated(command)
            tasks.append(asyncio.create_task(sessions.run(session, command, 60)))
            await asyncio.sleep(0)  # queue in this order
    for _ in range(20):
        await asyncio.sleep(0)
    engine.behaviour["c0"] = gated("c0")
    tasks.append(asyncio.create_task(sessions.run(idle, "c0", 60)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert order == ["a0", "b0"]
    # Each freed slot goes to the session holding the fewest, the least recently served
    # first: c0 at once, then a and b in turn.
    for finishing, granted in [("a0", "c0"), ("b0", "a1"), ("c0", "b1"), ("a1", "a2")]:
        gates[finishing].set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert order[-1] == granted, order
    for finishing in ["b1", "a2", "b2"]:
        gates[finishing].set()
        for _ in range(20):
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert sessions.exec_slots.in_use == 0


async def test_a_cancelled_wait_for_an_exec_slot_hands_the_slot_on() -> None:
    slots = ExecSlots(1)
    holding = slots.slot("a")
    await holding.__aenter__()
    waiters = [asyncio.create_task(_hold_briefly(slots, owner)) for owner in "bc"]
    await asyncio.sleep(0)
    waiters[0].cancel()  # waiting, never granted
    await holding.__aexit__(None, None, None)
    waiters[1].cancel()  # granted just now, cancelled before it ran: the slot goes back
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
    assert slots.in_use == 0
    async with slots.slot("d"):
        assert slots.in_use == 1


async def _hold_briefly(slots: ExecSlots, owner: str) -> None:
    async with slots.slot(owner):
        await asyncio.sleep(0)


async def test_unread_finished_jobs_are_bounded_per_session_and_read_job_says_so(
    instance: Instance,
) -> None:
    # A session that runs many jobs printing a full window each and never reads them must
    # not grow the server without bound: only the newest finished jobs are kept.
    sessions, engine = make(instance, max_kept_jobs_per_session=3, max_output_bytes=4096)
    session = sessions.explicit(None, await sessions.create_explicit(None))
    other = sessions.explicit(None, await sessions.create_explicit(None))

    def prints(_: Sandbox, on_output: Any, __: asyncio.Event) -> RunResult:
        on_output(b"x" * 4096)
        return RunResult("", 7, False, False, 0.1, output_file="/tmp/log")

    engine.behaviour["print"] = prints
    other_id = await sessions.start_job(other, "alice", "print")
    ids = []
    for _ in range(50):
        ids.append(await sessions.start_job(session, "alice", "print"))
        await asyncio.sleep(0)  # the job runs and ends
    await asyncio.gather(*(j.task for j in sessions._jobs.values() if j.task is not None))
    assert len(sessions._jobs) == 3 + 1  # this session's newest three, and the other's one
    assert sum(j.window_held() for j in sessions._jobs.values()) <= 4 * 4096
    for kept in ids[-3:]:
        assert (await sessions.read_job(sessions.job("alice", kept), 0)).retval == 7
    with pytest.raises(SessionError, match=r"ended \(exit status 7\).*dropped.*/tmp/log") as e:
        sessions.job("alice", ids[0])
    assert "unknown" not in str(e.value) and "MAX_KEPT_JOBS_PER_SESSION" in str(e.value)
    # Another session's jobs are not pushed out by this one's.
    assert (await sessions.read_job(sessions.job("alice", other_id), 0)).output == "x" * 4096


@pytest.mark.parametrize("offset", [1, 4_000_000, 8_388_608, 9_000_000])
def test_text_slice_of_a_big_file_does_work_of_the_slice_not_of_the_file(offset: int) -> None:
    # A sandbox sizes this file; slicing it on the event loop used to split all of it into
    # 8 M line objects (0.3-0.6 s in which every session waited). The host-side work
    # must be bounded by what is returned: seen here as the memory it allocates.
    from pod_exec_mcp.server import _text_slice

    data = b"\n" * (8 * 1024 * 1024)
    tracemalloc.start()
    try:
        piece = _text_slice("f", data, offset, 2000, 65536)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak
    assert piece.total_lines == len(data)
    if offset <= len(data):
        assert piece.content == "\n" * min(2000, len(data) - offset + 1)
    else:
        assert (piece.content, piece.next_offset) == ("", None)


def test_text_slice_agrees_with_splitting_on_newlines() -> None:
    from pod_exec_mcp.server import _text_slice

    rng = random.Random(22)
    for _ in range(300):
        data = bytes(rng.choice(b"ab\n\xc3\xa9\xff") for _ in range(rng.randrange(0, 60)))
        lines = _lines(data)
        offset, limit, cap = rng.randrange(1, 12), rng.randrange(1, 12), rng.randrange(1, 40)
        piece = _text_slice("f", data, offset, limit, cap)
        assert piece.total_lines == len(lines)
        taken = lines[offset - 1 : offset - 1 + limit]
        kept: list[bytes] = []
        for line in taken:
            if (
                len(b"".join(kept).decode("utf-8", "replace").encode())
                + len(line.decode("utf-8", "replace").encode())
                > cap
            ):
                break
            kept.append(line)
        assert piece.content == b"".join(kept).decode("utf-8", "replace"), (data, offset)
        assert piece.truncated == (len(kept) < len(taken))
        end = offset - 1 + len(kept)
        assert piece.next_offset == (end + 1 if end < len(lines) else None)


def _lines(data: bytes) -> list[bytes]:
    """Lines as `grep -n` counts them: ended by newline, the last one maybe without."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    return lines + ([parts[-1]] if parts[-1] else [])
