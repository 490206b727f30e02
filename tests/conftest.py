"""Fixtures that run the real server, against real Podman and the real image.

Every server a test starts is a subprocess (`python -m pod_exec_mcp`) on a free port, with
its own state and config dirs under a per-run temporary directory. At the end of the run,
no container of any instance the tests started may be left (checked by label).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client

from pod_exec_mcp.podman import LABEL_INSTANCE, LABEL_MANAGED

IMAGE = os.environ.get("POD_EXEC_MCP_IMAGE", "pod_exec_mcp_base")
# Settings a CI run may give every test server, to run the same suites another way
# (e.g. POD_EXEC_MCP_EXEC_CHANNEL=podman-exec, POD_EXEC_MCP_RUNTIME=runsc).
# POD_EXEC_MCP_AGENT_IMAGE goes with POD_EXEC_MCP_IMAGE (images built under other tags);
# POD_EXEC_MCP_DISK_LIMIT, when set, overrides the detection in `server_env`.
PASSED_TO_SERVERS = (
    "POD_EXEC_MCP_EXEC_CHANNEL",
    "POD_EXEC_MCP_RUNTIME",
    "POD_EXEC_MCP_AGENT_IMAGE",
    "POD_EXEC_MCP_DISK_LIMIT",
)
# The OCI runtime of every test server's sandboxes (`POD_EXEC_MCP_RUNTIME=runsc pytest ...`
# runs the suites under gVisor).
RUNTIME = os.environ.get("POD_EXEC_MCP_RUNTIME", "")
GVISOR = RUNTIME.rsplit("/", 1)[-1].startswith("runsc")
STARTED_INSTANCES: list[str] = []
# Figures measured by tests (not asserted on), printed at the end of the run.
FIGURES: dict[str, Any] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("figures measured by the tests")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check)


def containers_of(instance: str) -> list[dict[str, Any]]:
    out = podman(
        "ps", "--all", "--format", "json", "--filter", f"label={LABEL_INSTANCE}={instance}"
    )
    return json.loads(out.stdout or "[]") or []


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


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.2) -> bool:
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
    _log: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/mcp"

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


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pod_exec_mcp")


@pytest.fixture(scope="session")
def server_env(run_dir: Path) -> dict[str, str]:
    """Environment for test servers: their own state and config dirs, nothing from ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POD_EXEC_MCP_", "MCP_")) or k in PASSED_TO_SERVERS
    }
    env["XDG_STATE_HOME"] = str(run_dir / "state")
    env["XDG_CONFIG_HOME"] = str(run_dir / "config")
    env["POD_EXEC_MCP_IMAGE"] = IMAGE
    # Test servers share one state dir: a periodic sweep by one would remove the orphans
    # that lifecycle tests make and inspect. The sweep's own test sets an interval.
    env["POD_EXEC_MCP_SWEEP_INTERVAL"] = "0"
    if "POD_EXEC_MCP_DISK_LIMIT" not in env and not disk_quota_supported():
        # This host's storage cannot enforce a size per sandbox (e.g. overlay on ext4), so
        # servers with the default --disk-limit rightly refuse to start (test_containment
        # checks that refusal); every other test runs without the limit, and says so.
        env["POD_EXEC_MCP_DISK_LIMIT"] = "0"
        FIGURES["disk limit"] = (
            "this host's Podman storage cannot enforce --disk-limit: test servers run with "
            "POD_EXEC_MCP_DISK_LIMIT=0"
        )
    return env


_QUOTA: list[bool] = []


def disk_quota_supported() -> bool:
    """Whether Podman's storage here enforces `--storage-opt size=` (asked once)."""
    if not _QUOTA:
        done = podman(
            "run", "--rm", "--log-driver", "none", "--storage-opt", "size=1g", IMAGE, "true",
            check=False,
        )  # fmt: skip
        _QUOTA.append(done.returncode == 0)
    return _QUOTA[0]


def start_server(
    env: dict[str, str],
    log_dir: Path,
    *args: str,
    host: str = "127.0.0.1",
    wait: bool = True,
    prefix: tuple[str, ...] = (),
) -> ServerProcess:
    """Start a server; `prefix` goes before the command line (e.g. a `prlimit` call)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "pod_exec_mcp",
                "--host",
                host,
                "--port",
                str(port),
                *args,
            ],
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
    assert match, server.log()
    server.instance = match.group(1)
    STARTED_INSTANCES.append(server.instance)
    return server


@pytest.fixture(scope="session")
def launch(
    server_env: dict[str, str], run_dir: Path, no_container_left_behind: None
) -> Iterator[Any]:
    """Start extra servers with given flags; all are stopped at the end of the run."""
    started: list[ServerProcess] = []

    def _launch(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> ServerProcess:
        server = start_server({**server_env, **(env or {})}, run_dir, *args, **kwargs)
        started.append(server)
        return server

    yield _launch
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(launch: Any) -> ServerProcess:
    """A server with default settings, shared by a test module."""
    return launch()


@pytest.fixture(scope="session")
def no_container_left_behind() -> Iterator[None]:
    """Checks that Podman and the image are there, and fails the run if any container of a
    server the tests started is still there at the end. Requested by every fixture that
    starts servers, not autouse: the unit tests must run where there is no podman at all."""
    if subprocess.run(["podman", "--version"], capture_output=True).returncode != 0:
        pytest.exit("podman is not usable here; run the tests through scripts/dev.sh test", 2)
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.exit(f"image {IMAGE} is missing; build it with pod_exec_mcp_build", 2)
    yield
    leftovers = [c for i in STARTED_INSTANCES for c in containers_of(i)]
    if leftovers:
        podman("rm", "-f", "-t", "0", *[c["Id"] for c in leftovers], check=False)
        pytest.fail(f"containers left behind: {[c['Names'] for c in leftovers]}")


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
    "FIGURES",
    "GVISOR",
    "IMAGE",
    "LABEL_MANAGED",
    "RUNTIME",
    "ServerProcess",
    "containers_of",
    "disk_quota_supported",
    "error_text",
    "new_session",
    "podman",
    "run_cli",
    "sh",
    "structured",
    "wait_until",
]
