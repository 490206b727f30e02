"""Fixtures that run the real server, against real Podman and the real image.

Every server a test starts is a subprocess (`python -m pod_exec_mcp`) on a free port, with
its own state and config dirs under a per-run temporary directory. At the end of the run,
no container of any instance the tests started may be left (checked by label).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    LABEL_MANAGED,
    STARTED_INSTANCES,
    ServerProcess,
    assert_no_root_disk_left,
    assert_podman_healthy,
    containers_of,
    error_text,
    free_port,
    new_session,
    podman,
    run_cli,
    sh,
    start_server,
    structured,
    wait_until,
)

# The launcher and helpers live in harness.py, shared with bench/run.py; tests keep
# importing them from here.
from proxy_harness import Recorder

from pod_exec_mcp.egress import EgressPolicy, is_local, special_reason
from pod_exec_mcp.podman import Podman
from pod_exec_mcp.podman_engine import podman_facts

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
# Figures measured by tests (not asserted on), printed at the end of the run.
FIGURES: dict[str, Any] = {}


def mirror() -> str:
    """The Debian mirror of this host's apt sources (reachable over plain HTTP)."""
    text = Path("/etc/apt/sources.list.d/debian.sources").read_text()
    match = re.search(r"^URIs:\s*(\S+)", text, re.M)
    assert match, text
    return match.group(1).rstrip("/")


def mirror_host() -> str:
    return mirror().split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]


def mirror_rules() -> list[str]:
    """The operator rules a sandbox needs to reach this host's mirror through the egress
    proxy: a CIDR rule for each of its addresses that `public` does not cover (on some
    networks, CI's among them, package mirrors sit in documentation ranges). Empty where
    the mirror is a public address, as on most hosts."""
    addresses = {
        ipaddress.ip_address(info[4][0])
        for info in socket.getaddrinfo(mirror_host(), 80, proto=socket.IPPROTO_TCP)
    }
    return sorted(f"{a}/{a.max_prefixlen}" for a in addresses if special_reason(a) or is_local(a))


def with_mirror() -> tuple[str, str]:
    """`--egress-allow` flags for the default policy plus this host's mirror."""
    return ("--egress-allow", ",".join(["public", *mirror_rules()]))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("figures measured by the tests")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


# Fixtures that call podman: servers' (they all ask for no_container_left_behind), their
# environment (it asks podman how disks are limited), and test_agent's bare sandboxes.
_NEEDS_PODMAN = {"no_container_left_behind", "server_env", "agent_vol"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a podman fixture, so that `-m "not podman"` is the fast
    lane that needs none. Tests that call podman without one carry the mark themselves."""
    for item in items:
        if _NEEDS_PODMAN & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.podman)


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
    if "POD_EXEC_MCP_DISK_LIMIT" not in env and disk_limit_by() is None:
        # This host can enforce no size per sandbox, so servers with the default
        # --disk-limit rightly refuse to start (test_containment checks that refusal);
        # every other test runs without the limit, and says so.
        env["POD_EXEC_MCP_DISK_LIMIT"] = "0"
        FIGURES["disk limit"] = (
            "this host cannot enforce --disk-limit: test servers run with POD_EXEC_MCP_DISK_LIMIT=0"
        )
    elif "POD_EXEC_MCP_DISK_LIMIT" not in env:
        FIGURES["disk limit"] = f"enforced by {disk_limit_by()}"
    return env


_DISK_LIMIT_BY: list[str | None] = []


def disk_limit_by() -> str | None:
    """How servers here enforce --disk-limit: "root disk" (root_disk.py), "storage quota"
    (`--storage-opt size=`), or None: they cannot (asked once)."""
    if not _DISK_LIMIT_BY:
        if asyncio.run(podman_facts(Podman())).disk_limit_by_root_disk():
            _DISK_LIMIT_BY.append("root disk")
        else:
            done = podman(
                "run", "--rm", "--log-driver", "none", "--storage-opt", "size=1g", IMAGE,
                "true", check=False,
            )  # fmt: skip
            _DISK_LIMIT_BY.append("storage quota" if done.returncode == 0 else None)
    return _DISK_LIMIT_BY[0]


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


__all__ = [
    "FIGURES",
    "GVISOR",
    "IMAGE",
    "LABEL_MANAGED",
    "RUNTIME",
    "ServerProcess",
    "assert_no_root_disk_left",
    "assert_podman_healthy",
    "containers_of",
    "disk_limit_by",
    "error_text",
    "free_port",
    "new_session",
    "podman",
    "run_cli",
    "sh",
    "start_server",
    "structured",
    "wait_until",
]


@pytest.fixture
async def proxy_of() -> AsyncIterator[Any]:
    """Start the egress proxy's logic on loopback with a policy (and fake DNS names)."""
    servers: list[asyncio.Server] = []

    async def start(policy: EgressPolicy, names: dict[str, list[str]] | None = None) -> Recorder:
        proxy = Recorder(policy, names)
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        servers.append(server)
        proxy.port = server.sockets[0].getsockname()[1]
        return proxy

    yield start
    for server in servers:
        server.close()
