"""host_procs against this machine's own kernel: the take-over's kill, without Podman."""

from __future__ import annotations

import os
import signal
import subprocess

from conftest import wait_until

from pod_exec_mcp import host_procs


def _tree() -> subprocess.Popen[bytes]:
    """A shell with a child and a grandchild (under a child shell), all waiting."""
    return subprocess.Popen(["sh", "-c", "sh -c 'sleep 300 & wait' & sleep 300 & wait"])


def test_kill_tree_kills_a_stopped_roots_whole_tree() -> None:
    root = _tree()
    try:
        assert wait_until(lambda: len(host_procs.descendants(root.pid, host_procs.scan())) >= 3)
        os.kill(root.pid, signal.SIGSTOP)  # as a command stops its own supervisor
        before = host_procs.descendants(root.pid, host_procs.scan())
        me = host_procs.read_process(root.pid)
        assert me is not None and me.state == "T", me
        assert host_procs.kill_tree(me) == 0
        root.wait(timeout=10)
        assert root.returncode == -signal.SIGKILL
        # Every process that was in the tree is dead (gone, or a zombie not yet reaped).
        for p in before:
            now = host_procs.read_process(p.pid)
            assert now is None or now.state == "Z" or now.ppid != p.ppid, now
    finally:
        if root.poll() is None:
            root.kill()
            root.wait()


def test_find_in_sandbox_matches_name_pid_and_namespace() -> None:
    child = subprocess.Popen(["sleep", "300"])
    try:
        # This test's own pid namespace stands in for a sandbox's: there, a process's
        # innermost pid is its host pid.
        found = host_procs.find_in_sandbox(os.getpid(), child.pid, "sleep")
        assert found is not None and found.pid == child.pid, found
        assert host_procs.find_in_sandbox(os.getpid(), child.pid, "pem-agent") is None
        assert host_procs.find_in_sandbox(os.getpid(), 0, "sleep") is None
        assert host_procs.find_in_sandbox(2**22 + 12345, child.pid, "sleep") is None
    finally:
        child.kill()
        child.wait()


def test_kill_spares_a_process_whose_parent_changed() -> None:
    """A pid that now belongs to another process (checked through its pidfd) is spared."""
    child = subprocess.Popen(["sleep", "300"])
    try:
        real = host_procs.read_process(child.pid)
        assert real is not None
        host_procs.kill(host_procs.HostProcess(child.pid, real.ppid + 1, "S", "sleep"))
        assert child.poll() is None
        host_procs.kill(real)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
