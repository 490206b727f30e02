"""A sandbox's processes seen and killed from the host, through this host's /proc.

No process in the sandbox can stop (SIGSTOP), trace or slow the server itself, so this is
the path that still ends a command when the agent or the command's supervisor inside the
sandbox was stopped from inside (docs/agent-protocol.md, "When the agent does not answer").
It works where the sandbox's processes are this host's processes: local Podman with runc
or crun. With remote Podman or gVisor they are not here, `find_in_sandbox` says None, and
the engine falls back to a kill from inside the container.

Every signal goes through a pidfd opened before the process is checked again, so a pid
reused between the scan and the kill is never hit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# As long as the agent's supervisor keeps sending SIGKILL rounds (KILL_PERSIST_MS).
KILL_PERSIST = 10.0


@dataclass(frozen=True)
class HostProcess:
    pid: int
    ppid: int
    state: str  # /proc/PID/stat's state letter: Z for a zombie, T for stopped
    comm: str


def read_process(pid: int, proc: Path = PROC) -> HostProcess | None:
    """One process from /proc/PID/stat, or None if it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text(errors="replace")
    except OSError:
        return None
    # "PID (COMM) STATE PPID ...": COMM may hold spaces and ')', so split at the last ')'.
    open_at, close_at = text.find("("), text.rfind(")")
    fields = text[close_at + 2 :].split()
    if open_at < 0 or close_at < 0 or len(fields) < 2:
        return None
    return HostProcess(pid, int(fields[1]), fields[0], text[open_at + 1 : close_at])


def scan(proc: Path = PROC) -> dict[int, HostProcess]:
    """Every process on this host."""
    found = {}
    for entry in os.scandir(proc):
        if entry.name.isdigit() and (p := read_process(int(entry.name), proc)) is not None:
            found[p.pid] = p
    return found


def _inner_pid(pid: int, proc: Path) -> int | None:
    """The pid of host process `pid` in its own (innermost) pid namespace."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def _pid_namespace(pid: int, proc: Path) -> str | None:
    try:
        return os.readlink(proc / str(pid) / "ns" / "pid")
    except OSError:
        return None


def find_in_sandbox(
    init_pid: int, inner_pid: int, comm: str, proc: Path = PROC
) -> HostProcess | None:
    """The host's view of process `inner_pid` of the sandbox whose PID 1 is host process
    `init_pid`, if it is here and named `comm`; else None."""
    namespace = _pid_namespace(init_pid, proc)
    if namespace is None:
        return None
    for p in scan(proc).values():
        if (
            p.comm == comm
            and _inner_pid(p.pid, proc) == inner_pid
            and _pid_namespace(p.pid, proc) == namespace
        ):
            return p
    return None


def kill(target: HostProcess, proc: Path = PROC) -> None:
    """SIGKILL `target` if it is still the same process (same parent after the pidfd)."""
    try:
        pidfd = os.pidfd_open(target.pid)
    except OSError:
        return  # gone
    try:
        now = read_process(target.pid, proc)
        if now is not None and now.ppid == target.ppid:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def descendants(root: int, procs: dict[int, HostProcess]) -> list[HostProcess]:
    children: dict[int, list[HostProcess]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p)
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child.pid)
    return found


def kill_tree(root: HostProcess, persist: float = KILL_PERSIST, proc: Path = PROC) -> int:
    """SIGKILL every descendant of `root`, round after round (catching processes forked
    meanwhile) until every one is dead (a zombie or gone), then `root` itself. Returns
    how many still lived after `persist` seconds (e.g. in uninterruptible sleep): 0 means
    the tree was verifiably killed. Blocking: run it in a thread."""
    give_up = time.monotonic() + persist
    while True:
        live = [p for p in descendants(root.pid, scan(proc)) if p.state != "Z"]
        if not live:
            break
        if time.monotonic() >= give_up:
            return len(live)
        for p in live:
            kill(p, proc)
        time.sleep(0.01)
    kill(root, proc)
    return 0
