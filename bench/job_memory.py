#!/usr/bin/env python3
"""The server's memory when one session runs many background jobs and never reads them.

    python bench/job_memory.py                    # 10,000 jobs of 64 KiB each
    python bench/job_memory.py --jobs 2000 --bytes 65536 --json /tmp/jobs.json

It starts the real server (tests/harness.py, a free loopback port), creates one session,
makes a warm call, and reads the server's RSS (VmRSS in /proc/PID/status): the idle
figure. Then it starts `--jobs` jobs that each print `--bytes` bytes and exit, never
reading one (a start refused because the session already runs its maximum is retried
after the next job ends), waits until all have ended, and reads the RSS again. Issue 22
asks for at most 30 MiB above idle after 10,000 such jobs. Figures, never assertions: the
numbers are for people to judge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastmcp import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import (  # noqa: E402  (tests/ is put on the path just above)
    containers_of,
    error_text,
    remove_containers,
    start_server,
    structured,
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def start_one(client: Client, session_id: str, command: str) -> str:
    """Start a job, waiting out the session's cap on running jobs."""
    for _ in range(10_000):
        result = await client.call_tool(
            "start_job", {"command": command, "session_id": session_id}, raise_on_error=False
        )
        if not result.is_error:
            return str(structured(result)["job_id"])
        if "already runs" not in error_text(result):
            raise RuntimeError(error_text(result))
        await asyncio.sleep(0.02)
    raise RuntimeError("the session never had room for another job")


async def measure(url: str, pid: int, jobs: int, size: int) -> dict[str, Any]:
    command = f"head -c {size} /dev/zero | tr '\\0' x"
    async with Client(url) as client:
        sid = str(structured(await client.call_tool("create_session", {}))["session_id"])
        await client.call_tool("shell_exec", {"command": "true", "session_id": sid})
        await asyncio.sleep(1)
        idle = rss_kib(pid)
        started = time.monotonic()
        ids = [await start_one(client, sid, command) for _ in range(jobs)]
        # The last jobs end on their own; only the newest is read, until it has ended.
        last = {"job_id": ids[-1], "session_id": sid, "wait": 5}
        for _ in range(60):
            state = structured(await client.call_tool("read_job", last))
            if not state["running"]:
                break
        await asyncio.sleep(2)
        after = rss_kib(pid)
        oldest = await client.call_tool(
            "read_job", {"job_id": ids[0], "session_id": sid}, raise_on_error=False
        )
        return {
            "jobs": jobs,
            "bytes_per_job": size,
            "seconds": round(time.monotonic() - started, 1),
            "rss_idle_kib": idle,
            "rss_after_kib": after,
            "growth_mib": round((after - idle) / 1024, 1),
            "last_job_running": state["running"],
            "oldest_job_answer": str(
                structured(oldest) if not oldest.is_error else error_text(oldest)
            )[:300],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--bytes", type=int, default=65536)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = dict(os.environ)
    env.setdefault("POD_EXEC_MCP_DISK_LIMIT", "0")  # the server's memory does not depend on it
    with tempfile.TemporaryDirectory() as tmp:
        env["XDG_STATE_HOME"] = f"{tmp}/state"
        env["XDG_CONFIG_HOME"] = f"{tmp}/config"
        server = start_server(env, Path(tmp))
        try:
            report = asyncio.run(measure(server.url, server.pid, args.jobs, args.bytes))
        finally:
            server.stop()
            remove_containers([c["Id"] for c in containers_of(server.instance)])
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
