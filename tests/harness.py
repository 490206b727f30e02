"""The harness shared by the tests and the benchmark (bench/run.py): start the real server
as a subprocess on a free loopback port, call Podman, list a server's containers, and call
its tools. No pytest here, so that the benchmark can import it (the fixtures stay in
conftest.py).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmcp import Client

from pod_exec_mcp.podman import LABEL_INSTANCE, LABEL_MANAGED

# Instances of every server started through start_server in this process, so that a test
# run (or a benchmark) can check that none of their containers is left behind.
STARTED_INSTANCES: list[str] = []


# A raw MCP initialize request, and the headers streamable HTTP asks of a POST: for tests
# that speak HTTP below any MCP client.
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check)


def containers_of(instance: str) -> list[dict[str, Any]]:
    """Every container (any state) carrying a server instance's label."""
    return containers_with(f"{LABEL_INSTANCE}={instance}")


def containers_with(*labels: str) -> list[dict[str, Any]]:
    """Every container (any state) carrying all of `labels` (`key=value` or `key`)."""
    filters = [arg for label in labels for arg in ("--filter", f"label={label}")]
    out = podman("ps", "--all", "--format", "json", *filters)
    return json.loads(out.stdout or "[]") or []


def assert_podman_healthy() -> None:
    """Podman answers `ps` and `images`, with no "incomplete layer" (a broken storage)."""
    for args in (("ps", "--all"), ("images",)):
        done = podman(*args, check=False)
        assert done.returncode == 0 and "incomplete" not in done.stderr, (args, done.stderr)


def root_disks_left(under: Path, prefix: str = "") -> list[str]:
    """What of sandboxes' root disks (root_disk.py) is still there in directory `under`
    (entries whose name starts with `prefix`): mount points, and loop devices whose
    (nameless) file lives there."""
    start = str(under).rstrip("/") + "/" + prefix
    points = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(start)
    ]
    listed = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    return points + [line for line in listed.splitlines() if start in line]


def assert_no_root_disk_left(under: Path) -> None:
    left = root_disks_left(under)
    assert left == [], f"root disks left behind: {left}"


def remove_containers(ids: list[str]) -> None:
    """Remove containers at once (no stop grace); missing ones are fine."""
    if ids:
        podman("rm", "--force", "--time", "0", "--ignore", *ids, check=False)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `pod_exec_mcp ARGS` to completion (actions and start-up failures, not serving)."""
    return subprocess.run(
        [sys.executable, "-m", "pod_exec_mcp", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2) -> bool:
    """Poll `predicate` until it is true or `timeout` passes (for effects that are async)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    instance: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/mcp"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def containers(self) -> list[dict[str, Any]]:
        return containers_of(self.instance)

    def client(self, legacy: bool = False, **kwargs: Any) -> Client:
        return Client(self.url, mode="legacy" if legacy else "auto", **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    env: dict[str, str],
    log_dir: Path,
    *args: str,
    host: str = "127.0.0.1",
    wait: bool = True,
    prefix: tuple[str, ...] = (),
) -> ServerProcess:
    """Start `python -m pod_exec_mcp` on a free port; with `wait`, return once it listens
    (its instance id read from its log), or raise RuntimeError with its log. `prefix` goes
    before the command line (e.g. a `prlimit` call)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    command = [sys.executable, "-m", "pod_exec_mcp", "--host", host, "--port", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*prefix, *command, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
    server = ServerProcess(proc, port, log_path, host="127.0.0.1" if host == "0.0.0.0" else host)
    if not wait:
        return server

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        with socket.socket() as s:
            return s.connect_ex((server.host, port)) == 0

    if not wait_until(ready, timeout=30) or proc.poll() is not None:
        server.stop()
        raise RuntimeError(f"server did not start:\n{server.log()}")
    match = re.search(r"instance ([0-9a-f]{16})", server.log())
    if not match:
        server.stop()
        raise RuntimeError(f"server log names no instance:\n{server.log()}")
    server.instance = match.group(1)
    STARTED_INSTANCES.append(server.instance)
    return server


def structured(result: Any) -> dict[str, Any]:
    """The structured content of a successful tool result."""
    assert not result.is_error, result.content
    return result.structured_content


def error_text(result: Any) -> str:
    """The text of a tool error result."""
    assert result.is_error, result.structured_content
    return result.content[0].text


async def sh(client: Client, command: str, **arguments: Any) -> dict[str, Any]:
    """Run `command` through shell_exec and return {output, retval, ...}."""
    return structured(
        await client.call_tool(
            "shell_exec", {"command": command, **arguments}, raise_on_error=False
        )
    )


async def new_session(client: Client) -> str:
    return structured(await client.call_tool("create_session", {}))["session_id"]


__all__ = [
    "LABEL_INSTANCE",
    "LABEL_MANAGED",
    "STARTED_INSTANCES",
    "ServerProcess",
    "containers_of",
    "containers_with",
    "error_text",
    "free_port",
    "new_session",
    "podman",
    "remove_containers",
    "run_cli",
    "sh",
    "start_server",
    "structured",
    "wait_until",
]
