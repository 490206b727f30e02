"""Server-wide exec slots, granted fairly across sessions.

A plain semaphore serves waiters first come, first served: with every slot taken, an idle
session's `true` queues behind every command the busy sessions have queued. Here a freed
slot goes to the waiting session that holds the fewest slots, and among equals to the one
served least recently (round-robin). A session that holds none thus gets the next slot
that frees: it waits at most one slot's turn, however long the others' queues are.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pod_exec_mcp import audit  # ops: audit


@dataclass
class _Owner:
    """One session's share: slots held, calls waiting, when it was last served."""

    held: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)
    last_served: int = 0


class ExecSlots:
    """`size` slots; `slot(owner)` holds one for the duration of a command."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        # Only owners that hold or wait are kept: the state is bounded by the calls in flight.
        self._owners: dict[str, _Owner] = {}
        self._grants = itertools.count(1)

    @contextlib.asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[None]:
        """Hold one slot for `owner` (a session's key) while the block runs; the time spent
        queueing is noted on the call's audit event."""
        asked = time.monotonic()
        await self._acquire(owner)
        audit.note(queue_wait=time.monotonic() - asked)  # ops: audit
        try:
            yield
        finally:
            self._release(owner)

    async def _acquire(self, owner: str) -> None:
        share = self._owners.setdefault(owner, _Owner())
        if self.in_use < self.size and not self._anyone_waiting():
            self._grant(share)
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        share.waiting.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                # Granted just as the caller was cancelled: hand the slot on.
                self._release(owner)
            else:
                # Still queued, unless a release already skipped it as cancelled.
                if ticket in share.waiting:
                    share.waiting.remove(ticket)
                self._forget_if_idle(owner)
            raise

    def _release(self, owner: str) -> None:
        share = self._owners[owner]
        share.held -= 1
        self.in_use -= 1
        self._forget_if_idle(owner)
        self._grant_next()

    def _grant_next(self) -> None:
        """Give a free slot to the waiting owner holding the fewest, least recently served."""
        while self.in_use < self.size:
            candidates = [s for s in self._owners.values() if s.waiting]
            if not candidates:
                return
            share = min(candidates, key=lambda s: (s.held, s.last_served))
            ticket = share.waiting.popleft()
            if not ticket.done():
                self._grant(share)
                ticket.set_result(None)

    def _grant(self, share: _Owner) -> None:
        share.held += 1
        share.last_served = next(self._grants)
        self.in_use += 1

    def _anyone_waiting(self) -> bool:
        return any(s.waiting for s in self._owners.values())

    def _forget_if_idle(self, owner: str) -> None:
        share = self._owners.get(owner)
        if share is not None and share.held == 0 and not share.waiting:
            del self._owners[owner]
