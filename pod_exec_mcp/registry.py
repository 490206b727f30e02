"""Who owns which sandbox: sessions, their sandboxes, limits and reaping.

A session is addressed by a key derived from (principal, kind, id). Raw ids never leave
this module: container names and labels carry a hash, so that listing containers on the
host reveals no id that would let someone drive another client's sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from pod_exec_mcp.config import Settings, env_var
from pod_exec_mcp.instances import Instance
from pod_exec_mcp.podman import LABEL_SESSION, Podman
from pod_exec_mcp.sandbox import Sandbox

log = logging.getLogger(__name__)

SessionKind = Literal["explicit", "legacy"]

# How many ended session keys we remember, to tell "ended" from "never existed".
_TOMBSTONES = 10_000

# A pooled sandbox older than this is replaced rather than handed out: its init's lifetime
# bound (sandbox_lifetime) started running when it was pooled, not when it was taken.
_POOL_MAX_AGE = 600.0


class SessionError(Exception):
    """A session cannot be used; the message says what the agent should do."""


class UnknownSession(SessionError):
    pass


class SandboxLimitReached(SessionError):
    pass


@dataclass
class SessionEntry:
    """One live session and its sandbox."""

    key: str
    kind: SessionKind
    sandbox: Sandbox | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    ended: bool = False


def session_key(principal: str | None, kind: SessionKind, session_id: str) -> str:
    """The registry key (and container label) of a session: a hash, never the raw id."""
    material = f"{principal or ''}\0{kind}\0{session_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(material).hexdigest()[:32]


class SessionRegistry:
    """Maps sessions to sandboxes; starts, replaces, reaps and removes them."""

    def __init__(self, podman: Podman, settings: Settings, instance: Instance) -> None:
        self.podman = podman
        self.settings = settings
        self.instance = instance
        self._entries: dict[str, SessionEntry] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._closed = False
        # Started sandboxes that no session owns yet, oldest first, with their start time.
        self._pool: list[tuple[float, Sandbox]] = []
        self._pool_filler: asyncio.Task[None] | None = None

    # --- looking sessions up ------------------------------------------------------------

    async def create_explicit(self, principal: str | None) -> str:
        """Mint an unguessable session id and start its sandbox now."""
        session_id = secrets.token_urlsafe(24)
        entry = self._add(session_key(principal, "explicit", session_id), "explicit")
        try:
            await self.sandbox_of(entry)
        except BaseException:
            self._entries.pop(entry.key, None)
            raise
        return session_id

    def explicit(self, principal: str | None, session_id: str) -> SessionEntry:
        """The live session `session_id` of `principal`, or UnknownSession."""
        key = session_key(principal, "explicit", session_id)
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        why = self._ended.get(key)
        if why is not None:
            raise UnknownSession(
                f"session {session_id!r} has ended ({why}); its sandbox and files are gone. "
                "Call create_session for a new one."
            )
        raise UnknownSession(
            f"unknown session_id {session_id!r}: no such session exists for this client. "
            "Call create_session and pass the id it returns."
        )

    def legacy(
        self, principal: str | None, mcp_session_id: str
    ) -> tuple[SessionEntry, bool, str | None]:
        """The session tied to an MCP (Mcp-Session-Id) session.

        Returns (entry, is_new, why): `why` says why an earlier sandbox of this MCP session
        was removed (idle reaping) when a new one takes its place. A still-connected client
        cannot reconnect on its own, so it gets a fresh sandbox rather than a dead end.
        """
        key = session_key(principal, "legacy", mcp_session_id)
        entry = self._entries.get(key)
        if entry is not None:
            return entry, False, None
        why = self._ended.pop(key, None)
        return self._add(key, "legacy"), True, why

    def _add(self, key: str, kind: SessionKind) -> SessionEntry:
        if self._closed:
            raise SessionError("the server is shutting down")
        if len(self._entries) >= self.settings.max_sandboxes:
            raise SandboxLimitReached(
                f"the server already holds its maximum of {self.settings.max_sandboxes} "
                "sandboxes. End a session you no longer need (end_session), wait for idle "
                f"ones to be reaped, or raise {env_var('max_sandboxes')}."
            )
        entry = SessionEntry(key=key, kind=kind)
        self._entries[key] = entry
        return entry

    # --- sandboxes ----------------------------------------------------------------------

    def _new_sandbox(self, entry: SessionEntry | None) -> Sandbox:
        key = entry.key if entry is not None else "pool"
        labels = {**self.instance.labels(), LABEL_SESSION: key}
        # A random suffix, so that a replacement never collides with its predecessor.
        name = f"pod_exec_mcp-{self.instance.id[:8]}-{key[:12]}-{secrets.token_hex(2)}"
        return Sandbox(self.podman, self.settings, name, labels)

    # --- the warm pool ------------------------------------------------------------------

    def fill_pool(self) -> None:
        """Start pool sandboxes in the background until `warm_pool` are ready."""
        if self._closed or self.settings.warm_pool <= 0:
            return
        if self._pool_filler is None or self._pool_filler.done():
            self._pool_filler = asyncio.create_task(self._fill_pool())

    async def _fill_pool(self) -> None:
        while not self._closed and len(self._pool) < self.settings.warm_pool:
            sandbox = self._new_sandbox(None)
            try:
                await sandbox.start()
            except Exception:
                log.exception("could not start a pool sandbox; the pool stays short")
                with contextlib.suppress(Exception):
                    await sandbox.remove()
                return
            if self._closed:
                await sandbox.remove()
                return
            self._pool.append((time.monotonic(), sandbox))

    async def _drop_stale_pooled(self) -> None:
        """Remove pooled sandboxes too old to hand out."""
        cutoff = time.monotonic() - _POOL_MAX_AGE
        stale = [s for started, s in self._pool if started < cutoff]
        if stale:
            self._pool = [(t, s) for t, s in self._pool if t >= cutoff]
            await self.podman.remove(*[s.name for s in stale])

    async def _take_pooled(self) -> Sandbox | None:
        """A ready pool sandbox (the pool then refills in the background), or None."""
        await self._drop_stale_pooled()
        taken = self._pool.pop(0)[1] if self._pool else None
        self.fill_pool()
        return taken

    async def refresh_pool(self) -> None:
        """Replace pool sandboxes that got too old to hand out (run by the reaper)."""
        await self._drop_stale_pooled()
        self.fill_pool()

    async def sandbox_of(self, entry: SessionEntry) -> Sandbox:
        """The session's sandbox, started on first use (exactly once, however many ask)."""
        if entry.sandbox is not None:
            return entry.sandbox
        async with entry.lock:
            if entry.ended:
                raise UnknownSession("this session has ended")
            if entry.sandbox is None:
                sandbox = await self._take_pooled()
                if sandbox is not None:
                    log.info("took pooled sandbox %s", sandbox.name)
                else:
                    sandbox = self._new_sandbox(entry)
                    try:
                        await sandbox.start()
                    except BaseException:
                        # A failed or cancelled start may have left a container behind.
                        with contextlib.suppress(Exception):
                            await asyncio.shield(sandbox.remove())
                        raise
                    log.info("started sandbox %s", sandbox.name)
                entry.sandbox = sandbox
            return entry.sandbox

    async def replace_sandbox(self, entry: SessionEntry, broken: Sandbox) -> Sandbox:
        """Remove a broken sandbox and start a fresh one for the same session."""
        async with entry.lock:
            if entry.sandbox is broken:
                entry.sandbox = None
                await broken.remove()
                log.warning("removed broken sandbox %s", broken.name)
        return await self.sandbox_of(entry)

    @contextlib.asynccontextmanager
    async def in_use(self, entry: SessionEntry) -> AsyncIterator[None]:
        """Marks a session busy, so the reaper leaves it alone while a command runs."""
        entry.busy += 1
        try:
            yield
        finally:
            entry.busy -= 1
            entry.last_used = time.monotonic()

    # --- ending -------------------------------------------------------------------------

    async def end(self, entry: SessionEntry, why: str) -> None:
        """End a session and remove its sandbox. Idempotent."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.ended:
            return
        entry.ended = True
        self._ended[entry.key] = why
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        async with entry.lock:
            if entry.sandbox is not None:
                await entry.sandbox.remove()
                log.info("removed sandbox %s (%s)", entry.sandbox.name, why)
                entry.sandbox = None

    async def end_key(self, key: str, why: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            await self.end(entry, why)

    async def reap_idle(self) -> int:
        """End every session unused for longer than idle_timeout; returns how many."""
        cutoff = time.monotonic() - self.settings.idle_timeout
        idle = [e for e in self._entries.values() if e.busy == 0 and e.last_used < cutoff]
        minutes = self.settings.idle_timeout / 60
        await asyncio.gather(*(self.end(e, f"idle for over {minutes:g} min") for e in idle))
        return len(idle)

    async def reap_forever(self) -> None:
        period = min(max(self.settings.idle_timeout / 4, 0.5), 30.0)
        while True:
            await asyncio.sleep(period)
            try:
                await self.reap_idle()
                await self.refresh_pool()
            except Exception:
                log.exception("reaping idle sandboxes failed")

    async def close(self) -> None:
        """End every session and remove every sandbox (shutdown)."""
        self._closed = True
        if self._pool_filler is not None:
            self._pool_filler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pool_filler
        pooled, self._pool = [s for _, s in self._pool], []
        await self.podman.remove(*[s.name for s in pooled])
        entries = list(self._entries.values())
        await asyncio.gather(
            *(self.end(e, "server shut down") for e in entries), return_exceptions=True
        )
        # Belt and braces: anything of this instance that podman still lists.
        leftovers = await self.instance.containers(self.podman)
        await self.podman.remove(*[c["Id"] for c in leftovers])
