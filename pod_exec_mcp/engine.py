"""What the sessions layer needs from a sandbox engine, and nothing more.

An engine starts a sandbox from a `SandboxSpec`, runs a command in it with a kill
guarantee (`RunRequest` in, `RunResult` out), removes sandboxes and lists ours by label,
and keeps file-system snapshots of sandboxes (`SnapshotInfo`: images a spec can start
from).
Podman (`podman_engine.PodmanEngine`) is the one implementation; the unit tests use an
in-memory fake; docs/scale-out.md maps the same calls onto Kubernetes.

How a sandbox is started (its spec) is kept apart from how a command runs in it (the
request): either can change without the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pod_exec_mcp.config import Settings, parse_size
from pod_exec_mcp.egress import EgressPolicy

# GNU timeout's status for a command that ran out of time.
TIMEOUT_STATUS = 124
# Every process a command starts inherits this variable, even one that leaves the
# command's process group or session; that is how a timeout finds and kills all of them.
EXEC_ID_ENV = "POD_EXEC_MCP_EXEC_ID"

ProgressCallback = Callable[[float], Awaitable[None]]
OutputCallback = Callable[[bytes], None]


class EngineError(RuntimeError):
    """The engine itself failed (not a command inside a sandbox); the sandbox may be fine."""


class SandboxBroken(Exception):
    """The sandbox cannot run commands any more: its container is gone, checked."""


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to start one sandbox. Built from Settings by `sandbox_spec`."""

    name: str
    labels: Mapping[str, str]
    image: str
    memory: str
    cpus: float
    pids_limit: int
    nofile: int
    nproc: int
    # "isolated" (no network but loopback; HTTP(S) through the agent's egress proxy),
    # "bridge" (Podman's default network) or "none".
    network: str
    strict: bool
    tmpfs_size: str
    # Seconds after which the sandbox's own init exits, whoever is (not) watching. 0: never.
    lifetime: float
    extra_run_args: tuple[str, ...] = ()
    # The image of the exec agent to mount into the sandbox; None: no agent.
    agent_image: str | None = None
    # Containment (issue 12). The OCI runtime (None: the engine's default); whether the
    # sandbox's root is an unprivileged host id in a user namespace of its own; the disk
    # its writable layer may fill (None: no limit). Defaults are the engine's plain ones.
    runtime: str | None = None
    userns: bool = False
    disk_limit: str | None = None


def is_gvisor(runtime: str | None) -> bool:
    """Whether `runtime` names gVisor's runsc (by name or path)."""
    return runtime is not None and runtime.rsplit("/", 1)[-1].startswith("runsc")


def sandbox_spec(settings: Settings, name: str, labels: Mapping[str, str]) -> SandboxSpec:
    """The spec of a sandbox as the settings describe it."""
    return SandboxSpec(
        name=name,
        labels=dict(labels),
        image=settings.image,
        memory=settings.memory,
        cpus=settings.cpus,
        pids_limit=settings.pids_limit,
        nofile=settings.nofile,
        nproc=settings.nproc,
        network="none" if settings.strict else settings.network,
        strict=settings.strict,
        tmpfs_size=settings.tmpfs_size,
        lifetime=settings.sandbox_lifetime,
        extra_run_args=tuple(settings.extra_run_args),
        agent_image=settings.agent_image if settings.exec_channel == "agent" else None,
        runtime=settings.runtime or None,
        userns=settings.userns == "auto",
        # Strict sandboxes write only to tmpfs, bounded by --memory: no storage quota needed.
        disk_limit=(
            settings.disk_limit.strip()
            if parse_size(settings.disk_limit) > 0 and not settings.strict
            else None
        ),
    )


@dataclass(frozen=True)
class RunRequest:
    """One command to run as `/bin/sh -lc COMMAND` in a sandbox."""

    command: str
    # Seconds before the command's tree is killed; None: never (background jobs).
    timeout: float | None
    kill_grace: float
    max_output_bytes: int
    progress_interval: float
    env: Mapping[str, str] = field(default_factory=dict)
    # Bytes for the command's stdin; None: stdin is empty (/dev/null).
    stdin: bytes | None = None
    # Where the whole output is kept, inside the sandbox, when it is over max_output_bytes
    # (engines that cannot do this leave RunResult.output_file None).
    spill_path: str | None = None
    # The spill file keeps at most this many bytes, its head and its tail; 0: all.
    max_spill_bytes: int = 0


@dataclass(frozen=True)
class RunResult:
    """What a command did. `output` is already bounded (head and tail kept)."""

    output: str
    retval: int
    truncated: bool
    timed_out: bool
    duration: float
    # The command could not be killed (or not verifiably): the caller must replace the
    # sandbox, and the result must not claim that everything was killed.
    unkillable: bool = False
    # The file in the sandbox holding the whole output, when it was cut (see spill_path).
    output_file: str | None = None
    # output_file holds only the head and the tail of the output (max_spill_bytes).
    output_file_cut: bool = False
    # After a stop (timeout or stop request): what happened to the command's processes,
    # as a sentence ("the command and every process it started were killed").
    kill_note: str | None = None


@dataclass(frozen=True)
class Sandbox:
    """A started sandbox, as the engine knows it."""

    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as listed by the engine, whoever started it."""

    id: str
    name: str
    labels: Mapping[str, str]
    state: str

    def as_sandbox(self) -> Sandbox:
        return Sandbox(self.id, self.labels)


@dataclass(frozen=True)
class SnapshotInfo:
    """A file-system snapshot as the engine keeps it: an image carrying our labels, that a
    `SandboxSpec.image` may name."""

    name: str
    labels: Mapping[str, str]
    # Bytes the snapshot takes of its own (not counting an image it shares layers with).
    size: int
    # Wall clock.
    created: float


class SandboxEngine(Protocol):
    """The seam between sessions and whatever runs sandboxes."""

    async def start(self, spec: SandboxSpec) -> Sandbox:
        """Start a sandbox; EngineError if it cannot be started (nothing is left behind)."""
        ...

    async def run(
        self,
        sandbox: Sandbox,
        request: RunRequest,
        on_progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
        stop: asyncio.Event | None = None,
    ) -> RunResult:
        """Run a command. On timeout, on `stop` being set, or on cancellation its whole
        tree is killed before this returns (or re-raises). `on_output` sees every byte as
        it comes (the result keeps only a bounded part). SandboxBroken if the sandbox is
        gone; EngineError if the engine failed while the sandbox is still there."""
        ...

    async def is_running(self, sandbox: Sandbox) -> bool: ...

    async def remove(self, *sandboxes: Sandbox) -> None:
        """Remove sandboxes at once; missing ones are not an error."""
        ...

    async def list_ours(self, *label_filters: str) -> list[SandboxInfo]:
        """Sandboxes (running or not) carrying every `key=value` label given."""
        ...

    async def snapshot(
        self, sandbox: Sandbox, name: str, labels: Mapping[str, str], passing: bool = False
    ) -> SnapshotInfo:
        """Record the sandbox's file system (not its processes) as image `name` carrying
        `labels`; the sandbox goes on running. EngineError if it cannot (nothing is left).
        `passing`: only for sandboxes this engine starts before `remove_snapshot(name)` (a
        fork's copy): it may be kept outside the image store, and need not be listed."""
        ...

    async def list_snapshots(self, *label_filters: str) -> list[SnapshotInfo]:
        """Snapshots carrying every `key=value` label given."""
        ...

    async def remove_snapshot(self, name: str) -> None:
        """Remove a snapshot; a missing one is not an error. Sandboxes started from it
        keep their files."""
        ...

    def set_egress(self, sandbox: Sandbox, policy: EgressPolicy) -> None:
        """The egress policy that the sandbox's outgoing connections are checked against
        from now on (network mode isolated; before any call: refuse everything)."""
        ...

    async def close(self) -> None:
        """Let work started for cancelled commands finish (kills), then release resources."""
        ...
