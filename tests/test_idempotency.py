"""idempotency.Once: keyed calls run once, within bounds (pure logic, no Podman)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from pod_exec_mcp.idempotency import IdempotencyError, Once, fingerprint


class Answer(BaseModel):
    n: int
    text: str = ""


class Counter:
    def __init__(self) -> None:
        self.runs = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> Answer:
        self.runs += 1
        await self.gate.wait()
        return Answer(n=self.runs)


FP = fingerprint("shell_exec", {"command": "echo"})


def fp() -> str:
    return FP


async def test_a_repeat_returns_the_first_result_and_waits_for_it() -> None:
    once, work = Once(10, 60, 1 << 20), Counter()
    work.gate.clear()
    first = asyncio.ensure_future(once.run("s", "k", fp, work))
    second = asyncio.ensure_future(once.run("s", "k", fp, work))
    await asyncio.sleep(0)
    work.gate.set()
    third = await once.run("s", "k", fp, work)
    assert (await first, await second, third) == (Answer(n=1),) * 3
    assert work.runs == 1
    # Without a key, or in another scope, it runs.
    assert (await once.run("s", None, fp, work)).n == 2
    assert (await once.run("other", "k", fp, work)).n == 3


async def test_the_same_key_with_other_arguments_is_refused() -> None:
    once, work = Once(10, 60, 1 << 20), Counter()
    await once.run("s", "k", fp, work)
    with pytest.raises(IdempotencyError, match="other arguments"):
        await once.run("s", "k", lambda: fingerprint("shell_exec", {"command": "rm"}), work)
    assert work.runs == 1


async def test_an_error_is_the_answer_to_repeats_too() -> None:
    once, runs = Once(10, 60, 1 << 20), []

    async def fails() -> Answer:
        runs.append(1)
        raise ValueError("no sandbox")

    for _ in range(2):
        with pytest.raises(ValueError, match="no sandbox"):
            await once.run("s", "k", fp, fails)
    assert runs == [1]


async def test_a_cancelled_first_call_is_forgotten_and_its_waiters_told() -> None:
    once, work = Once(10, 60, 1 << 20), Counter()
    work.gate.clear()
    first = asyncio.ensure_future(once.run("s", "k", fp, work))
    waiter = asyncio.ensure_future(once.run("s", "k", fp, work))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(IdempotencyError, match="was cancelled"):
        await waiter
    work.gate.set()
    assert (await once.run("s", "k", fp, work)).n == 2  # sent again: it runs


async def test_keys_are_bounded_by_count_age_and_bytes() -> None:
    now = [0.0]
    once, work = Once(2, 60, 1 << 20, clock=lambda: now[0]), Counter()
    for key in ("a", "b", "c"):
        await once.run("s", key, fp, work)
    assert len(once) == 2
    assert (await once.run("s", "a", fp, work)).n == 4  # "a" was the oldest: forgotten
    now[0] = 61.0
    assert (await once.run("s", "c", fp, work)).n == 5  # expired
    small = Once(100, 60, 100)

    async def big() -> Answer:
        return Answer(n=0, text="x" * 80)

    for key in ("a", "b", "c"):
        await small.run("s", key, fp, big)
    assert len(small) == 1  # each result is ~100 bytes of JSON: only the newest fits


@pytest.mark.parametrize("key", ["", "x" * 201, "a\nb"])
async def test_bad_keys_get_a_clear_error(key: str) -> None:
    with pytest.raises(IdempotencyError, match="1 to 200 printable"):
        await Once(10, 60, 1 << 20).run("s", key, fp, Counter())
