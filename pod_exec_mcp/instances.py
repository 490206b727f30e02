"""Which server owns which container, and how a server tells whether another is alive.

Every container carries the labels of the server instance that started it:
- `instance`: a random id minted when the server starts;
- `owner`: the random id of the lock directory where instance locks live, minted once and
  kept in `<lock dir>/owner`.

A live server holds an exclusive `flock` on `<lock dir>/<instance>.lock` for as long as its
process lives; the kernel drops the lock when the process dies, however it dies (SIGKILL
included). So a server can tell, for any container with its own `owner` label, whether the
instance that started it is alive: if that lock can be taken, or no longer exists, the
instance is dead and its containers are orphans. Containers of another owner (a server
with another lock directory: another user, another host, or a server in a container
without a persistent state volume) are never judged; the sandbox_lifetime bound inside
each container ends them eventually.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import platformdirs

from pod_exec_mcp.podman import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_SESSION,
    LABEL_SNAPSHOT,
    LABEL_SNAPSHOT_KIND,
    Podman,
)

APP_NAME = "pod_exec_mcp"

log = logging.getLogger(__name__)


def default_lock_dir() -> Path:
    return platformdirs.user_state_path(APP_NAME) / "instances"


def owner_key(lock_dir: Path) -> str:
    """The lock directory's owner id: whoever shares this directory can see our locks."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / "owner"
    if not path.exists():
        # Written aside, then linked into place: a server starting at the same moment sees
        # either no file or a whole one, and the first link wins.
        draft = lock_dir / f"owner.{os.getpid()}.{secrets.token_hex(4)}"
        draft.write_text(secrets.token_hex(8) + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    owner = path.read_text().strip()
    if not owner.isalnum():
        raise OSError(f"{path} is corrupt; remove it")
    return owner


@dataclass
class Instance:
    """This server process's identity, proven alive by the lock it holds."""

    id: str
    lock_dir: Path
    owner: str
    _lock_fd: int | None = field(default=None, repr=False)

    @classmethod
    def acquire(cls, lock_dir: Path | None = None) -> Instance:
        lock_dir = lock_dir or default_lock_dir()
        lock_dir.mkdir(parents=True, exist_ok=True)
        instance = cls(id=secrets.token_hex(8), lock_dir=lock_dir, owner=owner_key(lock_dir))
        fd = os.open(instance.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        instance._lock_fd = fd
        return instance

    @property
    def lock_path(self) -> Path:
        return self.lock_dir / f"{self.id}.lock"

    @property
    def usage_path(self) -> Path:
        return usage_path(self.lock_dir, self.id)

    def labels(self) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.id, LABEL_OWNER: self.owner}

    async def containers(self, podman: Podman) -> list[dict[str, Any]]:
        """Containers this instance started that podman still lists."""
        return await podman.list_containers(f"{LABEL_INSTANCE}={self.id}")

    def release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                self.usage_path.unlink()
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None


def instance_alive(lock_dir: Path, instance_id: str) -> bool:
    """Whether the server instance `instance_id` (whose lock lives in `lock_dir`) is alive."""
    if not instance_id.isalnum():
        return False
    path = lock_dir / f"{instance_id}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        # Shared, not exclusive: only the owner's exclusive lock may block us. Two probers
        # of one dead instance (a server's periodic sweep and --list-containers) would
        # otherwise each take the other for the owner, and call a dead server alive.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        # Nobody owns it: a dead instance's leftover. Remove it while we hold the lock.
        with contextlib.suppress(OSError):
            usage_path(lock_dir, instance_id).unlink()
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    finally:
        os.close(fd)


# --- usage: what only the server knows, kept beside its lock for --list-containers ---------


def usage_path(lock_dir: Path, instance_id: str) -> Path:
    return lock_dir / f"{instance_id}.usage.json"


class _Session(Protocol):
    """What write_usage reads of a sessions.Session."""

    @property
    def kind(self) -> str: ...
    @property
    def last_used(self) -> float: ...
    @property
    def busy(self) -> int: ...
    @property
    def sandbox(self) -> Any: ...


def write_usage(instance: Instance, sessions: Iterable[_Session], pooled: Iterable[str]) -> None:
    """Record, for each sandbox of this instance, its session kind and last use (wall clock,
    from the registry's monotonic clock). Written aside and renamed: readers never see half."""
    now_wall, now_mono = time.time(), time.monotonic()
    containers: dict[str, dict[str, Any]] = {name: {"kind": "pool"} for name in pooled}
    for s in sessions:
        if s.sandbox is not None:
            last = now_wall if s.busy else now_wall - (now_mono - s.last_used)
            containers[s.sandbox.name] = {"kind": s.kind, "last_use": round(last, 1)}
    draft = instance.usage_path.with_suffix(f".{secrets.token_hex(4)}")
    draft.write_text(json.dumps({"written": round(now_wall, 1), "containers": containers}))
    draft.replace(instance.usage_path)


def read_usage(lock_dir: Path, instance_id: str) -> dict[str, dict[str, Any]]:
    """The usage a live instance last wrote ({} if none, or not readable)."""
    if not instance_id.isalnum():
        return {}
    try:
        data = json.loads(usage_path(lock_dir, instance_id).read_text())
        return dict(data.get("containers") or {})
    except (OSError, ValueError, AttributeError):
        return {}


@dataclass(frozen=True)
class ContainerStatus:
    """One container of ours, and what we know about its owner."""

    id: str
    name: str
    instance: str
    state: str
    owner_alive: bool | None  # None: another owner's container, whose liveness we cannot see
    created: float | None = None  # wall clock
    kind: str = "?"  # explicit, legacy, pool, preflight; "?" when only its server knows
    last_use: float | None = None  # wall clock, as its server last recorded it

    @property
    def orphaned(self) -> bool:
        return self.owner_alive is False


async def survey(podman: Podman, lock_dir: Path | None = None) -> list[ContainerStatus]:
    """Every container that carries our label, with its owner's liveness where we can see it
    and, for live servers of this state dir, its session kind and last use."""
    lock_dir = lock_dir or default_lock_dir()
    mine = owner_key(lock_dir)
    found = []
    usage: dict[str, dict[str, dict[str, Any]]] = {}
    for c in await podman.list_containers(f"{LABEL_MANAGED}=true"):
        labels = c.get("Labels") or {}
        instance = labels.get(LABEL_INSTANCE, "")
        alive = instance_alive(lock_dir, instance) if labels.get(LABEL_OWNER) == mine else None
        names = c.get("Names") or [""]
        if alive and instance not in usage:
            usage[instance] = read_usage(lock_dir, instance)
        used = usage.get(instance, {}).get(names[0], {})
        session_label = labels.get(LABEL_SESSION, "")
        kind = used.get("kind") or (
            session_label if session_label in ("pool", "preflight", "agent-fill") else "?"
        )
        created = c.get("Created")
        found.append(
            ContainerStatus(
                c["Id"],
                names[0],
                instance,
                c.get("State", "?"),
                alive,
                created=float(created) if isinstance(created, int | float) else None,
                kind=kind,
                last_use=used.get("last_use"),
            )
        )
    return found


_OWNER_STATES = {True: "server alive", False: "ORPHANED", None: "another state dir"}


def _ago(moment: float | None, now: float) -> str:
    if moment is None:
        return "-"
    seconds = max(0, int(now - moment))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_listing(statuses: list[ContainerStatus], now: float | None = None) -> str:
    """The --list-containers table: one header row, one row per container."""
    now = time.time() if now is None else now
    rows = [("CONTAINER", "NAME", "STATE", "AGE", "LAST USE", "KIND", "SERVER")]
    for c in statuses:
        rows.append(
            (
                c.id[:12],
                c.name,
                c.state,
                _ago(c.created, now),
                _ago(c.last_use, now) + (" ago" if c.last_use is not None else ""),
                c.kind,
                _OWNER_STATES[c.owner_alive],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def sweep_orphans(podman: Podman, lock_dir: Path | None = None) -> list[ContainerStatus]:
    """Remove the containers of dead instances of this owner, then the snapshot images
    nobody can use any more (sweep_snapshot_images); returns the containers removed."""
    orphans = [c for c in await survey(podman, lock_dir) if c.orphaned]
    await podman.remove(*[c.id for c in orphans])
    images = await sweep_snapshot_images(podman, lock_dir)
    if images:
        log.info("removed %d snapshot image(s) nobody can use any more", len(images))
    return orphans


async def sweep_snapshot_images(podman: Podman, lock_dir: Path | None = None) -> list[str]:
    """Remove this owner's snapshot images that nobody can use any more: a fork's passing
    copy whose server died before it removed it, and deleted snapshots (untagged) that a
    container used until it went. Kept snapshots (kind `snapshot`, tagged) survive any
    server: only delete_snapshot removes them. Returns the image ids removed."""
    lock_dir = lock_dir or default_lock_dir()
    mine = owner_key(lock_dir)
    removed = []
    for image in await podman.list_images(f"{LABEL_MANAGED}=true", LABEL_SNAPSHOT):
        labels = image.get("Labels") or {}
        if labels.get(LABEL_OWNER) != mine or image.get("Containers"):
            continue
        passing = labels.get(LABEL_SNAPSHOT_KIND) == "fork" and not instance_alive(
            lock_dir, labels.get(LABEL_INSTANCE, "")
        )
        untagged = not (image.get("RepoTags") or image.get("Names"))
        if passing or untagged:
            done = await podman.run("rmi", image["Id"], check=False)
            if done.returncode == 0:
                removed.append(str(image["Id"]))
    return removed


async def sweep_forever(
    podman: Podman,
    interval: float,
    lock_dir: Path | None = None,
    then: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Sweep orphans every `interval` seconds while this server runs.

    The sweep at start-up alone leaves a race: a server killed while `podman run`s were in
    flight leaves containers that appear after the next server's start-up sweep (the podman
    clients run in sessions of their own and outlive it). Sweeping again closes it.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await sweep_orphans(podman, lock_dir)
        except Exception:
            log.exception("sweeping orphaned containers failed")
            continue
        if removed:
            log.info("removed %d orphaned container(s) of dead servers", len(removed))
        if then is not None:
            try:
                await then()
            except Exception:
                log.exception("sweeping after the orphaned containers failed")
