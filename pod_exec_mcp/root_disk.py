"""A sandbox's root file system on a disk of its own, built by the server: how the disk
limit is enforced where Podman's storage has no quota (docs/disk-limit.md).

Everything lives in a directory the server owns (`disk_dir`), never in Podman's storage:

- `images/ID/`: the sandbox image's files, exported once per image id (`podman export`
  of a labelled, never started container) and shared read-only by every sandbox;
- per sandbox, one overlay mount at `/run/pod_exec_mcp/roots/NAME/`: its lower layer is
  the image's files (through an idmapped mount when the sandbox has a user namespace),
  its upper and work dirs are on an ext4 file system of the limit's size, on a loop
  device over a nameless sparse file in `disk_dir`. The container is started with
  `podman run --rootfs` there.

Only that overlay is ever attached: the ext4 and idmapped mounts are detached (Linux's
mount API, mount_api.py) and live as long as the overlay does, the loop device clears
itself when its file system goes, and the file has no name. So unmounting one directory
frees everything, and a server killed at any step leaves at most a mount in its own
directory, which the next start's sweep (or `--cleanup`) unmounts. Podman never sees
these mounts, so its own bind-mounts of its storage cannot hide them. (The server also
holds the ext4 mount by descriptor while the sandbox lives, `RootDisk.disk_fd`, so that
a fork can copy the overlay's upper layer; `release` closes it, and the kernel does when
the server dies: it is in no mount table.)

The four files Podman would write in its run directory (/etc/hosts, /etc/hostname,
/etc/resolv.conf, /run/.containerenv), writable by sandbox root, are written into the
sandbox's own root and bind-mounted onto themselves (Podman then skips its own): nothing
a sandbox can write lands outside its disk.

Needs: root, loop devices, Linux's mount API with idmapped mounts and overlay over them
(5.19), mkfs.ext4 and unshare, local Podman. Checked at start-up by a dry run
(preflight.py), which also writes past the limit from inside the sandbox's root.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pod_exec_mcp import mount_api
from pod_exec_mcp.podman import LABEL_SESSION, Podman, PodmanError

# Container ids 0-65535 (all the image's files, nobody included) map to a range of
# unprivileged host ids that no other sandbox shares.
USERNS_SIZE = 65536

# linux/loop.h
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: u32 fd, u32 block_size, struct loop_info64 (232 bytes), u64[8].
# In loop_info64, lo_flags is the u32 after five u64 and three u32: offset 8 + 52.
_LOOP_CONFIG = struct.Struct("=II232s64s")
_LO_FLAGS_OFFSET = 52

_TOOLS = ("mkfs.ext4", "unshare", "tar")
_NODEV_NOSUID = mount_api.MOUNT_ATTR_NODEV | mount_api.MOUNT_ATTR_NOSUID

# Where sandboxes' roots are mounted and their user-namespace ranges reserved, host-wide
# (every server on this host, whatever its disk_dir, must see every reservation). On
# /run, which a reboot clears together with every sandbox; and reachable by every
# sandbox's root user, which the OCI runtime's bind-mount of the root needs (a disk_dir
# under a home or /tmp/pytest-of-root may not be).
RUN_DIR = Path("/run/pod_exec_mcp")

# The run-directory files Podman would bind-mount from its own storage.
RUN_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv")


class RootDiskError(Exception):
    """A sandbox's root disk could not be made or is not in force; the message says why."""


class NoSubIds(RootDiskError):
    """The host has no sub-id ranges to give a sandbox a user namespace from."""


def root_disk_unavailable(driver: str, local: bool) -> str | None:
    """Why this host cannot give sandboxes root disks; None when it can (so far as can be
    told without trying: the dry run tries)."""
    if not local:
        return "Podman is remote (CONTAINER_HOST): its containers are not on this host"
    if os.geteuid() != 0:
        return "the server does not run as root (mounting a loop device needs it)"
    if not os.path.exists("/dev/loop-control"):
        return "this host has no loop devices (/dev/loop-control)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH (packages e2fsprogs, util-linux, tar)"
    del driver  # any storage driver: the root file system is ours, not Podman's
    return None


def _attach_loop(backing_fd: int) -> tuple[str, int]:
    """A free loop device backed by `backing_fd`, set to clear itself on its last close;
    its path and an open descriptor (which keeps it until the file system holds it)."""
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
    raise RootDiskError("no free loop device could be configured")


async def _tool(*argv: str, stdin: int | None = None) -> bytes:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await process.communicate()
    except BaseException:
        # Cancelled (the session went away mid-start): do not leave it running.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        said = output.decode(errors="replace").strip()
        raise RootDiskError(f"{argv[0]} failed ({process.returncode}): {said}")
    return output


@dataclass(frozen=True)
class IdRange:
    """The host ids of the `containers` user in /etc/subuid and /etc/subgid, as Podman's
    own --userns=auto uses them."""

    uid_start: int
    gid_start: int
    count: int

    # The user is the one Podman's storage.conf names for --userns=auto, so that both
    # draw from the same range (from opposite ends).
    user: str = "containers"

    @classmethod
    def read(cls, subuid: str = "/etc/subuid", subgid: str = "/etc/subgid") -> IdRange | None:
        user = auto_userns_user()
        ranges = [_first_range(path, user) for path in (subuid, subgid)]
        if ranges[0] is None or ranges[1] is None:
            return None
        return cls(ranges[0][0], ranges[1][0], min(ranges[0][1], ranges[1][1]), user)

    @property
    def slots(self) -> int:
        return self.count // USERNS_SIZE

    def bases(self, slot: int) -> tuple[int, int]:
        """The first host uid and gid of `slot`. Slots are counted from the top of the
        range, so that Podman's own --userns=auto, which fills it from the bottom, meets
        ours only when the range is full."""
        offset = (self.slots - 1 - slot) * USERNS_SIZE
        return self.uid_start + offset, self.gid_start + offset


def auto_userns_user() -> str:
    """The user whose sub-id ranges Podman's --userns=auto takes (storage.conf's
    root-auto-userns-user, `containers` by default), by Podman's rootful search order."""
    candidates = [os.environ.get("CONTAINERS_STORAGE_CONF", "")]
    candidates += ["/etc/containers/storage.conf", "/usr/share/containers/storage.conf"]
    for path in filter(None, candidates):
        try:
            with open(path, "rb") as file:
                config = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError):
            continue
        options = config.get("storage", {}).get("options", {})
        user = options.get("root-auto-userns-user") if isinstance(options, dict) else None
        return user if isinstance(user, str) and user else "containers"
    return "containers"


def _first_range(path: str, user: str) -> tuple[int, int] | None:
    try:
        with open(path) as file:
            for line in file:
                name, _, rest = line.strip().partition(":")
                start, _, count = rest.partition(":")
                if name == user and start.isdigit() and count.isdigit():
                    return int(start), int(count)
    except OSError:
        return None
    return None


def hostname_for(name: str) -> str:
    """A valid host name (RFC 1123 label) for container `name`; unique as names are."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return label[-63:].strip("-") or "sandbox"


def _resolv_conf() -> str:
    """What Podman would write: the host's resolver configuration, without nameservers on
    loopback (unreachable from a sandbox); systemd-resolved's upstream list instead of its
    stub where the host has one."""
    for path in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        try:
            with open(path) as file:
                lines = file.read().splitlines()
        except OSError:
            continue
        kept = [line for line in lines if not re.match(r"\s*nameserver\s+(127\.|::1\b)", line)]
        if any(line.lstrip().startswith("nameserver") for line in kept):
            return "\n".join(kept) + "\n"
    return ""


def _write_owned(path: Path, text: str, uid: int, gid: int) -> None:
    # Through the sandbox's own root (the overlay): the file lands on its disk.
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not path.is_file():
            path.unlink()
    path.write_text(text)
    os.chown(path, uid, gid)
    os.chmod(path, 0o644)


def _new_userns(uid_base: int, gid_base: int) -> int:
    """A descriptor of a new user namespace mapping ids 0-65535 to the given host ids
    (what an idmapped mount needs): made by `unshare --user`, mapped from here."""
    child = subprocess.Popen(
        ["unshare", "--user", "--", "sh", "-c", "echo; read _"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline() != b"\n":
            raise RootDiskError("unshare --user did not start")
        with open(f"/proc/{child.pid}/uid_map", "w") as file:
            file.write(f"0 {uid_base} {USERNS_SIZE}\n")
        with open(f"/proc/{child.pid}/gid_map", "w") as file:
            file.write(f"0 {gid_base} {USERNS_SIZE}\n")
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


@dataclass(frozen=True)
class ImageConfig:
    """What `podman run IMAGE` takes from the image besides its files, and `--rootfs`
    does not: given to the container explicitly (podman_arguments). An ENTRYPOINT is not
    applied: a sandbox runs its own init."""

    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""

    @classmethod
    def of(cls, config: object) -> ImageConfig:
        """From `podman image inspect`'s `.Config`."""
        if not isinstance(config, dict):
            return cls()
        env = config.get("Env") or []
        return cls(
            env=tuple(str(e) for e in env if isinstance(e, str) and "=" in e),
            workdir=str(config.get("WorkingDir") or ""),
            user=str(config.get("User") or ""),
        )


@dataclass(frozen=True)
class ImageFiles:
    """An image's files, exported (RootDisks.image_files), and its run configuration."""

    path: Path
    config: ImageConfig


@dataclass
class RootDisk:
    """One sandbox's root file system, mounted at `path`."""

    name: str
    path: Path
    size: int
    hostname: str
    # Host ids of container id 0, or None: no user namespace.
    uid_base: int | None
    gid_base: int | None
    image: ImageConfig = field(default_factory=ImageConfig)
    # The image whose files are its lower layer (RootDisks.image_files).
    source: str = ""
    # Held while the sandbox lives: the sweep leaves a root whose lock is held alone.
    lock_fd: int = field(repr=False, default=-1)
    slot_fd: int = field(repr=False, default=-1)
    # The disk's own (detached) mount, held by this server alone: how a fork copies the
    # sandbox's changes (the overlay's upper layer) without going through its whole root.
    disk_fd: int = field(repr=False, default=-1)

    @property
    def pid_file(self) -> Path:
        return self.path.with_name(self.path.name + ".pid")

    def podman_arguments(self) -> list[str]:
        """`podman run` options for this root (`--rootfs PATH` itself goes where the image
        would: podman_engine.run_arguments)."""
        args = ["--hostname", self.hostname, "--pidfile", str(self.pid_file)]
        # The image's own environment first: the sandbox's --env options come later and win.
        for variable in self.image.env:
            args += ["--env", variable]
        if self.image.workdir:
            args += ["--workdir", self.image.workdir]
        if self.image.user:
            args += ["--user", self.image.user]
        if self.uid_base is not None:
            args += ["--uidmap", f"0:{self.uid_base}:{USERNS_SIZE}",
                     "--gidmap", f"0:{self.gid_base}:{USERNS_SIZE}"]  # fmt: skip
        for inside in RUN_FILES:
            args += ["--volume", f"{self.path}{inside}:{inside}"]
        return args

    def verify(self, pid: int | None, probe: bool = False) -> None:
        """RootDiskError unless process `pid` (the container's init) has this disk as its
        root and that file system is the limit's size; with `probe`, also unless a write
        past the limit fails there (the start-up check: it allocates the whole disk for a
        moment). `pid` None: the disk is checked where it is mounted."""
        inside = self.path if pid is None else Path(f"/proc/{pid}/root")
        try:
            ours, theirs = os.stat(self.path), os.stat(inside)
            stats = os.statvfs(inside)
        except OSError as exc:
            raise RootDiskError(f"cannot inspect the sandbox's root ({exc})") from None
        if ours.st_dev != theirs.st_dev or not os.path.ismount(self.path):
            raise RootDiskError(
                f"the sandbox's root is not its disk (device {theirs.st_dev}, disk {ours.st_dev})"
            )
        total = stats.f_blocks * stats.f_frsize
        # ext4's own metadata takes a few percent; more than the limit is never right.
        if not 0.85 * self.size <= total <= self.size:
            raise RootDiskError(
                f"the sandbox's root file system holds {total} bytes, not the limit's {self.size}"
            )
        if probe:
            _probe_write_past(inside / "tmp", self.size)


def _probe_write_past(directory: Path, size: int) -> None:
    """RootDiskError unless allocating more than `size` bytes in `directory` fails with
    ENOSPC (allocated, not written: a moment's work for any size)."""
    probe = directory / f".pod_exec_mcp-probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RootDiskError(f"cannot write in the sandbox's {directory.name}: {exc}") from None
    try:
        try:
            os.posix_fallocate(fd, 0, size + (1 << 20))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return
            raise RootDiskError(f"a write past the limit failed with {exc}, not ENOSPC") from None
        raise RootDiskError(f"{size + (1 << 20)} bytes fit in a sandbox limited to {size}")
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _clear_drafts(images: Path, files: Path) -> None:
    # A killed export's leftovers (we hold the image's lock, so nobody else's).
    shutil.rmtree(files, ignore_errors=True)
    for old in images.glob(f".draft-{files.name}-*"):
        shutil.rmtree(old, ignore_errors=True)


def _unpack_export(podman: str, name: str, into: Path) -> None:
    """`podman export NAME | tar -x`: the container's files, unpacked as root with their
    owners, modes, links and extended attributes. RootDiskError if either side fails."""
    exporter = subprocess.Popen(
        [podman, "export", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert exporter.stdout is not None
    try:
        unpacked = subprocess.run(
            ["tar", "-x", "--numeric-owner", "--same-permissions", "--xattrs",
             "--xattrs-include=*", "-C", str(into)],
            stdin=exporter.stdout, capture_output=True, check=False,
        )  # fmt: skip
    finally:
        exporter.stdout.close()
        _, exporter_error = exporter.communicate()
    if exporter.returncode != 0:
        said = exporter_error.decode(errors="replace").strip()
        raise RootDiskError(f"podman export failed ({exporter.returncode}): {said}")
    if unpacked.returncode != 0:
        said = (unpacked.stdout + unpacked.stderr).decode(errors="replace").strip()
        raise RootDiskError(f"tar failed ({unpacked.returncode}): {said}")


def _kill_processes_on(root: Path) -> None:
    """SIGKILL every process whose root directory is the file system mounted at `root`:
    what a removal left of the sandbox. A `podman run` killed between the runtime's create
    and start leaves its `runc init` behind, unknown to Podman, holding the disk."""
    try:
        if not os.path.ismount(root):
            return
        device = os.stat(root).st_dev
    except OSError:
        return
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry.name}/root").st_dev == device:
                os.kill(int(entry.name), signal.SIGKILL)


class RootDisks:
    """Builds, checks and removes sandboxes' root disks under `directory`."""

    def __init__(
        self,
        directory: Path,
        podman: Podman,
        ids: IdRange | None = None,
        run_dir: Path = RUN_DIR,
    ) -> None:
        self.directory = directory
        self.podman = podman
        self.ids = ids
        self.roots = run_dir / "roots"
        self.reservations = run_dir / "userns"
        # Image name -> its exported files, and the shared lock that keeps them.
        self._images: dict[str, tuple[ImageFiles, int]] = {}
        # Image name -> the roots built over its files now; and the images whose files go
        # as soon as no root uses them (snapshots deleted: forget).
        self._users: dict[str, int] = {}
        self._forgotten: set[str] = set()
        self._exporting = asyncio.Lock()
        # Container names that existed at the last sweep: a reservation naming one of
        # them is not free even if its holder died (the container may still run).
        self._existing: set[str] = set()
        for path, mode in ((directory, 0o700), (directory / "images", 0o700),
                           (run_dir, 0o711), (self.roots, 0o711)):  # fmt: skip
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, mode)

    # --- the image's files ----------------------------------------------------------------

    async def image_files(self, image: str, labels: dict[str, str]) -> ImageFiles:
        """`image`'s files, exported once per image id, and its configuration. `labels` go
        on the throw-away container of the export, for the orphan sweep. The image is
        looked up once per server: one rebuilt later is used by servers started after."""
        async with self._exporting:
            known = self._images.get(image)
            if known is not None:
                return known[0]
            try:
                done = await self.podman.run(
                    "image", "inspect", "--format", "{{.Id}} {{json .Config}}", image
                )
            except PodmanError as exc:
                raise RootDiskError(str(exc)) from None
            image_id, _, config = done.stdout.decode().strip().partition(" ")
            if not re.fullmatch(r"[0-9a-f]{12,128}", image_id):
                raise RootDiskError(f"unexpected image id {image_id!r} for {image}")
            try:
                parsed = ImageConfig.of(json.loads(config or "null"))
            except ValueError:
                raise RootDiskError(f"unreadable configuration of {image}: {config!r}") from None
            path, lock = await self._export(image, image_id, labels)
            files = ImageFiles(path, parsed)
            self._images[image] = (files, lock)
            self._prune_images(keep={f.path for f, _ in self._images.values()})
            return files

    async def _export(self, image: str, image_id: str, labels: dict[str, str]) -> tuple[Path, int]:
        images = self.directory / "images"
        files = images / image_id
        lock = os.open(images / f"{image_id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        complete = files / ".pod_exec_mcp-complete"
        try:
            # Shared while we use the files: a pruning server cannot take it then. Taken
            # in a thread (another server may be exporting: the event loop must go on).
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_SH)
            if not complete.exists():
                # Exclusive to export: servers using other copies hold it shared, so this
                # waits for none of them, only for another export of this image.
                fcntl.flock(lock, fcntl.LOCK_UN)
                await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
                if not complete.exists():
                    await self._export_into(image, images, files, labels)
                fcntl.flock(lock, fcntl.LOCK_SH)
        except BaseException:
            os.close(lock)
            raise
        return files, lock

    async def _export_into(
        self, image: str, images: Path, files: Path, labels: dict[str, str]
    ) -> None:
        draft = images / f".draft-{files.name}-{secrets.token_hex(4)}"
        await asyncio.to_thread(_clear_drafts, images, files)
        draft.mkdir()
        name = f"pod_exec_mcp-export-{secrets.token_hex(4)}"
        labelled = {**labels, LABEL_SESSION: "export"}
        label_args = [a for k, v in labelled.items() for a in ("--label", f"{k}={v}")]
        try:
            await self.podman.run("create", "--name", name, *label_args, image, "true")
            await asyncio.to_thread(_unpack_export, self.podman.path, name, draft)
            (draft / ".pod_exec_mcp-complete").touch()
            os.chmod(draft, 0o755)
            draft.rename(files)
        except PodmanError as exc:
            raise RootDiskError(f"could not export {image}: {exc}") from None
        finally:
            await self.podman.remove(name)
            await asyncio.to_thread(shutil.rmtree, draft, True)

    def _prune_images(self, keep: set[Path]) -> None:
        """Remove the exported files of images no server here uses any more."""
        images = self.directory / "images"
        for lock_path in images.glob("*.lock"):
            files = images / lock_path.stem
            if files in keep:
                continue
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # another server uses it
            try:
                shutil.rmtree(files, ignore_errors=True)
                lock_path.unlink()
            finally:
                os.close(fd)

    # --- one sandbox's root ---------------------------------------------------------------

    async def build(
        self,
        name: str,
        image: str,
        size: int,
        userns: bool,
        labels: dict[str, str],
        hosts: dict[str, str] | None = None,
        copy_of: RootDisk | None = None,
    ) -> RootDisk:
        """The root disk of new sandbox `name`: `size` bytes over `image`'s files, with a
        user-namespace range of its own if `userns`, and `hosts` (name -> address) in its
        /etc/hosts; with `copy_of` (a live root over the same image), starting with a copy
        of that root's changes (a fork). RootDiskError if it cannot be."""
        files = await self.image_files(image, labels)
        lower = files.path
        root = RootDisk(
            name, self.roots / name, size, hostname_for(name), None, None, files.config, image
        )
        self._users[image] = self._users.get(image, 0) + 1
        lock = os.open(self.roots / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise RootDiskError(f"the root of {name} is held by another process") from None
        root.lock_fd = lock
        try:
            root.path.mkdir(mode=0o711, exist_ok=True)
            if userns:
                root.slot_fd, root.uid_base, root.gid_base = self._reserve_ids(name)
            await self._mount(root, lower, copy_of)
            uid, gid = root.uid_base or 0, root.gid_base or 0
            hosts_file = (
                f"127.0.0.1\tlocalhost {root.hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            ) + "".join(f"{address}\t{host}\n" for host, address in (hosts or {}).items())
            _write_owned(root.path / "etc/hosts", hosts_file, uid, gid)
            _write_owned(root.path / "etc/hostname", root.hostname + "\n", uid, gid)
            _write_owned(root.path / "etc/resolv.conf", _resolv_conf(), uid, gid)
            _write_owned(root.path / "run/.containerenv", "", uid, gid)
        except BaseException as exc:
            self.release(root)
            if isinstance(exc, OSError):
                raise RootDiskError(str(exc)) from None
            raise
        return root

    async def _mount(self, root: RootDisk, lower: Path, copy_of: RootDisk | None = None) -> None:
        # The disk: a sparse file with no name (so nothing is left to delete, ever), in
        # our directory, so the host's free space (admission control) counts it.
        backing = os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        loop_fd = disk = layer = overlay = -1
        try:
            os.ftruncate(backing, root.size)
            loop_path, loop_fd = _attach_loop(backing)
            # No journal: it dies with the sandbox, and a journal takes disk of its own.
            await _tool(
                "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
                "-E", "lazy_itable_init=1,nodiscard", loop_path,
            )  # fmt: skip
            # `discard`: what the sandbox deletes is given back to the host.
            disk = mount_api.new_mount("ext4", {"source": loop_path}, ("discard",), _NODEV_NOSUID)
            uid, gid = root.uid_base or 0, root.gid_base or 0
            for sub in ("upper", "work"):
                os.mkdir(mount_api.fd_path(disk, sub), 0o755)
            # The root directory's owner is sandbox root.
            os.chown(mount_api.fd_path(disk, "upper"), uid, gid)
            if copy_of is not None:
                await _copy_upper(copy_of, disk, root)
            if root.uid_base is not None:
                assert root.gid_base is not None
                userns = _new_userns(root.uid_base, root.gid_base)
                try:
                    layer = mount_api.idmapped_clone(str(lower), userns)
                finally:
                    os.close(userns)
                lowerdir = mount_api.fd_path(layer)
            else:
                lowerdir = str(lower)
            overlay = mount_api.new_mount(
                "overlay",
                {
                    "lowerdir": lowerdir,
                    "upperdir": mount_api.fd_path(disk, "upper"),
                    "workdir": mount_api.fd_path(disk, "work"),
                },
                # Nothing on it runs with more rights than its owner's on the host (the
                # sandbox runs with no-new-privileges anyway).
                attributes=_NODEV_NOSUID,
            )
            mount_api.attach(overlay, str(root.path))
            # Kept (release closes it): the overlay holds the disk anyway.
            root.disk_fd, disk = disk, -1
        finally:
            # The overlay now holds its layers, the file system its device, the device
            # its file.
            for fd in (overlay, layer, disk, loop_fd, backing):
                if fd >= 0:
                    os.close(fd)

    def _reserve_ids(self, name: str) -> tuple[int, int, int]:
        """A user-namespace range no other sandbox on this host holds: its lock's
        descriptor and first uid and gid."""
        if self.ids is None or self.ids.slots == 0:
            user = self.ids.user if self.ids is not None else auto_userns_user()
            raise NoSubIds(f"no sub-id ranges for the `{user}` user in /etc/subuid and /etc/subgid")
        self.reservations.mkdir(parents=True, exist_ok=True, mode=0o700)
        for slot in range(self.ids.slots):
            fd = os.open(self.reservations / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)  # fmt: skip
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            if holder and holder in self._existing:
                os.close(fd)  # its server died, but its container is still there
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, name.encode() + b"\n", 0)
            return (fd, *self.ids.bases(slot))
        raise RootDiskError(f"all {self.ids.slots} user-namespace ranges are in use")

    def release(self, root: RootDisk) -> None:
        """Unmount a root whose container is gone, and give back its reservations."""
        _kill_processes_on(root.path)
        with contextlib.suppress(OSError):
            mount_api.detach(str(root.path))
        with contextlib.suppress(OSError):
            root.path.rmdir()
        with contextlib.suppress(OSError):
            root.pid_file.unlink()
        if root.disk_fd >= 0:
            os.close(root.disk_fd)
            root.disk_fd = -1
        if root.slot_fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(root.slot_fd, 0)
            os.close(root.slot_fd)
            root.slot_fd = -1
        if root.lock_fd >= 0:
            with contextlib.suppress(OSError):
                (self.roots / f"{root.name}.lock").unlink()
            os.close(root.lock_fd)
            root.lock_fd = -1
        if root.source:
            self._users[root.source] = self._users.get(root.source, 1) - 1
            root.source, source = "", root.source
            if self._users[source] <= 0:
                del self._users[source]
                if source in self._forgotten:
                    self._drop_image(source)

    def forget(self, image: str) -> None:
        """`image` is gone (a deleted snapshot): its exported files go as soon as no root
        built over them is left (sandboxes started from it keep their files till then)."""
        self._forgotten.add(image)
        if not self._users.get(image):
            self._drop_image(image)

    def _drop_image(self, image: str) -> None:
        self._forgotten.discard(image)
        known = self._images.pop(image, None)
        if known is not None:
            os.close(known[1])
            self._prune_images(keep={f.path for f, _ in self._images.values()})

    # --- snapshots ------------------------------------------------------------------------

    async def import_root(self, root: RootDisk, image: str, changes: list[str]) -> None:
        """Record a sandbox's whole root file system as image `image` (`tar` of its root,
        as the sandbox sees it, into `podman import`, with `changes` such as LABEL and ENV):
        `podman commit` cannot commit a container on a root of its own. RootDiskError if
        either side fails (the image may then exist: the caller removes it)."""
        await self._stream_root(
            root,
            [self.podman.path, "import", "--quiet",
             *[a for c in changes for a in ("--change", c)], "-", image],
            "podman import",
        )  # fmt: skip

    async def _stream_root(self, root: RootDisk, consumer: list[str], what: str) -> None:
        """`tar -c` of a sandbox's root into `consumer`'s stdin. Owners are given as the
        sandbox sees them (its user namespace's ids shifted back)."""
        ids = (0, 0) if root.uid_base is not None else None
        await _stream_tree(str(root.path), root, ids, consumer, what)

    def sweep(self, existing: Iterable[str]) -> list[str]:
        """Unmount the roots (and free the reservations) of sandboxes whose server is gone
        and whose container no longer exists; their names. `existing`: the names of all
        containers Podman has now."""
        self._existing = set(existing)
        swept: list[str] = []
        for lock_path in sorted(self.roots.glob("*.lock")):
            name = lock_path.stem
            if name in self._existing:
                continue
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # its server is alive (and may be starting it right now)
            root = RootDisk(name, self.roots / name, 0, "", None, None, lock_fd=fd)
            self.release(root)
            swept.append(name)
        # A root directory without its lock (a crash between the two): same rule.
        for path in self.roots.iterdir():
            if (
                path.is_dir()
                and not path.with_name(path.name + ".lock").exists()
                and (path.name not in self._existing)
            ):
                with contextlib.suppress(OSError):
                    mount_api.detach(str(path))
                with contextlib.suppress(OSError):
                    path.rmdir()
                swept.append(path.name)
        return swept

    def mounted(self) -> list[str]:
        """The roots mounted now (for checks and tests)."""
        return [p.name for p in self.roots.iterdir() if p.is_dir() and os.path.ismount(p)]

    def close(self) -> None:
        for _, lock in self._images.values():
            os.close(lock)
        self._images.clear()


def existing_names(containers: Iterable[dict[str, object]]) -> set[str]:
    """Container names from `podman ps --all --format json` entries."""
    names: set[str] = set()
    for container in containers:
        found = container.get("Names") or []
        if isinstance(found, list):
            names.update(str(n) for n in found)
    return names


async def _copy_upper(source: RootDisk, disk: int, root: RootDisk) -> None:
    """Copy the changes of live root `source` (its overlay's upper layer, whiteouts and
    overlay attributes included) into the upper layer of `disk`, the new `root`'s, with
    the owners shifted from the one's user-namespace range to the other's."""
    if source.disk_fd < 0:
        raise RootDiskError(f"the sandbox {source.name} is gone: nothing to copy")
    ids = None
    if root.uid_base is not None and root.gid_base is not None:
        ids = (root.uid_base, root.gid_base)
    await _stream_tree(
        mount_api.fd_path(source.disk_fd, "upper"), source, ids,
        ["tar", "-x", "--numeric-owner", "--same-permissions", "--xattrs",
         "--xattrs-include=*", "-C", mount_api.fd_path(disk, "upper")],
        "tar -x", pass_fds=(source.disk_fd, disk),
    )  # fmt: skip


async def _stream_tree(
    tree: str,
    root: RootDisk,
    ids: tuple[int, int] | None,
    consumer: list[str],
    what: str,
    pass_fds: tuple[int, ...] = (),
) -> None:
    """`tar -c` of directory `tree` (of sandbox `root`) into `consumer`'s stdin, every
    owner in `root`'s user-namespace range moved to the range starting at `ids` (uid,
    gid). Taken while the sandbox runs: a file written meanwhile may be caught
    half-written. RootDiskError if either side fails."""
    maps: list[str] = []
    # The id maps live in memory files that tar opens by descriptor: nothing on disk
    # that a killed server could leave behind.
    map_fds: list[int] = []
    shifts = []
    if ids is not None and root.uid_base is not None and root.gid_base is not None:
        shifts = [("--owner-map", root.uid_base, ids[0]), ("--group-map", root.gid_base, ids[1])]
    for flag, base, to in shifts:
        fd = os.memfd_create("pod_exec_mcp-ids", 0)
        map_fds.append(fd)
        os.write(fd, "".join(f"+{base + i} +{to + i}\n" for i in range(USERNS_SIZE)).encode())
        maps.append(f"{flag}=/proc/self/fd/{fd}")
    reading, writing = os.pipe()
    processes: list[asyncio.subprocess.Process] = []
    try:
        try:
            tar = await asyncio.create_subprocess_exec(
                "tar", "-c", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                "--one-file-system", *maps, "-C", tree, ".",
                stdin=asyncio.subprocess.DEVNULL, stdout=writing,
                stderr=asyncio.subprocess.PIPE, pass_fds=(*map_fds, *pass_fds),
            )  # fmt: skip
            processes.append(tar)
            taker = await asyncio.create_subprocess_exec(
                *consumer, stdin=reading, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
                pass_fds=pass_fds,
            )  # fmt: skip
            processes.append(taker)
        finally:
            os.close(reading)
            os.close(writing)
        (_, tar_error), (taken, taker_error) = await asyncio.gather(
            tar.communicate(), taker.communicate()
        )
    except BaseException:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        raise
    finally:
        for fd in map_fds:
            os.close(fd)
    # tar's 1: a file changed while it was read (the sandbox runs); kept as read.
    if tar.returncode not in (0, 1):
        said = " ".join(tar_error.decode(errors="replace").split())[-500:]
        raise RootDiskError(f"tar of the sandbox's root failed ({tar.returncode}): {said}")
    if taker.returncode != 0:
        said = " ".join((taker_error or taken).decode(errors="replace").split())[-500:]
        raise RootDiskError(f"{what} failed ({taker.returncode}): {said}")
