"""Repairs, for `pod_exec_mcp --cleanup`, what the loop disks of earlier versions left in
Podman's storage.

Those versions mounted a sandbox's loop disk on its overlay layer directory inside
Podman's storage, and bind-mounted its run directory from it. Where nothing else ran,
Podman's own bind-mount of its storage home hid such a mount; at removal the layer
could not be deleted (EBUSY), was flagged incomplete, and every later podman command
failed on it (docs/disk-limit.md). This version never mounts there. What is left is
unmounted here, once its container is gone: the hidden kind by first lifting the bind
that hides it (only possible while no container has a layer mounted), then Podman
itself finishes deleting the layer at its next command.
"""

from __future__ import annotations

import errno
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pod_exec_mcp import mount_api
from pod_exec_mcp.podman import Podman, PodmanError

# The directory name, inside an old loop disk, its run-directory bind came from.
_OLD_RUN_DIR = "/pod_exec_mcp-run"


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    id: int
    root: str
    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 5 or len(fields) < dash + 3:
            continue
        mounts.append(
            Mount(
                id=int(fields[0]),
                root=_unescape(fields[3]),
                point=_unescape(fields[4]),
                fstype=fields[dash + 1],
                source=_unescape(fields[dash + 2]),
            )
        )
    return mounts


def _under(path: str, directory: str) -> bool:
    return bool(directory) and path.startswith(directory.rstrip("/") + "/")


def stale_mounts(
    mounts: list[Mount],
    graph_root: str,
    run_root: str,
    layers_in_use: set[str],
    containers: set[str],
) -> list[Mount]:
    """The old versions' mounts whose sandbox is gone, run-directory binds first (they
    sit on top of nothing of Podman's): loop disks on a layer directory of `graph_root`
    no container uses, and binds of an old loop disk's run directory under `run_root`
    for containers that no longer exist."""
    binds, disks = [], []
    overlay = graph_root.rstrip("/") + "/overlay"
    for mount in mounts:
        if mount.root == _OLD_RUN_DIR and _under(mount.point, run_root):
            # .../overlay-containers/ID/userdata
            parts = mount.point.rstrip("/").split("/")
            if len(parts) >= 2 and parts[-2] not in containers:
                binds.append(mount)
        elif (
            mount.fstype == "ext4"
            and mount.source.startswith("/dev/loop")
            and _under(mount.point, overlay)
            and mount.point.count("/") == overlay.count("/") + 1
            and mount.point not in layers_in_use
        ):
            disks.append(mount)
    return binds + disks


def configured_store(environ: dict[str, str] | None = None) -> tuple[str, str]:
    """Rootful Podman's graph root and run root as its storage.conf sets them (the lookup
    and defaults of containers-storage.conf(5)); for when `podman info` itself fails."""
    environ = dict(os.environ) if environ is None else environ
    candidates = (
        environ.get("CONTAINERS_STORAGE_CONF", ""),
        "/etc/containers/storage.conf",
        "/usr/share/containers/storage.conf",
    )
    storage: dict[str, object] = {}
    for candidate in filter(None, candidates):
        try:
            with open(candidate, "rb") as file:
                storage = tomllib.load(file).get("storage", {})
            break
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PodmanError(f"cannot read Podman's storage settings {candidate}: {exc}") from None
    return (
        str(storage.get("graphroot") or "/var/lib/containers/storage"),
        str(storage.get("runroot") or "/run/containers/storage"),
    )


async def _podman_facts(podman: Podman) -> tuple[str, str, set[str], set[str]]:
    """Podman's graph root, run root, the layer directories containers use and the
    containers' IDs. The stale layers make `podman info` fail (it cannot delete them):
    then the roots come from the storage settings. PodmanError if Podman cannot list
    its containers."""
    done = await podman.run("info", "--format", "json", check=False)
    try:
        store = json.loads(done.stdout).get("store", {}) if done.returncode == 0 else {}
    except ValueError:
        store = {}
    graph_root, run_root = (
        (store.get("graphRoot", ""), store.get("runRoot", "")) if store else configured_store()
    )
    listed = await podman.run("ps", "--all", "--no-trunc", "--format", "{{.ID}}", check=False)
    if listed.returncode != 0:
        raise PodmanError(f"podman ps failed: {listed.error_text}")
    ids = listed.stdout.split()
    layers: set[str] = set()
    if ids:
        done = await podman.run(
            "container", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
            *[i.decode() for i in ids], check=False,
        )  # fmt: skip
        # .../overlay/LAYER/diff -> .../overlay/LAYER
        layers = {line.rsplit("/", 1)[0] for line in done.stdout.decode().split() if line}
    return graph_root, run_root, layers, {i.decode() for i in ids}


async def repair_stale_mounts(podman: Podman, mountinfo: str | None = None) -> list[str]:
    """Unmount what earlier versions left (see above); one line for each thing done or
    not done, and a last line saying whether Podman's storage is healthy."""
    graph_root, run_root, layers, containers = await _podman_facts(podman)
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()  # noqa: ASYNC240 - procfs
    found = stale_mounts(parse_mountinfo(mountinfo), graph_root, run_root, layers, containers)
    if not found:
        return ["no mounts of an earlier version left in Podman's storage"]
    said: list[str] = []
    home = graph_root.rstrip("/") + "/overlay"
    for mount in found:
        said.append(_unmount_stale(mount, home))
    # Podman finishes deleting the layers it had flagged incomplete at its next command
    # (warning that it does); the one after shows whether the storage is clean.
    await podman.run("images", "--quiet", check=False)
    done = await podman.run("images", "--quiet", check=False)
    healthy = done.returncode == 0 and b"incomplete" not in done.stderr
    said.append(
        "Podman's storage is healthy again (`podman images` succeeds)"
        if healthy
        else f"Podman's storage still reports errors: {done.error_text}"
    )
    return said


def _unmount_stale(mount: Mount, home: str) -> str:
    try:
        mount_api.unmount(mount.point)
        return f"unmounted an earlier version's {mount.fstype} mount at {mount.point}"
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            return f"could not unmount {mount.point}: {exc.strerror or exc}"
    # EINVAL: not a mount point at that path, so hidden under Podman's bind of its home.
    # Lifting the bind fails (EBUSY) while any container has a layer mounted; Podman
    # binds it again at its next command.
    try:
        mount_api.unmount(home)
        mount_api.unmount(mount.point)
    except OSError as exc:
        return (
            f"could not unmount the hidden mount at {mount.point} ({exc.strerror or exc}): "
            "stop the containers that run now, then run --cleanup again"
        )
    return f"unmounted an earlier version's hidden {mount.fstype} mount at {mount.point}"
