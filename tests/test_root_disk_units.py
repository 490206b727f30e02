"""Root disks' pure logic, without containers or mounts: id ranges and their reservation
across servers, the sweep's rules, names, image configuration, and which mounts of an
earlier version `--cleanup` repairs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from pod_exec_mcp.podman import Podman, PodmanError
from pod_exec_mcp.root_disk import (
    USERNS_SIZE,
    IdRange,
    ImageConfig,
    NoSubIds,
    RootDisks,
    auto_userns_user,
    hostname_for,
)
from pod_exec_mcp.stale_mounts import configured_store, parse_mountinfo, stale_mounts


def disks(tmp_path: Path, ids: IdRange | None = None, run: str = "run") -> RootDisks:
    # A Podman that is never called: these paths need none.
    return RootDisks(tmp_path / "disks", Podman.__new__(Podman), ids, tmp_path / run)


def test_id_ranges_come_from_podmans_auto_userns_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\ncontainers:2147483647:2147483648\n")
    subgid.write_text("containers:3000000000:1000000\n")
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(tmp_path / "none.conf"))
    ids = IdRange.read(str(subuid), str(subgid))
    assert ids is not None and ids.user == "containers"
    # The smaller of the two ranges bounds the slots; slot 0 is the top of each range.
    assert ids.slots == 1_000_000 // USERNS_SIZE
    assert ids.bases(0) == (2147483647 + (ids.slots - 1) * USERNS_SIZE,
                            3000000000 + (ids.slots - 1) * USERNS_SIZE)  # fmt: skip
    assert ids.bases(ids.slots - 1) == (2147483647, 3000000000)
    # Podman's storage.conf may name another user: both must then draw from its ranges.
    conf = tmp_path / "storage.conf"
    conf.write_text(
        '[storage]\ndriver = "overlay"\n[storage.options]\nroot-auto-userns-user = "bob"\n'
    )
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(conf))
    assert auto_userns_user() == "bob"
    assert IdRange.read(str(subuid), str(subgid)) is None


def test_a_range_is_held_by_one_sandbox_on_the_whole_host(tmp_path: Path) -> None:
    """Two servers (two RootDisks, as two processes would hold them) never hand out the
    same range; a range whose holder died is free again, unless its container is still
    there."""
    ids = IdRange(1_000_000, 2_000_000, 3 * USERNS_SIZE)
    one, two = disks(tmp_path, ids), disks(tmp_path, ids)
    fd_a, uid_a, _ = one._reserve_ids("a")
    fd_b, uid_b, _ = two._reserve_ids("b")
    fd_c, uid_c, _ = one._reserve_ids("c")
    assert len({uid_a, uid_b, uid_c}) == 3
    with pytest.raises(Exception, match="all 3 user-namespace ranges are in use"):
        two._reserve_ids("d")
    os.close(fd_b)  # b's server died: its container is gone too
    fd_d, uid_d, _ = two._reserve_ids("d")
    assert uid_d == uid_b
    os.close(fd_d)  # d's server died, but the container d is still there
    two._existing = {"d"}
    with pytest.raises(Exception, match="in use"):
        two._reserve_ids("e")
    for fd in (fd_a, fd_c):
        os.close(fd)


def test_no_sub_ids_is_said_as_such(tmp_path: Path) -> None:
    with pytest.raises(NoSubIds, match="no sub-id ranges"):
        disks(tmp_path, None)._reserve_ids("a")


def test_the_sweep_leaves_roots_of_live_servers_and_of_existing_containers(
    tmp_path: Path,
) -> None:
    root_disks = disks(tmp_path)
    roots = root_disks.roots
    for name in ("live", "gone", "still-there"):
        (roots / name).mkdir()
        (roots / f"{name}.lock").touch()
    held = os.open(roots / "live.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # its server is alive
    try:
        assert root_disks.sweep(existing=["still-there"]) == ["gone"]
        assert sorted(p.name for p in roots.iterdir()) == [
            "live", "live.lock", "still-there", "still-there.lock",
        ]  # fmt: skip
    finally:
        os.close(held)


def test_host_names_are_valid_and_unique_per_sandbox() -> None:
    name = "pod_exec_mcp-7d397746-9e0e3e9bb12e-c77b"
    assert hostname_for(name) == "pod-exec-mcp-7d397746-9e0e3e9bb12e-c77b"
    long = "x" * 80 + "_tail"
    assert len(hostname_for(long)) <= 63 and hostname_for(long).endswith("tail")
    assert hostname_for("___") == "sandbox"


def test_the_image_configuration_is_read_from_podmans_inspect() -> None:
    config = ImageConfig.of(
        {"Env": ["PATH=/bin", "LANG=C.UTF-8", "junk"], "WorkingDir": "/workspace", "User": ""}
    )
    assert config == ImageConfig(("PATH=/bin", "LANG=C.UTF-8"), "/workspace", "")
    assert ImageConfig.of(None) == ImageConfig()


MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
45 27 7:0 / /var/lib/c/overlay/aaa rw,relatime - ext4 /dev/loop0 rw,discard
46 27 7:1 / /var/lib/c/overlay/bbb rw,relatime - ext4 /dev/loop1 rw,discard
47 27 254:0 /var/lib/c/overlay /var/lib/c/overlay rw - ext4 /dev/vda rw
48 22 7:0 /pod_exec_mcp-run /run/c/overlay-containers/c1/userdata rw - ext4 /dev/loop0 rw
49 22 7:2 /pod_exec_mcp-run /run/c/overlay-containers/c2/userdata rw - ext4 /dev/loop2 rw
50 22 0:40 / /run/pod_exec_mcp/roots/x rw - overlay none rw,lowerdir=/proc/self/fd/4
51 22 7:3 / /srv/my\\040disk rw - ext4 /dev/loop3 rw
"""


def test_cleanup_repairs_only_an_earlier_versions_mounts_whose_sandbox_is_gone() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[-1].point == "/srv/my disk"
    found = stale_mounts(
        mounts,
        "/var/lib/c",
        "/run/c",
        layers_in_use={"/var/lib/c/overlay/bbb"},
        containers={"c2"},
    )
    # The run-directory bind of gone container c1 first, then the loop disk of layer aaa;
    # not bbb (a container uses it), not c2's (it exists), not ours, not the host's.
    assert [m.point for m in found] == [
        "/run/c/overlay-containers/c1/userdata",
        "/var/lib/c/overlay/aaa",
    ]


def test_where_podman_info_fails_the_store_comes_from_its_storage_settings(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "storage.conf"
    conf.write_text('[storage]\ndriver = "overlay"\ngraphroot = "/g/root"\nrunroot = "/g/run"\n')
    assert configured_store({"CONTAINERS_STORAGE_CONF": str(conf)}) == ("/g/root", "/g/run")
    # Unset keys take containers-storage.conf(5)'s defaults.
    conf.write_text('[storage]\ndriver = "overlay"\n')
    environ = {"CONTAINERS_STORAGE_CONF": str(conf)}
    assert configured_store(environ) == ("/var/lib/containers/storage", "/run/containers/storage")
    conf.write_text("[storage\n")
    with pytest.raises(PodmanError, match="storage settings"):
        configured_store(environ)
