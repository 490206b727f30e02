#!/usr/bin/env python3
"""Idle legacy MCP sessions against a real legacy client (issue 22, item 7).

    python bench/legacy_flood.py                          # 10,000 initializes, cap 1000
    python bench/legacy_flood.py --initializes 2000 --cap 100 --json /tmp/flood.json

It starts the real server (tests/harness.py, a free loopback port) with
`--max-legacy-sessions CAP`, connects one legacy client that runs a command (a working
client), then sends INITIALIZES legacy `initialize` requests that are never used, and
finally connects a new legacy client and runs a command. It reports the HTTP statuses of
the flood, whether both clients worked, and the server's RSS (VmRSS) before and after.
Figures, never assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from fastmcp import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import (  # noqa: E402  (tests/ is put on the path just above)
    containers_of,
    remove_containers,
    sh,
    start_server,
)

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "squatter", "version": "1"},
    },
}
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def works(url: str) -> str:
    """What a new legacy client's command printed, or the error it got."""
    try:
        async with Client(url, mode="legacy") as client:
            return str((await sh(client, "echo in"))["output"]).strip()
    except Exception as exc:  # the figure is the failure itself
        return f"failed: {exc}"


async def flood(url: str, pid: int, initializes: int) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    async with Client(url, mode="legacy") as early, httpx.AsyncClient(timeout=30) as raw:
        await sh(early, "true")
        idle = rss_kib(pid)
        body = json.dumps(INITIALIZE)
        for _ in range(initializes):
            statuses[(await raw.post(url, content=body, headers=HEADERS)).status_code] += 1
        after = rss_kib(pid)
        late = await works(url)
        early_after = str((await sh(early, "echo still"))["output"]).strip()
    return {
        "initializes": initializes,
        "statuses": dict(statuses),
        "late_client": late,
        "early_client_after_flood": early_after,
        "rss_before_kib": idle,
        "rss_after_kib": after,
        "growth_mib": round((after - idle) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--initializes", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = dict(os.environ)
    env.setdefault("POD_EXEC_MCP_DISK_LIMIT", "0")  # not what is measured
    with tempfile.TemporaryDirectory() as tmp:
        env["XDG_STATE_HOME"] = f"{tmp}/state"
        env["XDG_CONFIG_HOME"] = f"{tmp}/config"
        server = start_server(env, Path(tmp), "--max-legacy-sessions", str(args.cap))
        try:
            report = asyncio.run(flood(server.url, server.pid, args.initializes))
        finally:
            server.stop()
            remove_containers([c["Id"] for c in containers_of(server.instance)])
    report["cap"] = args.cap
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
