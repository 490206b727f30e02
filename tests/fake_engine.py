"""An in-memory SandboxEngine, for the pure logic of the sessions layer only.

Everything that touches containers is tested against real Podman elsewhere; this fake
only lets the tests drive sessions, the pool, limits and recovery in milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pod_exec_mcp.egress import EgressPolicy
from pod_exec_mcp.engine import (
    EngineError,
    OutputCallback,
    ProgressCallback,
    RunRequest,
    RunResult,
    Sandbox,
    SandboxBroken,
    SandboxInfo,
    SandboxSpec,
    SnapshotInfo,
)
from pod_exec_mcp.shell_state import COMMAND_ENV


@dataclass
class FakeEngine:
    """Sandboxes are names in a dict; a command's behaviour is set by `behaviour`."""

    running: dict[str, SandboxSpec] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    fail_start: str | None = None
    # command -> what run() does with it; default: echo the command back, exit 0.
    behaviour: dict[str, Callable[..., Any]] = field(default_factory=dict)
    active_runs: int = 0
    most_active_runs: int = 0
    # sandbox name -> the egress policy the sessions layer set for it.
    egress: dict[str, EgressPolicy] = field(default_factory=dict)
    # Snapshots by image name; each one's size; a failure for snapshot() to raise.
    snapshots: dict[str, SnapshotInfo] = field(default_factory=dict)
    snapshot_size: int = 1000
    fail_snapshot: str | None = None

    async def start(self, spec: SandboxSpec) -> Sandbox:
        if self.fail_start is not None:
            raise EngineError(self.fail_start)
        if spec.image.startswith("localhost/pod_exec_mcp_snapshot") and (
            spec.image not in self.snapshots
        ):
            raise EngineError(f"image {spec.image} not known")
        self.running[spec.name] = spec
        self.started.append(spec.name)
        return Sandbox(spec.name, spec.labels)

    async def run(
        self,
        sandbox: Sandbox,
        request: RunRequest,
        on_progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
        stop: asyncio.Event | None = None,
    ) -> RunResult:
        if sandbox.name not in self.running:
            raise SandboxBroken(f"the sandbox container {sandbox.name} is gone")
        # The agent's command, whether or not the persistent-shell script wraps it.
        command = request.env.get(COMMAND_ENV, request.command)
        self.active_runs += 1
        self.most_active_runs = max(self.most_active_runs, self.active_runs)
        try:
            act = self.behaviour.get(command)
            if act is not None:
                outcome = act(sandbox, on_output or (lambda _: None), stop or asyncio.Event())
                if asyncio.iscoroutine(outcome):
                    outcome = await outcome
                if isinstance(outcome, RunResult):
                    return outcome
            return RunResult(command, 0, False, False, 0.0)
        finally:
            self.active_runs -= 1

    async def is_running(self, sandbox: Sandbox) -> bool:
        return sandbox.name in self.running

    async def remove(self, *sandboxes: Sandbox) -> None:
        for sandbox in sandboxes:
            self.running.pop(sandbox.name, None)
            self.removed.append(sandbox.name)

    async def list_ours(self, *label_filters: str) -> list[SandboxInfo]:
        wanted = dict(f.split("=", 1) for f in label_filters)
        return [
            SandboxInfo(name, name, dict(spec.labels), "running")
            for name, spec in self.running.items()
            if all(spec.labels.get(k) == v for k, v in wanted.items())
        ]

    async def snapshot(
        self, sandbox: Sandbox, name: str, labels: Mapping[str, str], passing: bool = False
    ) -> SnapshotInfo:
        if sandbox.name not in self.running:
            raise EngineError(f"no such container {sandbox.name}")
        if self.fail_snapshot is not None:
            raise EngineError(self.fail_snapshot)
        info = SnapshotInfo(name, dict(labels), self.snapshot_size, time.time())
        self.snapshots[name] = info
        return info

    async def list_snapshots(self, *label_filters: str) -> list[SnapshotInfo]:
        wanted = dict(f.split("=", 1) for f in label_filters)
        return [
            s
            for s in self.snapshots.values()
            if all(s.labels.get(k) == v for k, v in wanted.items())
        ]

    async def remove_snapshot(self, name: str) -> None:
        self.snapshots.pop(name, None)

    def set_egress(self, sandbox: Sandbox, policy: EgressPolicy) -> None:
        self.egress[sandbox.name] = policy

    async def close(self) -> None:
        return None
