#!/usr/bin/env python3
"""What each sandbox profile costs: start-up and warm exec, runc against gVisor (runsc).

    python bench/runtime_cost.py                    # default: 7 starts, 20 execs each
    python bench/runtime_cost.py --reps 15 --execs 40 --image pod_exec_mcp_base

Each profile's sandboxes are started by the server's own engine (PodmanEngine, with the
settings' SandboxSpec; disk limit off but in the profile that measures it, enforced as the
server would here: a root disk or a storage quota), so the figures are what a session
sees: start-up is `podman run -d ...` (with a root disk: the disk, then the run) plus
attaching the exec agent; a warm exec is `true` over the agent, and
also through one `podman exec` (the fallback channel). Profiles alternate within every
repetition so that a shared machine's noise hits all alike. Every container carries the
label bench.runtime_cost=RUN and is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pod_exec_mcp.config import Settings
from pod_exec_mcp.engine import RunRequest, Sandbox, sandbox_spec
from pod_exec_mcp.podman import Podman
from pod_exec_mcp.podman_engine import PodmanEngine, podman_facts
from pod_exec_mcp.root_disk import IdRange, RootDisks

PROFILES = {
    "runc, user namespace, --disk-limit 10g (default)": {"disk_limit": "10g"},
    "runc, user namespace, --disk-limit 0": {},
    "runc, --userns host": {"userns": "host"},
    "gVisor (runsc)": {"runtime": "runsc"},
}
TRUE = RunRequest(
    command="true", timeout=30, kill_grace=1, max_output_bytes=4096, progress_interval=30
)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--image", default="pod_exec_mcp_base")
    parser.add_argument("--agent-image", default="pod_exec_mcp_agent")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--execs", type=int, default=20)
    opts = parser.parse_args()
    run = secrets.token_hex(4)
    podman = Podman()
    facts = await podman_facts(podman)
    root_disks = (
        RootDisks(Path(tempfile.mkdtemp(prefix="pod_exec_mcp-bench-")), podman, IdRange.read())
        if facts.disk_limit_by_root_disk()
        else None
    )
    engine = PodmanEngine(podman, root_disks=root_disks)
    starts: dict[str, list[float]] = {p: [] for p in PROFILES}
    agent: dict[str, list[float]] = {p: [] for p in PROFILES}
    execs: dict[str, list[float]] = {p: [] for p in PROFILES}
    try:
        for rep in range(opts.reps):
            for index, (profile, overrides) in enumerate(PROFILES.items()):
                settings = Settings.model_validate(
                    {"image": opts.image, "agent_image": opts.agent_image, "disk_limit": "0"}
                    | overrides
                )
                spec = sandbox_spec(
                    settings, f"bench-rt-{run}-{rep}-{index}", {"bench.runtime_cost": run}
                )
                started = time.monotonic()
                sandbox = await engine.start(spec)
                starts[profile].append(time.monotonic() - started)
                if rep == 0:  # warm execs into the first sandbox of each profile
                    await engine.run(sandbox, TRUE)
                    for _ in range(opts.execs):
                        started = time.monotonic()
                        await engine.run(sandbox, TRUE)
                        agent[profile].append(time.monotonic() - started)
                    for _ in range(opts.execs):
                        started = time.monotonic()
                        await engine.podman.run("exec", sandbox.name, "/bin/sh", "-lc", "true")
                        execs[profile].append(time.monotonic() - started)
                await engine.remove(Sandbox(spec.name, spec.labels))
    finally:
        left = await engine.list_ours(f"bench.runtime_cost={run}")
        await engine.remove(*[info.as_sandbox() for info in left])
        await engine.close()
        if root_disks is not None:
            root_disks.close()
            shutil.rmtree(root_disks.directory, ignore_errors=True)
    print(f"disk limit by: {'root disk' if root_disks else 'storage quota'}")
    print(
        "| profile | start-up (run + agent attach), median | warm `true` over the agent, "
        "median | warm `podman exec ... true`, median |"
    )
    print("|---|---|---|---|")
    for profile in PROFILES:
        start = statistics.median(starts[profile]) * 1000
        warm = statistics.median(agent[profile]) * 1000
        exec_ = statistics.median(execs[profile]) * 1000
        print(f"| {profile} | {start:.0f} ms | {warm:.1f} ms | {exec_:.0f} ms |")


if __name__ == "__main__":
    asyncio.run(main())
