"""Containment's pure logic, without containers: run arguments per profile, sizes, the
admission arithmetic on a made-up host."""

from __future__ import annotations

from pathlib import Path

import pytest

from pod_exec_mcp.admission import (
    AdmissionRefused,
    Headroom,
    HostState,
    capacity_warnings,
    check_headroom,
    check_snapshot_headroom,
    unenforced_limits_warning,
)
from pod_exec_mcp.config import Settings, SettingsError, load_settings, parse_size
from pod_exec_mcp.engine import EngineError, SandboxSpec, sandbox_spec
from pod_exec_mcp.podman_engine import PodmanFacts, has_project_quota, run_arguments
from pod_exec_mcp.root_disk import _LO_FLAGS_OFFSET, _LOOP_CONFIG, RootDisk

GiB = 1024**3


def spec_of(**overrides: object) -> SandboxSpec:
    return sandbox_spec(Settings(**overrides), "name", {})  # type: ignore[arg-type]


def args_of(**overrides: object) -> list[str]:
    return run_arguments(spec_of(**overrides), "agentvol")


def test_default_profile_isolates_ids_logs_and_disk() -> None:
    args = args_of()
    assert args[0] == "run"  # no global options without a runtime
    assert "--userns=auto:size=65536" in args
    assert args[args.index("--log-driver") + 1] == "none"
    assert args[args.index("--storage-opt") + 1] == "size=10g"
    # Everything before the image is an option: the agent's init command comes last.
    assert args[-4:] == ["pod_exec_mcp_base", "/.pod_exec_mcp/agent", "init", "86400"]


def test_opt_outs_and_the_strict_profile() -> None:
    args = args_of(userns="host", disk_limit="0")
    assert not any(a.startswith("--userns") for a in args) and "--storage-opt" not in args
    # Strict writes only to tmpfs (bounded by --memory): no storage quota needed.
    assert "--storage-opt" not in args_of(strict=True)
    assert spec_of(strict=True).disk_limit is None and spec_of().disk_limit == "10g"


def test_on_a_root_disk_a_sandbox_runs_from_it_with_ids_and_files_of_its_own() -> None:
    """On a root disk (root_disk.py) the sandbox runs from that directory, not from the
    image in Podman's storage: no storage quota, its own id range instead of Podman's
    --userns=auto, and Podman's run-directory files replaced by its own."""
    root = RootDisk("name", Path("/d/roots/name"), 1 << 30, "name", 2**31, 2**31 + 7)
    args = run_arguments(spec_of(), "agentvol", root)
    assert args[:3] == ["run", "--detach", "--rm"] and "--storage-opt" not in args
    assert "pod_exec_mcp_base" not in args and not any(a.startswith("--userns") for a in args)
    assert args[-5:] == ["--rootfs", "/d/roots/name", "/.pod_exec_mcp/agent", "init", "86400"]
    assert args[args.index("--uidmap") + 1] == f"0:{2**31}:65536"
    assert args[args.index("--gidmap") + 1] == f"0:{2**31 + 7}:65536"
    volumes = [args[i + 1] for i, a in enumerate(args) if a == "--volume"]
    for inside in ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv"):
        assert f"/d/roots/name{inside}:{inside}" in volumes
    assert args[args.index("--pidfile") + 1] == "/d/roots/name.pid"
    # No user namespace (gVisor, or --userns host): no id maps either.
    plain = RootDisk("name", Path("/d/roots/name"), 1 << 30, "name", None, None)
    assert "--uidmap" not in run_arguments(spec_of(runtime="runsc"), "agentvol", plain)


def test_the_disk_limit_mechanism_follows_the_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """XFS keeps Podman's own quota; anything else gets root disks where this host can
    make them (any storage driver: the root is ours), and says why not where it cannot."""
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("os.path.exists", lambda path: path == "/dev/loop-control")
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/sbin/{tool}")

    def facts(driver: str = "overlay", backing: str = "extfs", remote: bool = False) -> PodmanFacts:
        return PodmanFacts("/var/lib/containers/storage", driver, backing, None, remote)

    assert facts().disk_limit_by_root_disk() and facts(backing="btrfs").disk_limit_by_root_disk()
    monkeypatch.setattr("pod_exec_mcp.podman_engine.has_project_quota", lambda path: True)
    assert not facts(backing="xfs").disk_limit_by_root_disk()
    # XFS without pquota cannot enforce Podman's size option: a root disk does.
    monkeypatch.setattr("pod_exec_mcp.podman_engine.has_project_quota", lambda path: False)
    assert facts(backing="xfs").disk_limit_by_root_disk()
    assert "remote" in (facts(remote=True).root_disk_unavailable() or "")
    assert facts("btrfs").disk_limit_by_root_disk()
    assert not facts(remote=True).disk_limit_by_root_disk()
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "mkfs.ext4" else tool)
    assert "mkfs.ext4 not found" in (facts().root_disk_unavailable() or "")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert "root" in (facts().root_disk_unavailable() or "")


def test_project_quota_is_read_from_the_mount_holding_the_storage() -> None:
    mountinfo = (
        "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 22 7:0 / /var/lib/containers rw,relatime - xfs /dev/loop0 rw,attr2,prjquota\n"
        "41 22 7:1 / /srv rw - xfs /dev/loop1 rw,attr2,pqnoenforce\n"
    )
    assert has_project_quota("/var/lib/containers/storage", mountinfo)
    assert not has_project_quota("/var/lib/containers-other", mountinfo)
    assert not has_project_quota("/srv/storage", mountinfo)  # counted, not enforced
    assert not has_project_quota("/var/lib/containers/storage", "garbage\n")


def test_loop_config_matches_the_kernels_layout() -> None:
    # The layout derived independently, field by field, from <linux/loop.h> with the C
    # compiler's own alignment rules (ctypes), against the constants the ioctl packs.
    import ctypes

    class LoopInfo64(ctypes.Structure):
        _fields_ = [
            ("lo_device", ctypes.c_uint64),
            ("lo_inode", ctypes.c_uint64),
            ("lo_rdevice", ctypes.c_uint64),
            ("lo_offset", ctypes.c_uint64),
            ("lo_sizelimit", ctypes.c_uint64),
            ("lo_number", ctypes.c_uint32),
            ("lo_encrypt_type", ctypes.c_uint32),
            ("lo_encrypt_key_size", ctypes.c_uint32),
            ("lo_flags", ctypes.c_uint32),
            ("lo_file_name", ctypes.c_uint8 * 64),
            ("lo_crypt_name", ctypes.c_uint8 * 64),
            ("lo_encrypt_key", ctypes.c_uint8 * 32),
            ("lo_init", ctypes.c_uint64 * 2),
        ]

    class LoopConfig(ctypes.Structure):
        _fields_ = [
            ("fd", ctypes.c_uint32),
            ("block_size", ctypes.c_uint32),
            ("info", LoopInfo64),
            ("reserved", ctypes.c_uint64 * 8),
        ]

    assert _LOOP_CONFIG.size == ctypes.sizeof(LoopConfig)
    assert LoopInfo64.lo_flags.offset == _LO_FLAGS_OFFSET  # type: ignore[attr-defined]
    assert LoopConfig.info.offset == 8  # type: ignore[attr-defined]


def test_gvisor_profile_uses_global_runtime_options_and_no_userns() -> None:
    # The isolated default needs gVisor's own netstack (loopback for the agent's proxy);
    # only the bridge passes Podman's network namespace through.
    args = args_of(runtime="/usr/bin/runsc")
    assert args[:4] == ["--runtime", "/usr/bin/runsc", "--runtime-flag", "network=none"]
    assert args[4] == "run" and not any(a.startswith("--userns") for a in args)
    assert args_of(runtime="runsc", network="bridge")[3] == "network=host"
    assert args_of(runtime="runsc", network=False)[3] == "network=none"
    assert args_of(runtime="runsc", strict=True)[3] == "network=none"
    assert args_of(runtime="crun")[:3] == ["--runtime", "crun", "run"]


def test_a_spec_built_by_hand_keeps_the_plain_defaults() -> None:
    """Engines and tests that build a SandboxSpec themselves get no userns, runtime or
    disk limit unless they ask."""
    plain = SandboxSpec(
        name="n", labels={}, image="i", memory="1g", cpus=1, pids_limit=64, nofile=64,
        nproc=64, network="bridge", strict=False, tmpfs_size="64m", lifetime=0,
    )  # fmt: skip
    args = run_arguments(plain)
    assert args[0] == "run" and "--storage-opt" not in args
    assert not any(a.startswith("--userns") for a in args)


def test_sizes() -> None:
    assert parse_size("10g") == 10 * GiB and parse_size("512m") == 512 * 1024**2
    assert parse_size("0") == 0 and parse_size("1.5G") == int(1.5 * GiB)
    assert parse_size("2GiB") == parse_size("2gb") == 2 * GiB  # what podman also accepts
    with pytest.raises(SettingsError, match="--disk-limit"):
        load_settings({"disk_limit": "ten gigs"}, {})
    with pytest.raises(SettingsError, match="--userns"):
        load_settings({"userns": "keep-id"}, {})


ROOMY = HostState(
    mem_total=24 * GiB, mem_available=20 * GiB, pid_max=32768, tasks=500,
    file_max=10_000_000, disk_free=80 * GiB,
)  # fmt: skip


def test_admission_admits_with_headroom_and_refuses_without() -> None:
    settings = Settings(disk_limit="10g")
    spec, headroom = sandbox_spec(settings, "n", {}), Headroom.of(settings)
    check_headroom(spec, headroom, ROOMY)
    short = HostState(
        mem_total=24 * GiB, mem_available=2 * GiB, pid_max=32768, tasks=32000,
        file_max=2_000_000, disk_free=5 * GiB,
    )  # fmt: skip
    with pytest.raises(AdmissionRefused) as refused:
        check_headroom(spec, headroom, short)
    # An EngineError: the sessions layer tells the agent "could not start a sandbox: ...".
    assert isinstance(refused.value, EngineError)
    text = str(refused.value)
    assert "memory: 2.0 GiB available" in text
    assert "pids: 768 free" in text
    assert "disk: 5.0 GiB free" in text
    # Without a disk limit only the disk headroom itself must stay free.
    check_headroom(
        sandbox_spec(Settings(disk_limit="0"), "n", {}),
        headroom,
        HostState(**{**ROOMY.__dict__, "disk_free": 2 * GiB}),
    )


def test_capacity_warnings() -> None:
    assert capacity_warnings(Settings(max_sandboxes=2, disk_limit="1g"), ROOMY) == []
    small_file_max = HostState(**{**ROOMY.__dict__, "file_max": 2_000_000})
    warned = " ".join(capacity_warnings(Settings(max_sandboxes=50), small_file_max))
    assert "50 sandboxes x 2g memory" in warned and "pid_max 32768" in warned
    assert "x 10g disk" in warned and "fs.file-max" in warned


def test_limits_podman_cannot_enforce_are_named() -> None:
    # Rootless Podman 4.3 on cgroups v1 reports no controllers and drops --memory,
    # --pids-limit and --cpus without an error (checked by hand: memory.limit_in_bytes
    # was unlimited in such a sandbox).
    assert unenforced_limits_warning(()) is not None
    assert all(flag in (unenforced_limits_warning(()) or "") for flag in ("--memory", "--cpus"))
    partial = unenforced_limits_warning(("cpuset", "memory", "pids")) or ""
    assert "--cpus" in partial and "--memory" not in partial and "memory, pids" in partial
    rootful_v1 = ("cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer", "pids")
    assert unenforced_limits_warning(rootful_v1) is None
    assert unenforced_limits_warning(None) is None  # Podman did not say: no guess


def test_a_snapshot_must_leave_the_disk_headroom() -> None:
    headroom = Headroom.of(Settings(headroom_disk="1g"))
    check_snapshot_headroom(2 * GiB, headroom, ROOMY)
    low = HostState(
        mem_total=24 * GiB, mem_available=20 * GiB, pid_max=32768, tasks=500,
        file_max=10_000_000, disk_free=2 * GiB,
    )  # fmt: skip
    with pytest.raises(AdmissionRefused) as refused:
        check_snapshot_headroom(int(1.5 * GiB), headroom, low)
    assert isinstance(refused.value, EngineError)
    text = str(refused.value)
    assert "2.0 GiB free" in text and "may take 1.5 GiB" in text
    assert "POD_EXEC_MCP_HEADROOM_DISK" in text
