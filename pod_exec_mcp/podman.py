"""A thin async wrapper around the podman command line.

Plain subprocesses, no API socket of our own: whatever podman the user has (rootless,
rootful, remote through CONTAINER_HOST) works the same way.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The exit status podman uses for its own failures (as opposed to a command's, for exec).
PODMAN_OWN_FAILURE = 125

# Labels that mark our containers, so that they can be found and cleaned.
LABEL_MANAGED = "io.pod_exec_mcp.managed"
LABEL_INSTANCE = "io.pod_exec_mcp.instance"
LABEL_OWNER = "io.pod_exec_mcp.owner"
LABEL_SESSION = "io.pod_exec_mcp.session"
# Labels of snapshot images (besides managed, owner and instance, as on containers): the
# snapshot's id, a hash of the principal it belongs to, and its kind: `snapshot` (kept
# until delete_snapshot) or `fork` (a fork's passing copy, removed once the forks started).
LABEL_SNAPSHOT = "io.pod_exec_mcp.snapshot"
LABEL_SNAPSHOT_PRINCIPAL = "io.pod_exec_mcp.snapshot.principal"
LABEL_SNAPSHOT_KIND = "io.pod_exec_mcp.snapshot.kind"
# A committed snapshot's base image (its layers are shared, so not the snapshot's size).
LABEL_SNAPSHOT_BASE = "io.pod_exec_mcp.snapshot.base"


class PodmanError(RuntimeError):
    """Podman itself failed (not a command inside a container)."""


class PodmanNotFound(PodmanError):
    """The podman executable is not on PATH."""


@dataclass(frozen=True)
class Completed:
    """A finished podman invocation."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def error_text(self) -> str:
        """Podman's own complaint, on one line."""
        text = (
            self.stderr.decode("utf-8", "replace").strip()
            or self.stdout.decode("utf-8", "replace").strip()
        )
        return " ".join(text.split()) or f"exit status {self.returncode}"


def find_podman(executable: str) -> str:
    """The full path of `executable`, or PodmanNotFound with a message a user can act on."""
    path = shutil.which(executable)
    if path is None:
        raise PodmanNotFound(
            f"podman not found: {executable!r} is not on PATH. Install Podman "
            "(e.g. `apt-get install podman`) or point POD_EXEC_MCP_PODMAN at it."
        )
    return path


class Podman:
    """Runs podman commands without blocking the event loop."""

    def __init__(self, executable: str = "podman") -> None:
        self.path = find_podman(executable)
        # Tasks writing stdin to podman clients (kept referenced until done).
        self._feeders: set[asyncio.Task[None]] = set()
        # Told the subcommand of every podman invocation that failed (for the metrics).
        self.on_failure: Callable[[str], None] | None = None

    async def spawn(self, *args: str, stdin: bytes | None = None) -> asyncio.subprocess.Process:
        """Start `podman ARGS` with stdout/stderr piped and stdin from /dev/null, or fed
        `stdin` (written in the background, then closed)."""
        proc = await self._start(args, piped_stdin=stdin is not None)
        if stdin is not None:
            self._feeders.add(asyncio.create_task(_feed(proc, stdin)))
            self._feeders = {t for t in self._feeders if not t.done()}
        return proc

    async def _start(self, args: tuple[str, ...], piped_stdin: bool) -> asyncio.subprocess.Process:
        """`podman ARGS` in a session of its own, so that a Ctrl-C meant for the server does
        not also kill the podman clients it still needs for cleanup."""
        return await asyncio.create_subprocess_exec(
            self.path,
            *args,
            stdin=asyncio.subprocess.PIPE if piped_stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )

    async def run(self, *args: str, check: bool = True, stdin: bytes | None = None) -> Completed:
        """Run `podman ARGS` to completion, feeding it `stdin` if given; with `check`, a
        non-zero exit raises PodmanError."""
        proc = await self._start(args, piped_stdin=stdin is not None)
        try:
            stdout, stderr = await proc.communicate(stdin)
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        done = Completed(proc.returncode or 0, stdout, stderr)
        failed = done.returncode == PODMAN_OWN_FAILURE or (check and done.returncode != 0)
        if failed and self.on_failure is not None:
            self.on_failure(args[0] if args else "?")
        if check and done.returncode != 0:
            raise PodmanError(f"podman {args[0]} failed: {done.error_text}")
        return done

    async def image_exists(self, image: str) -> bool:
        """Whether `image` is in local storage. Podman failing to answer (socket unreachable,
        permission denied: exit 125) raises PodmanError instead of passing for "absent"."""
        done = await self.run("image", "exists", image, check=False)
        if done.returncode in (0, 1):
            return done.returncode == 0
        raise PodmanError(f"podman image exists failed: {done.error_text}")

    async def is_running(self, container: str) -> bool:
        """Whether `container` exists and is running."""
        done = await self.run(
            "container", "inspect", "--format", "{{.State.Running}}", container, check=False
        )
        return done.returncode == 0 and done.stdout.strip() == b"true"

    async def init_pid(self, container: str) -> int | None:
        """The host pid of the container's PID 1, as Podman knows it; None if it has none
        (not running). With remote Podman it is a pid of the remote host."""
        done = await self.run(
            "container", "inspect", "--format", "{{.State.Pid}}", container, check=False
        )
        text = done.stdout.strip()
        return int(text) if done.returncode == 0 and text.isdigit() and int(text) > 0 else None

    async def remove(self, *containers: str) -> None:
        """Remove containers at once (no stop timeout); missing ones are not an error."""
        if containers:
            await self.run("rm", "--force", "--time", "0", "--ignore", *containers, check=False)

    async def list_containers(self, *label_filters: str) -> list[dict[str, Any]]:
        """Containers (running or not) that carry every `key=value` label given."""
        args = ["ps", "--all", "--format", "json"]
        for label in label_filters:
            args += ["--filter", f"label={label}"]
        done = await self.run(*args)
        return json.loads(done.stdout or b"[]") or []

    async def list_images(self, *label_filters: str) -> list[dict[str, Any]]:
        """Images (tagged or not) that carry every label given: `key=value`, or `key` for
        any value. Podman 4.3 ORs several label filters of `images`, so only the first
        goes to Podman and all are checked here."""
        args = ["images", "--all", "--format", "json"]
        if label_filters:
            args += ["--filter", f"label={label_filters[0]}"]
        done = await self.run(*args)
        found: list[dict[str, Any]] = json.loads(done.stdout or b"[]") or []
        return [i for i in found if has_labels(i.get("Labels") or {}, label_filters)]

    async def remove_image(self, image: str) -> bool:
        """Remove an image; missing is not an error. False if a container still uses it
        (then only its tag is removed, and it goes once that container has)."""
        done = await self.run("rmi", image, check=False)
        if done.returncode == 0 or "image not known" in done.error_text:
            return True
        if any(w in done.error_text for w in ("in use", "used by", "dependent children")):
            await self.run("untag", image, check=False)
            return False
        raise PodmanError(f"podman rmi failed: {done.error_text}")


def has_labels(labels: dict[str, str], label_filters: tuple[str, ...]) -> bool:
    """Whether `labels` carry every `key=value` (or `key`, any value) given."""
    for wanted in label_filters:
        key, equals, value = wanted.partition("=")
        if key not in labels or (equals and labels[key] != value):
            return False
    return True


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    """Write `data` to a process's stdin and close it; a process that stopped reading
    (it exited, or was killed) is not an error."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()
        await proc.stdin.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        pass
