"""The server image (Dockerfile), end to end, the way a user runs it.

Built with Podman from the checkout. Then a `podman system service` serves a Podman API
socket of its own, the server image runs against that socket (mounted, CONTAINER_HOST), and a
fastmcp client calls shell_exec through the containerised server, which starts its sandbox on
the host's Podman. Stopping the server must leave none of its sandboxes behind; after a
kill -9, the next server with the same state volume must remove the dead one's.
The image's own pod_exec_mcp_build must also build the sandbox image through that socket.

Socket permissions: the socket is rootful (root:root, 0600 as the service creates it). The
image runs as a non-root user (uid 10001), and the test keeps it that way: the socket is
given a group (SOCKET_GID) and mode 0660, and the container joins that group with
--group-add. That is the recipe docs/install.md gives for a rootful socket; the socket sits in
a private 0700 directory, so nothing else on the host can reach it.

The image is built with --layers=false: no intermediate image is kept, so nothing but the
final tag (removed at the end) is left behind even if the build fails. The price is a cold
build on every run (CI machines start clean anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FIGURES, IMAGE, disk_limit_by
from dist_helpers import (
    BASE_IMAGE,
    ROOT,
    TEST_LABEL,
    pip_ca_build_args,
    podman,
    remove_image,
    run,
    timed,
    unique,
)
from fastmcp import Client

from pod_exec_mcp.podman import LABEL_INSTANCE, LABEL_MANAGED

pytestmark = [pytest.mark.slow, pytest.mark.podman]

TOKEN = secrets.token_urlsafe(24)
SOCKET_GID = 47011  # any group will do: only the container joins it
SANDBOX_IMAGE = "pod_exec_mcp_base"


@pytest.fixture(scope="module")
def server_image() -> Iterator[str]:
    tag = f"localhost/{unique('pod_exec_mcp_server_test')}"
    try:
        with timed("server image: cold build (podman build --layers=false --jobs=2)"):
            run(
                [
                    "podman", "build", "--layers=false", "--force-rm", "--jobs=2",
                    "--tag", tag, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                    *pip_ca_build_args(), "--file", ROOT / "Dockerfile", ROOT,
                ],
                timeout=900,
            )  # fmt: skip
        yield tag
    finally:
        remove_image(tag)


def test_image_runs_as_non_root_with_a_remote_podman_client(server_image: str) -> None:
    config = json.loads(podman("image", "inspect", server_image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert "8000/tcp" in config["ExposedPorts"]
    assert "MCP_HOST=0.0.0.0" in config["Env"]
    assert "CONTAINER_HOST=unix:///run/podman/podman.sock" in config["Env"]
    assert config["Entrypoint"] == ["pod_exec_mcp"]

    script = "id -u; pod_exec_mcp --version; podman --version; podman info 2>&1 || true"
    out = podman("run", "--rm", "--entrypoint", "sh", server_image, "-c", script).stdout
    uid, version, podman_version, *info = out.splitlines()
    assert uid == "10001"
    assert version.startswith("pod_exec_mcp ")
    assert podman_version.startswith("podman version ")
    # Without a socket the client has nothing to talk to: it is a remote-only client.
    assert "unable to connect to Podman socket" in "\n".join(info)


def test_refuses_to_listen_off_loopback_without_a_token(server_image: str) -> None:
    done = podman("run", "--rm", server_image, check=False)
    assert done.returncode != 0
    assert "refusing to listen on 0.0.0.0 without authentication" in done.stderr


def _wait_for(predicate: Any, timeout: float, what: str, logs: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{logs()}", pytrace=False)
        time.sleep(0.2)


def _socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(str(path)) == 0


@pytest.fixture(scope="module")
def podman_socket() -> Iterator[Path]:
    """A Podman API socket of our own (`podman system service`), usable by group SOCKET_GID."""
    # A short path: a unix socket path must stay under 108 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="pem-sock-"))
    sock = socket_dir / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=(socket_dir / "service.log").open("wb"),
        start_new_session=True,
    )
    try:
        _wait_for(lambda: _socket_answers(sock), 30, "the Podman API socket")
        os.chown(sock, 0, SOCKET_GID)
        os.chmod(sock, 0o660)
        yield sock
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _socket_args(sock: Path) -> list[str]:
    """`podman run` arguments that give the image's non-root user our socket."""
    return ["--volume", f"{sock}:/run/podman/podman.sock", "--group-add", str(SOCKET_GID)]


def test_builds_the_sandbox_image_through_the_socket(
    server_image: str, podman_socket: Path
) -> None:
    """The one-liner docs/install.md gives for hosts without a checkout or pipx."""
    tag = f"localhost/{unique('pod_exec_mcp_remote_build_test')}"
    try:
        podman(
            "run", "--rm", "--label", f"{TEST_LABEL}=server-image", *_socket_args(podman_socket),
            "--entrypoint", "pod_exec_mcp_build", server_image, "--tag", tag,
            "--agent-tag", f"{tag}_agent",
            timeout=900,
        )  # fmt: skip
        assert podman("image", "exists", tag, check=False).returncode == 0
        assert podman("image", "exists", f"{tag}_agent", check=False).returncode == 0
    finally:
        remove_image(tag)
        remove_image(f"{tag}_agent")


@dataclass
class Deployment:
    """The containerised server, running against our Podman socket."""

    name: str
    url: str = ""
    instance: str = ""

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def sandboxes(self) -> list[dict[str, Any]]:
        """Our server's sandbox containers, as the host's Podman lists them."""
        assert self.instance
        out = podman(
            "ps", "--all", "--format", "json",
            "--filter", f"label={LABEL_MANAGED}=true",
            "--filter", f"label={LABEL_INSTANCE}={self.instance}",
        ).stdout  # fmt: skip
        return json.loads(out or "[]") or []


@pytest.fixture
def deploy(server_image: str, podman_socket: Path) -> Iterator[Callable[..., Deployment]]:
    """Starts servers from the image (extra `podman run` arguments allowed); at the end,
    removes them and any sandbox of theirs still there."""
    made: list[Deployment] = []

    def _deploy(*run_args: str) -> Deployment:
        dep = Deployment(unique("pod_exec_mcp_server_test"))
        made.append(dep)
        podman(
            "run", "--detach", "--name", dep.name, "--label", f"{TEST_LABEL}=server-image",
            "--publish", "127.0.0.1::8000", *_socket_args(podman_socket),
            "--env", f"POD_EXEC_MCP_AUTH_TOKEN={TOKEN}", "--env", f"POD_EXEC_MCP_IMAGE={IMAGE}",
            *run_args,
            # Through remote Podman only a storage quota enforces the default disk limit
            # (loop disks need the host); without one the server rightly refuses to start.
            *([] if disk_limit_by() == "storage quota" else ["--env", "POD_EXEC_MCP_DISK_LIMIT=0"]),
            server_image,
        )  # fmt: skip
        port = podman("port", dep.name, "8000/tcp").stdout.strip().rsplit(":", 1)[1]
        dep.url = f"http://127.0.0.1:{port}/mcp"

        def started() -> bool:
            logs = dep.logs()
            if "serving MCP at" in logs:
                return True
            state = podman("inspect", "--format", "{{.State.Running}}", dep.name, check=False)
            if state.stdout.strip() != "true":
                pytest.fail(f"the server container stopped:\n{logs}", pytrace=False)
            return False

        _wait_for(started, 60, "the server to listen", dep.logs)
        match = re.search(r"instance ([0-9a-f]{16})", dep.logs())
        assert match, dep.logs()
        dep.instance = match.group(1)
        return dep

    try:
        yield _deploy
    finally:
        for dep in made:
            podman("rm", "--force", "--time", "0", "--ignore", dep.name, check=False)
            if dep.instance:  # a sandbox its server failed to remove
                for c in dep.sandboxes():
                    podman("rm", "--force", "--time", "0", "--ignore", c["Id"], check=False)


@pytest.fixture
def state_volume() -> Iterator[str]:
    name = unique("pod_exec_mcp_state_test")
    try:
        yield name
    finally:
        podman("volume", "rm", "--force", name, check=False)


async def test_shell_exec_through_the_containerised_server(
    deploy: Callable[..., Deployment],
) -> None:
    started = time.monotonic()
    deployment = await asyncio.to_thread(deploy)
    # Off loopback, with a token: a request without it is refused.
    async with httpx.AsyncClient() as http:
        refused = await http.post(deployment.url, json={}, headers={"Accept": "*/*"})
    assert refused.status_code == 401

    # A legacy (2025-11-25) session: its own sandbox, on the host's Podman.
    async with Client(deployment.url, mode="legacy", auth=TOKEN) as client:
        result = await client.call_tool(
            "shell_exec", {"command": "echo hello-$((6*7)); hostname; echo x > /workspace/f"}
        )
        out = result.structured_content
        assert out["retval"] == 0, out
        greeting, hostname = out["output"].splitlines()
        assert greeting == "hello-42"
        sandboxes = await asyncio.to_thread(deployment.sandboxes)
        assert len(sandboxes) == 1, sandboxes
        assert sandboxes[0]["Id"].startswith(hostname)
        assert SANDBOX_IMAGE in sandboxes[0]["Image"]
        again = await client.call_tool("shell_exec", {"command": "cat /workspace/f"})
        assert again.structured_content["output"] == "x\n"

    # A stateless (2026-07-28) session, left open: the server's shutdown must remove it.
    async with Client(deployment.url, auth=TOKEN) as client:
        created = await client.call_tool("create_session", {})
        session_id = created.structured_content["session_id"]
        result = await client.call_tool(
            "shell_exec", {"command": "echo modern", "session_id": session_id}
        )
        assert result.structured_content["output"] == "modern\n"

    # SIGTERM (podman stop): the server removes every sandbox of its own, then exits 0.
    await asyncio.to_thread(podman, "stop", "--time", "30", deployment.name)
    exit_code = await asyncio.to_thread(
        podman, "inspect", "--format", "{{.State.ExitCode}}", deployment.name
    )
    logs = await asyncio.to_thread(deployment.logs)
    assert exit_code.stdout.strip() == "0", logs
    assert "every sandbox of this server was removed" in logs
    assert await asyncio.to_thread(deployment.sandboxes) == [], logs
    FIGURES["server image: end-to-end check (two sessions, stop)"] = (
        f"{time.monotonic() - started:.1f} s"
    )


async def test_a_restarted_server_removes_the_sandboxes_of_a_killed_one(
    deploy: Callable[..., Deployment], state_volume: str
) -> None:
    """The crash-safe way to run the image (docs/install.md): a state volume kept across
    restarts (each container gets a new hostname), so that the next server owns the dead
    one's sandboxes and sweeps them at start-up."""
    persistent = ("--volume", f"{state_volume}:/home/pod_exec_mcp/.local/state")
    first = await asyncio.to_thread(deploy, *persistent)
    async with Client(first.url, auth=TOKEN) as client:
        await client.call_tool("create_session", {})
    assert len(await asyncio.to_thread(first.sandboxes)) == 1
    await asyncio.to_thread(podman, "kill", "--signal", "KILL", first.name)

    second = await asyncio.to_thread(deploy, *persistent)
    assert "removed 1 orphaned container(s)" in await asyncio.to_thread(second.logs)
    assert await asyncio.to_thread(first.sandboxes) == []
