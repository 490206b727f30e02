"""Calls that carry an `idempotency_key` run once: a re-sent request gets the first one's
result (issue 23). In MCP 2026-07-28 a broken stream cannot be resumed and the client must
send the request again; without a key a `shell_exec` could then run twice.

Keys are scoped (a session's, or a principal's for create_session) and bounded: at most
`per_scope` per scope, `total_bytes` of kept results in all, each for `max_age` seconds;
past any bound the oldest go first, and a repeat of a forgotten key runs again. A repeat
while the first call still runs waits for it. A first call that was cancelled killed its
command, so its key is forgotten: sending it again runs it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)

MAX_KEY_CHARS = 200


class IdempotencyError(Exception):
    """A key that cannot be used; the message says why and what to do."""


@dataclass
class _Entry:
    scope: str
    fingerprint: str
    result: asyncio.Future[Any]
    at: float
    size: int = 0


def fingerprint(tool: str, arguments: dict[str, Any]) -> str:
    """What a call asked for: a repeat must ask for the same."""
    text = json.dumps([tool, arguments], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Once:
    """The results of keyed calls, bounded by count per scope, total bytes and age."""

    def __init__(
        self,
        per_scope: int,
        max_age: float,
        total_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_scope = per_scope
        self.max_age = max_age
        self.total_bytes = total_bytes
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._per_scope: dict[str, int] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def run(
        self,
        scope: str,
        key: str | None,
        asked: Callable[[], str],
        work: Callable[[], Awaitable[T]],
    ) -> T:
        """`work()`'s result; for a key seen before (same scope), the first call's result,
        or its error, without running anything. `asked()` gives the call's fingerprint,
        made only when there is a key (a write_file's is a hash of its content)."""
        if key is None:
            return await work()
        _check_key(key)
        fingerprint = asked()
        self._expire()
        entry = self._entries.get((scope, key))
        if entry is not None:
            if entry.fingerprint != fingerprint:
                raise IdempotencyError(
                    f"idempotency_key {key!r} was first used with other arguments; a repeat "
                    "must send the same call. Use a new key for a new call."
                )
            result: T = await asyncio.shield(entry.result)
            return result
        entry = _Entry(
            scope, fingerprint, asyncio.get_running_loop().create_future(), self._clock()
        )
        self._add((scope, key), entry)
        try:
            result = await work()
        except asyncio.CancelledError:
            self._drop((scope, key))
            entry.result.set_exception(
                IdempotencyError(
                    f"the first call with idempotency_key {key!r} was cancelled, which "
                    "stopped its command: send the call again to run it."
                )
            )
            entry.result.exception()  # retrieved: no "never retrieved" warning
            raise
        except Exception as exc:
            entry.result.set_exception(exc)
            entry.result.exception()
            raise
        entry.result.set_result(result)
        entry.size = len(result.model_dump_json())
        self._bytes += entry.size
        self._trim()
        return result

    def _add(self, where: tuple[str, str], entry: _Entry) -> None:
        self._entries[where] = entry
        self._per_scope[entry.scope] = self._per_scope.get(entry.scope, 0) + 1
        if self._per_scope[entry.scope] > self.per_scope:
            oldest = next(k for k, e in self._entries.items() if e.scope == entry.scope)
            self._drop(oldest)

    def _drop(self, where: tuple[str, str]) -> None:
        entry = self._entries.pop(where, None)
        if entry is None:
            return
        self._bytes -= entry.size
        left = self._per_scope[entry.scope] - 1
        if left:
            self._per_scope[entry.scope] = left
        else:
            del self._per_scope[entry.scope]

    def _trim(self) -> None:
        """The oldest finished results go while the kept bytes pass the bound."""
        for where in list(self._entries):
            if self._bytes <= self.total_bytes:
                return
            if self._entries[where].result.done():
                self._drop(where)

    def _expire(self) -> None:
        cutoff = self._clock() - self.max_age
        while self._entries:
            where, entry = next(iter(self._entries.items()))
            if entry.at > cutoff:
                return
            self._drop(where)


def _check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise IdempotencyError(
            f"idempotency_key must be 1 to {MAX_KEY_CHARS} printable characters (a UUID "
            "is a good one)."
        )
