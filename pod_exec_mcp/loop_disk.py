"""A disk of fixed size under a sandbox's writable layer, for hosts whose storage has no
quota (ext4, or a kernel built without quota support).

Between `podman create` and `podman start`, the container's overlay layer directory (which
holds its upper and work dirs, so /workspace, /tmp and all that apt-get installs) gets a
file system of its own: ext4 on a loop device the size of the limit. The kernel enforces
it: a write past it fails with ENOSPC, and inodes are bounded by the same file system.
The container's run directory (its /etc/hosts and the like) is bind-mounted from the same
file system, so that nothing a sandbox can write lands on the host's disk unbounded.

Nothing outlives the container: the backing file never has a name (O_TMPFILE, in Podman's
own storage, so the host's disk-free figures count it), and the loop device clears itself
(LO_FLAGS_AUTOCLEAR) once the mount goes. `podman rm` removes the layer directory, and
containers/storage unmounts a mount point that is busy before it deletes it, so removal by
Podman (ours, `--rm`, or an orphan sweep) frees everything. Deletions in the sandbox give
the space back to the host (mounted with `discard`, which punches holes in the file).

Needs Podman's overlay storage on this host (not remote), root, loop devices, mkfs.ext4,
mount and cp. See docs/disk-limit.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import struct

# linux/loop.h
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: u32 fd, u32 block_size, struct loop_info64 (232 bytes), u64[8].
# In loop_info64, lo_flags is the u32 after five u64 and three u32: offset 8 + 52.
_LOOP_CONFIG = struct.Struct("=II232s64s")
_LO_FLAGS_OFFSET = 52

_TOOLS = ("mkfs.ext4", "mount", "cp")


class LoopDiskError(Exception):
    """A loop disk could not be made; the message says why."""


def loop_disk_unavailable(driver: str, local: bool) -> str | None:
    """Why this host cannot give sandboxes loop disks; None when it can."""
    if not local:
        return "Podman is remote (CONTAINER_HOST): its storage is not on this host"
    if driver != "overlay":
        return f"Podman's storage driver is {driver or '?'}, not overlay"
    if os.geteuid() != 0:
        return "the server does not run as root (mounting a loop device needs it)"
    if not os.path.exists("/dev/loop-control"):
        return "this host has no loop devices (/dev/loop-control)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH (packages e2fsprogs, util-linux)"
    return None


def _attach_loop(backing_fd: int) -> tuple[str, int]:
    """A free loop device backed by `backing_fd`, set to clear itself on its last close;
    its path and an open descriptor (which keeps it until the mount holds it)."""
    config = bytearray(_LOOP_CONFIG.size)
    struct.pack_into("=I", config, 0, backing_fd)
    struct.pack_into("=I", config, 8 + _LO_FLAGS_OFFSET, _LO_FLAGS_AUTOCLEAR)
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        # Another process may take the free device between the two calls: try again.
        for _ in range(20):
            number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
            path = f"/dev/loop{number}"
            loop_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, bytes(config))
            except OSError:
                os.close(loop_fd)
                continue
            return path, loop_fd
    finally:
        os.close(control)
    raise LoopDiskError("no free loop device could be configured")


async def _tool(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await process.communicate()
    except BaseException:
        # Cancelled (the session went away mid-start): a mount that lands after the
        # caller removed the container would hold the loop disk on an orphan directory.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        said = output.decode(errors="replace").strip()
        raise LoopDiskError(f"{argv[0]} failed ({process.returncode}): {said}")


# Where, in a loop disk, the container's run directory lives (see attach_loop_disk).
RUN_DIR_NAME = "pod_exec_mcp-run"


def _set_owner_and_mode(path: str, like: os.stat_result) -> None:
    os.chown(path, like.st_uid, like.st_gid)
    os.chmod(path, like.st_mode & 0o7777)


async def attach_loop_disk(layer_dir: str, size: int, run_dir: str) -> None:
    """Put a file system of `size` bytes under `layer_dir` (a created, never started
    container's overlay layer), keeping what Podman put there; and under `run_dir` too,
    the container's run directory: Podman bind-mounts /etc/hosts, /etc/resolv.conf,
    /etc/hostname and /run/.containerenv from files there, writable by sandbox root, on
    whatever holds Podman's run root (the root disk on some hosts)."""
    # The layer's siblings' directory: Podman's storage, so the space is counted where
    # admission control looks for it.
    backing = os.open(os.path.dirname(layer_dir), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    loop_fd = -1
    try:
        os.ftruncate(backing, size)
        loop_path, loop_fd = _attach_loop(backing)
        # -d copies the layer directory's few entries (link, lower, diff, work, merged)
        # into the new file system. No journal: it dies with the container, and a journal
        # would take host disk of its own.
        await _tool(
            "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
            "-E", "lazy_itable_init=1,nodiscard", "-d", layer_dir, loop_path,
        )  # fmt: skip
        layer_status = os.stat(layer_dir)
        await _tool("mount", "-t", "ext4", "-o", "discard", loop_path, layer_dir)
        _set_owner_and_mode(layer_dir, layer_status)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(layer_dir, "lost+found"))
        inside = os.path.join(layer_dir, RUN_DIR_NAME)
        os.mkdir(inside)
        await _tool("cp", "-a", f"{run_dir}/.", inside)
        _set_owner_and_mode(inside, os.stat(run_dir))
        await _tool("mount", "--bind", inside, run_dir)
    except OSError as exc:
        raise LoopDiskError(f"{exc.strerror or exc} ({exc.filename or layer_dir})") from None
    finally:
        # The mount now holds the device, and the device the file.
        if loop_fd >= 0:
            os.close(loop_fd)
        os.close(backing)
