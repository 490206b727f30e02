"""Checks made before the port opens, so that a bad setting stops the server at start-up
with one line instead of failing every session later.

Cheap syntax checks live in config.py's validators; this module asks the authorities for
the rest: the kernel (can the port be bound?) and podman (does a sandbox start with these
settings?). Only a real start can tell: `podman create` accepts a memory limit below what
the runtime can set, rlimits above the host's hard limit and a malformed tmpfs size, and
`podman run` refuses all three.
"""

from __future__ import annotations

import asyncio
import errno
import secrets
import socket

from pod_exec_mcp.admission import USERNS_ADVICE, start_advice, workdir_advice
from pod_exec_mcp.config import Settings, SettingsError, cli_flag, env_var
from pod_exec_mcp.engine import SandboxSpec, sandbox_spec
from pod_exec_mcp.instances import Instance
from pod_exec_mcp.podman import LABEL_SESSION, Completed, Podman
from pod_exec_mcp.podman_engine import (
    PodmanFacts,
    build_root_disk,
    gets_root_disk,
    global_arguments,
    run_arguments,
    verify_root_disk,
)
from pod_exec_mcp.root_disk import NoSubIds, RootDisk, RootDiskError, RootDisks

# The dry run's exit status when sandbox root cannot write its workdir or /tmp.
_UNWRITABLE = 99

# The longest a throw-away sandbox may take to start and exit before we call podman stuck.
DRY_RUN_TIMEOUT = 120.0

# Words in podman's (or the runtime's) complaint, and the settings they point at.
_SUSPECTS = (
    ("tmpfs", ("tmpfs_size",)),
    ("memory", ("memory",)),
    ("rlimit", ("nofile", "nproc")),
    ("ulimit", ("nofile", "nproc")),
    ("cpu", ("cpus",)),
    ("pids", ("pids_limit",)),
)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound (not yet listening) as uvicorn would bind it; a taken
    port or an address that is not ours is a SettingsError naming the setting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) on accepted
    # connections only when the protocol says TCP. With Nagle on, a response's body (sent
    # after its headers) waited for the client's delayed ACK: +40 ms on most tool calls.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SettingsError(
                f"port {port} on {host} is already in use by another process: stop it, or "
                f"choose another port with {cli_flag('port')} / {env_var('port')}"
            ) from None
        raise SettingsError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): check "
            f"{cli_flag('host')} / {env_var('host')} and {cli_flag('port')} / {env_var('port')}"
        ) from None
    return sock


# The check that sandbox root can write where commands run (in a user namespace, a
# workdir Podman made at start is host root's).
_WRITABLE_CHECK = f"test -w . && test -w /tmp || exit {_UNWRITABLE}"


def dry_run_arguments(spec: SandboxSpec, root: RootDisk | None = None) -> list[str]:
    """The full `podman run` arguments of sandbox `spec` (on `root`, if given), attached
    and running the writability check instead of the long sleep."""
    args = run_arguments(spec, root=root)
    # run_arguments detaches and ends with IMAGE (or --rootfs PATH) and its long-running
    # init (sleep, or the exec agent's init): the check runs instead.
    source = spec.image if root is None else str(root.path)
    if "run" not in args or source not in args:
        raise RuntimeError(f"unexpected sandbox arguments: {args}")
    image_at = len(args) - 1 - args[::-1].index(source)
    # Not --rm: through remote Podman 4.3 the attached client may then look for a
    # container that --rm already removed ("no such container"); the caller removes it.
    return [a for a in args[: image_at + 1] if a not in ("--detach", "--rm")] + [
        "/bin/sh", "-c", _WRITABLE_CHECK,
    ]  # fmt: skip


def _suspects(complaint: str, settings: Settings) -> list[str]:
    lowered = complaint.lower()
    names: list[str] = []
    for word, fields in _SUSPECTS:
        if word in lowered:
            names += [f for f in fields if f not in names]
    if settings.exec_channel == "agent" and settings.agent_image.lower() in lowered:
        names.append("agent_image")
    if not names or (settings.extra_run_args and "flag" in lowered):
        names.append("extra_run_args")
    return names


def _disk_advice(spec: SandboxSpec, what: str) -> SettingsError:
    return SettingsError(
        f"--disk-limit {spec.disk_limit}: {what}. Set {env_var('disk_limit')}=0 to run "
        "without a disk limit (a sandbox can then fill the host's disk), use --strict, or "
        "see docs/disk-limit.md."
    )


async def _dry_run(podman: Podman, spec: SandboxSpec, root_disks: RootDisks | None) -> Completed:
    """Run the check in a sandbox of `spec`, as PodmanEngine starts one. On a root disk,
    the sandbox starts detached, the limit is checked from its own root (the file system
    is the limit's size, and a write past it fails: RootDisk.verify), then the check runs
    in it."""
    if root_disks is None or not gets_root_disk(spec, root_disks):
        return await podman.run(*dry_run_arguments(spec), check=False)
    try:
        root = await build_root_disk(root_disks, spec)
    except NoSubIds as exc:
        raise SettingsError(f"{USERNS_ADVICE} ({exc})") from None
    except RootDiskError as exc:
        raise _disk_advice(spec, f"could not give a test sandbox its disk ({exc})") from None
    try:
        done = await podman.run(*run_arguments(spec, root=root), check=False)
        if done.returncode != 0:
            return done
        try:
            verify_root_disk(root, spec, probe=True)
        except RootDiskError as exc:
            raise _disk_advice(
                spec, f"the limit is not in force in a test sandbox ({exc})"
            ) from None
        return await podman.run(
            *global_arguments(spec), "exec", spec.name, "/bin/sh", "-c", _WRITABLE_CHECK,
            check=False,
        )  # fmt: skip
    finally:
        await podman.remove(spec.name)
        root_disks.release(root)


async def check_sandbox_settings(
    podman: Podman,
    settings: Settings,
    instance: Instance,
    facts: PodmanFacts | None = None,
    root_disks: RootDisks | None = None,
) -> None:
    """Start (and remove) one throw-away sandbox with the configured settings; SettingsError
    naming the likely settings and quoting podman if it refuses, or saying what to do when
    containment is the cause. `facts`: Podman's storage, which decides how the disk limit
    is enforced and what to advise when it cannot be; `root_disks`: where the engine puts
    sandboxes' root disks, if it does."""
    # Labelled as this instance's, so that any leftover is swept.
    name = f"pod_exec_mcp-{instance.id[:8]}-preflight-{secrets.token_hex(2)}"
    spec = sandbox_spec(settings, name, {**instance.labels(), LABEL_SESSION: "preflight"})
    try:
        done = await asyncio.wait_for(_dry_run(podman, spec, root_disks), DRY_RUN_TIMEOUT)
    except TimeoutError:
        raise SettingsError(
            f"podman did not start a test sandbox within {DRY_RUN_TIMEOUT:g} s; is podman "
            "working (`podman info`)?"
        ) from None
    finally:
        await podman.remove(name)
    if done.returncode == 0:
        return
    if done.returncode == _UNWRITABLE:
        raise SettingsError(workdir_advice(settings.image))
    storage = (
        ("", "", "")
        if facts is None
        else (facts.driver, facts.backing, facts.root_disk_unavailable())
    )
    advice = start_advice(spec, done.error_text, *storage)
    if advice:
        raise SettingsError(advice)
    names = _suspects(done.error_text, settings)
    where = ", ".join(f"{cli_flag(n)} / {env_var(n)}" for n in names)
    raise SettingsError(
        f"a sandbox cannot start with these settings; check {where}. podman said: {done.error_text}"
    )
