"""What the host can hold: admission control before each sandbox, warnings at start-up.

- `check_headroom` runs before every sandbox start (PodmanEngine.start calls it, so session
  starts and warm-pool refills alike are covered): the host must keep some memory, pids and
  disk free even if the new sandbox used all it may. Otherwise it refuses with a clear
  error instead of letting the host fall over. It reads /proc and statvfs only (cheap).
- `capacity_warnings` says at start-up where `max_sandboxes` x the per-sandbox limits
  exceed the host.
- `start_advice` turns podman's refusal of the start-up dry run (preflight.py) into what
  to do, where containment (user namespace, runtime, disk limit) is the cause.

The host facts come from this machine's /proc: with a remote Podman (CONTAINER_HOST) they
describe the wrong machine, and the checks only protect the server's own host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pod_exec_mcp.config import Settings, env_var, parse_size
from pod_exec_mcp.engine import EngineError, SandboxSpec, is_gvisor


class AdmissionRefused(EngineError):
    """The host lacks the headroom for one more sandbox; the message says which and why."""


@dataclass(frozen=True)
class HostState:
    """The host's totals and what is free now."""

    mem_total: int
    mem_available: int
    pid_max: int
    tasks: int  # processes and threads now (each takes a pid)
    file_max: int
    disk_free: int | None  # bytes free where Podman stores containers, if known


@dataclass(frozen=True)
class Headroom:
    """What must stay free on the host after a new sandbox took all it may (bytes, pids),
    and where the engine keeps sandboxes (for the disk check; None: not checked)."""

    memory: int
    pids: int
    disk: int
    storage_path: str | None = None

    @classmethod
    def of(cls, settings: Settings, storage_path: str | None = None) -> Headroom:
        return cls(
            memory=parse_size(settings.headroom_memory),
            pids=settings.headroom_pids,
            disk=parse_size(settings.headroom_disk),
            storage_path=storage_path,
        )


def _meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def _read_int(path: str, default: int) -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def host_state(storage_path: str | None = None) -> HostState:
    mem = _meminfo()
    # /proc/loadavg's fourth field is running/total scheduling entities: every thread
    # holds a pid, and pid_max bounds them all.
    tasks = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    disk_free = None
    if storage_path:
        try:
            st = os.statvfs(storage_path)
            disk_free = st.f_bavail * st.f_frsize
        except OSError:
            disk_free = None
    return HostState(
        mem_total=mem.get("MemTotal", 0),
        mem_available=mem.get("MemAvailable", mem.get("MemFree", 0)),
        pid_max=_read_int("/proc/sys/kernel/pid_max", 32768),
        tasks=tasks,
        file_max=_read_int("/proc/sys/fs/file-max", 0),
        disk_free=disk_free,
    )


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_headroom(spec: SandboxSpec, headroom: Headroom, state: HostState | None = None) -> None:
    """Refuse (AdmissionRefused) unless the host keeps its headroom with one more sandbox."""
    state = state or host_state(headroom.storage_path)
    short = []
    memory = parse_size(spec.memory)
    if state.mem_available < memory + headroom.memory:
        short.append(
            f"memory: {_gib(state.mem_available)} available, but a sandbox may use "
            f"{_gib(memory)} and {_gib(headroom.memory)} must stay free "
            f"({env_var('headroom_memory')})"
        )
    free_pids = state.pid_max - state.tasks
    if free_pids < spec.pids_limit + headroom.pids:
        short.append(
            f"pids: {free_pids} free below pid_max {state.pid_max}, but a sandbox may take "
            f"{spec.pids_limit} and {headroom.pids} must stay free ({env_var('headroom_pids')})"
        )
    if state.disk_free is not None:
        disk = parse_size(spec.disk_limit) if spec.disk_limit else 0
        if state.disk_free < disk + headroom.disk:
            short.append(
                f"disk: {_gib(state.disk_free)} free where Podman stores containers, but a "
                f"sandbox may fill {_gib(disk)} and {_gib(headroom.disk)} must stay free "
                f"({env_var('headroom_disk')})"
            )
    if short:
        raise AdmissionRefused(
            "this host is short of headroom ("
            + "; ".join(short)
            + "). End sessions you no longer need and try again later; the operator can "
            "lower the per-sandbox limits or the headroom settings."
        )


def check_snapshot_headroom(size: int, headroom: Headroom, state: HostState | None = None) -> None:
    """Refuse (AdmissionRefused) a snapshot that may take `size` bytes unless the disk
    headroom stays free after it: snapshots count against the same headroom as sandboxes."""
    state = state or host_state(headroom.storage_path)
    if state.disk_free is not None and state.disk_free < size + headroom.disk:
        raise AdmissionRefused(
            f"this host is short of disk for a snapshot: {_gib(state.disk_free)} free where "
            f"the sandboxes' files are, but this snapshot may take {_gib(size)} and "
            f"{_gib(headroom.disk)} must stay free ({env_var('headroom_disk')}). Delete "
            "snapshots you no longer need, or remove large files first."
        )


def capacity_warnings(settings: Settings, state: HostState) -> list[str]:
    """Where `max_sandboxes` sandboxes, each at its limits, would exceed this host."""
    n = settings.max_sandboxes + settings.warm_pool
    warnings = []
    memory = parse_size(settings.memory)
    if n * memory > state.mem_total:
        warnings.append(
            f"{n} sandboxes x {settings.memory} memory = {_gib(n * memory)}, more than the "
            f"host's {_gib(state.mem_total)}; admission control refuses sandboxes when "
            "memory runs short"
        )
    if n * settings.pids_limit > state.pid_max:
        warnings.append(
            f"{n} sandboxes x {settings.pids_limit} pids = {n * settings.pids_limit}, more "
            f"than the host's pid_max {state.pid_max}"
        )
    disk = 0 if settings.strict else parse_size(settings.disk_limit)
    if state.disk_free is not None and n * disk > state.disk_free:
        warnings.append(
            f"{n} sandboxes x {settings.disk_limit} disk = {_gib(n * disk)}, more than the "
            f"{_gib(state.disk_free)} free where Podman stores containers"
        )
    files = settings.pids_limit * settings.nofile
    if state.file_max and files > state.file_max:
        warnings.append(
            f"one sandbox may open {settings.pids_limit} x {settings.nofile} = {files} files, "
            f"more than the host's fs.file-max {state.file_max}"
        )
    return warnings


USERNS_ADVICE = (
    "Sandboxes run in a user namespace of their own (--userns=auto), so that their root is "
    "not the host's root; Podman takes those ids from the sub-id ranges of the `containers` "
    "user, and this host has none. Add a range (as root, once): "
    "`echo containers:2147483647:2147483648 | tee -a /etc/subuid /etc/subgid` "
    "(rootless Podman: ranges for your own user, see `man subuid`). Or set "
    f"{env_var('userns')}=host to run sandboxes as host root (not recommended)."
)


# The cgroup controller that enforces each sandbox limit.
_LIMIT_CONTROLLERS = {"memory": "--memory", "pids": "--pids-limit", "cpu": "--cpus"}


def unenforced_limits_warning(controllers: tuple[str, ...] | None) -> str | None:
    """What to say when Podman cannot enforce some sandbox limits: rootless Podman on
    cgroups v1 (and on v2 without delegated controllers) drops them with no error, so
    sandboxes would run without them. None when all can be enforced, or Podman did not
    say."""
    if controllers is None:
        return None
    missing = [flag for name, flag in _LIMIT_CONTROLLERS.items() if name not in controllers]
    if not missing:
        return None
    return (
        f"Podman here cannot enforce {', '.join(missing)} (cgroup controllers available: "
        f"{', '.join(controllers) or 'none'}): sandboxes run without those limits. Rootless "
        "Podman needs cgroups v2 with the controllers delegated to its user; rootful "
        "Podman has them"
    )


def disk_advice(disk_limit: str, driver: str, backing: str, root_disk_unavailable: str) -> str:
    return (
        f"--disk-limit {disk_limit} needs container storage that enforces a size per "
        "container: Podman's overlay driver on XFS mounted with pquota (prjquota), or, "
        "anywhere else, Podman on this host with the server running as root, loop devices, "
        "mkfs.ext4, unshare and tar (each sandbox then gets a root disk of its own; not "
        f"here: {root_disk_unavailable or '?'}). This Podman uses the {driver or '?'} driver on "
        f"{backing or '?'}. Set {env_var('disk_limit')}=0 (no disk limit: a sandbox can fill "
        "the host's disk), or use --strict (every writable path a tmpfs, bounded by "
        "--memory). See docs/disk-limit.md."
    )


def workdir_advice(image: str) -> str:
    return (
        f"sandbox root cannot write its working directory or /tmp in image {image!r}. In a "
        f"user namespace ({env_var('userns')}=auto) a directory that Podman creates at start "
        "(a WORKDIR missing from the image's layers) belongs to the host's root. Rebuild the "
        "image with pod_exec_mcp_build (its Containerfile creates /workspace in a layer), "
        "or add `RUN mkdir -p <workdir>` to yours."
    )


def start_advice(
    spec: SandboxSpec,
    error: str,
    driver: str,
    backing: str,
    root_disk_unavailable: str | None = None,
) -> str | None:
    """What to do when podman refused to start a sandbox because of containment; None when
    the refusal is about something else."""
    lowered = error.lower()
    # Podman 4 hands `run --storage-opt size=` to the storage driver: overlay refuses it off
    # XFS ("overlay.size ... only supported for backingFS XFS"), btrfs outright ("unknown
    # option size").
    if spec.disk_limit and any(
        k in lowered for k in ("storage-opt", "storage option", "option size", "quota")
    ):
        advice = disk_advice(spec.disk_limit, driver, backing, root_disk_unavailable or "")
        return f"{advice} (Podman said: {error})"
    if spec.userns and any(k in lowered for k in ("subuid", "subgid", "mappings")):
        return f"{USERNS_ADVICE} (Podman said: {error})"
    missing = any(k in lowered for k in ("not found", "no such file", "executable file"))
    if spec.runtime and missing and spec.runtime.rsplit("/", 1)[-1] in error:
        hint = " Is runsc installed (apt-get install runsc)?" if is_gvisor(spec.runtime) else ""
        return (
            f"a test sandbox could not start with runtime {spec.runtime!r} "
            f"({env_var('runtime')}): {error}.{hint}"
        )
    return None
