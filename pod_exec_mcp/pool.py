"""The warm pool: sandboxes started ahead of need, so a new session's first call skips a start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pod_exec_mcp import audit  # ops: audit
from pod_exec_mcp.engine import Sandbox, SandboxEngine, SandboxSpec

log = logging.getLogger(__name__)

# The longest a pooled sandbox waits before it is replaced rather than handed out, so that
# a session never gets a sandbox far into its lifetime bound.
_MAX_POOLED_AGE = 600.0


def max_pooled_age(lifetime: float) -> float:
    """How long a sandbox may sit in the pool: its init's lifetime bound started when it was
    pooled, not when it is taken, so a taker must still get at least half of it."""
    return min(_MAX_POOLED_AGE, lifetime / 2) if lifetime > 0 else _MAX_POOLED_AGE


@dataclass(frozen=True)
class _Pooled:
    sandbox: Sandbox
    started: float


class WarmPool:
    """Keeps `size` started sandboxes ready; hands out only live, young-enough ones."""

    def __init__(
        self,
        engine: SandboxEngine,
        new_spec: Callable[[], SandboxSpec],
        size: int,
        lifetime: float,
    ) -> None:
        self.engine = engine
        self.new_spec = new_spec
        self.size = size
        self.max_age = max_pooled_age(lifetime)
        self._ready: list[_Pooled] = []
        self._filler: asyncio.Task[None] | None = None
        self._closed = False

    def names(self) -> list[str]:  # ops: metrics, --list-containers
        return [p.sandbox.name for p in self._ready]

    def __len__(self) -> int:
        return len(self._ready)

    def fill(self) -> None:
        """Start sandboxes in the background until `size` are ready."""
        if self._closed or self.size <= 0:
            return
        if self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._fill())

    async def filled(self) -> None:
        """Wait until a fill under way has finished (the pool is full, or a start failed)."""
        if self._filler is not None:
            await asyncio.shield(self._filler)

    async def _fill(self) -> None:
        while not self._closed and len(self._ready) < self.size:
            try:
                sandbox = await self.engine.start(self.new_spec())
            except Exception:
                log.exception("could not start a pool sandbox; the pool stays short")
                return
            if self._closed:
                await self.engine.remove(sandbox)
                return
            self._ready.append(_Pooled(sandbox, time.monotonic()))
            audit.sandbox_event("started", None, sandbox.name, "warm pool")  # ops: audit

    async def take(self) -> Sandbox | None:
        """A live pooled sandbox (the pool then refills in the background), or None."""
        await self.drop_stale()
        taken = None
        while self._ready and taken is None:
            candidate = self._ready.pop(0).sandbox
            if await self.engine.is_running(candidate):
                taken = candidate
            else:
                log.warning("pooled sandbox %s had died; dropped it", candidate.name)
                await self.engine.remove(candidate)
                audit.sandbox_event("removed", None, candidate.name, "died in the warm pool")
        self.fill()
        return taken

    async def drop_stale(self) -> None:
        """Remove pooled sandboxes too old to hand out, and refill."""
        cutoff = time.monotonic() - self.max_age
        stale = [p.sandbox for p in self._ready if p.started < cutoff]
        if stale:
            self._ready = [p for p in self._ready if p.started >= cutoff]
            await self.engine.remove(*stale)
            for s in stale:  # ops: audit
                audit.sandbox_event("removed", None, s.name, "too old for the warm pool")
        self.fill()

    async def close(self) -> None:
        self._closed = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filler
        pooled, self._ready = [p.sandbox for p in self._ready], []
        await self.engine.remove(*pooled)
        for s in pooled:  # ops: audit
            audit.sandbox_event("removed", None, s.name, "server shut down")
