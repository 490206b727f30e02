"""Linux's mount API (fsopen, fsmount, open_tree, mount_setattr, move_mount), through
libc's syscall(): Python has no binding, and these are what make a sandbox's root file
system a single mount that the server owns (root_disk.py).

Each call is checked; a failure is an OSError naming the call. Every descriptor returned
is close-on-exec. Detached mounts (from fsmount or open_tree) live as long as a descriptor
or another mount (an overlay layer) holds them, so nothing is left attached by a crash
before `attach`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

# The syscall numbers are the same on every architecture since Linux 5.2 (asm-generic),
# except on alpha; mount_setattr came in 5.12.
_SYSCALLS = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
             "fsmount": 432, "mount_setattr": 442}  # fmt: skip

AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_CLOEXEC = 0o2000000  # O_CLOEXEC, as OPEN_TREE_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 4
_FSOPEN_CLOEXEC = 1
_FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
# struct mount_attr: u64 attr_set, attr_clr, propagation, userns_fd.
_MOUNT_ATTR = struct.Struct("=QQQQ")
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _call(name: str, *args: object) -> int:
    if platform.machine() == "alpha":  # pragma: no cover - not a target
        raise OSError(38, f"{name}: not supported on alpha")
    # Every argument as a long: syscall() is variadic, and a plain int would leave the
    # upper half of its register undefined.
    longs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = _libc.syscall(ctypes.c_long(_SYSCALLS[name]), *longs)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")
    return int(result)


def new_mount(
    fstype: str,
    options: dict[str, str],
    flags: tuple[str, ...] = (),
    attributes: int = 0,
) -> int:
    """A detached mount of a new `fstype` file system with string `options` and flag
    options; its descriptor."""
    context = _call("fsopen", fstype.encode(), _FSOPEN_CLOEXEC)
    try:
        for key, value in options.items():
            _call("fsconfig", context, _FSCONFIG_SET_STRING, key.encode(), value.encode(),
                  0)  # fmt: skip
        for key in flags:
            _call("fsconfig", context, _FSCONFIG_SET_FLAG, key.encode(), None, 0)
        _call("fsconfig", context, _FSCONFIG_CMD_CREATE, None, None, 0)
        return _call("fsmount", context, _FSMOUNT_CLOEXEC, attributes)
    finally:
        os.close(context)


def idmapped_clone(path: str, userns_fd: int, read_only: bool = True) -> int:
    """A detached copy of the mount at `path`, whose files' ids appear shifted by the
    user namespace `userns_fd`'s mapping (an idmapped mount); its descriptor."""
    tree = _call("open_tree", AT_FDCWD, path.encode(), _OPEN_TREE_CLONE | _CLOEXEC)
    try:
        attributes = _MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if read_only else 0)
        attr = ctypes.create_string_buffer(_MOUNT_ATTR.pack(attributes, 0, 0, userns_fd))
        _call("mount_setattr", tree, b"", _AT_EMPTY_PATH, attr, _MOUNT_ATTR.size)
    except BaseException:
        os.close(tree)
        raise
    return tree


def attach(mount_fd: int, target: str) -> None:
    """Attach detached mount `mount_fd` at directory `target`."""
    _call("move_mount", mount_fd, b"", AT_FDCWD, target.encode(),
          _MOVE_MOUNT_F_EMPTY_PATH)  # fmt: skip


def fd_path(fd: int, *parts: str) -> str:
    """A path through descriptor `fd` (a directory or a detached mount), for options that
    take paths (an overlay's layers)."""
    return os.path.join(f"/proc/self/fd/{fd}", *parts)


def detach(target: str) -> None:
    """Unmount `target` lazily (MNT_DETACH): gone from the tree at once, freed once nothing
    uses it. OSError if it is not a mount point."""
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"umount {target}: {os.strerror(error)}")


def unmount(target: str) -> None:
    """Unmount `target` now; OSError (EBUSY) if anything uses it."""
    if _libc.umount2(target.encode(), 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"umount {target}: {os.strerror(error)}")
