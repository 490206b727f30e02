"""A brand-new Podman store, with nothing running in it, as a fresh host has (issue 20).

There Podman's overlay driver bind-mounts its home onto itself when a podman process
starts and unmounts it when the process exits with no layer mounted; a warm machine,
where some container always runs, hides every fault that this causes. Each test here
gets a store of its own (its own graph root, run root and libpod tmp dir), with only
the sandbox and agent images copied in, and removes it afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IMAGE, disk_limit_by, run_cli, sh, start_server  # noqa: F401 (skipif string)

from pod_exec_mcp.mount_api import detach

AGENT_IMAGE = os.environ.get("POD_EXEC_MCP_AGENT_IMAGE", "pod_exec_mcp_agent")

# The condition is a string so that it is asked at set-up, not at collection: the fast lane
# (-m "not podman") must collect this module where there is no podman.
pytestmark = [
    pytest.mark.podman,
    pytest.mark.skipif("disk_limit_by() != 'root disk'", reason="this host gives no root disks"),
]


def store_podman(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True)


def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory).rstrip("/") + "/"
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(prefix)]


def loop_disks_under(directory: str) -> list[str]:
    """Loop-device file systems mounted anywhere under `directory` (round 2 put them on
    layer directories in Podman's storage)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [ln for ln in lines if ln.split()[4].startswith(directory) and " /dev/loop" in ln]


@pytest.fixture
def fresh_store(tmp_path: Path, server_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The environment of a new, empty Podman store holding the two images."""
    store = tmp_path / "store"
    for sub in ("root", "run", "tmp"):
        (store / sub).mkdir(parents=True)
    (store / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{store}/root"\nrunroot = "{store}/run"\n'
    )
    # This host's own containers.conf lines (rlimits, runtime), and a libpod tmp dir of
    # the store's own (it is shared between stores otherwise).
    host_conf = os.environ.get("CONTAINERS_CONF")
    text = Path(host_conf).read_text() if host_conf else ""
    # Another store's tmp dir (CI's fresh-host lane has one) gives way to this one's.
    text = "".join(ln for ln in text.splitlines(True) if not ln.lstrip().startswith("tmp_dir"))
    tmp_line = f'tmp_dir = "{store}/tmp"'
    text = (
        text.replace("[engine]", f"[engine]\n{tmp_line}", 1)
        if "[engine]" in text
        else (f"{text}\n[engine]\n{tmp_line}\n")
    )
    (store / "containers.conf").write_text(text)
    env = {
        **server_env,
        "CONTAINERS_STORAGE_CONF": str(store / "storage.conf"),
        "CONTAINERS_CONF": str(store / "containers.conf"),
    }
    archive = tmp_path / "images.tar"
    saved = subprocess.run(
        ["podman", "save", "--multi-image-archive", "-o", str(archive), IMAGE, AGENT_IMAGE],
        capture_output=True, text=True,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    loaded = store_podman(env, "load", "-i", str(archive))
    assert loaded.returncode == 0, loaded.stderr
    archive.unlink()
    assert store_podman(env, "ps", "--all", "--quiet").stdout.strip() == ""
    yield env
    # Not `podman system reset`: rootful Podman keeps network definitions host-wide, and
    # it would delete them too.
    store_podman(env, "rm", "--all", "--force", "--time", "0")
    store_podman(env, "volume", "rm", "--all", "--force")
    store_podman(env, "rmi", "--all", "--force")
    # Whatever is still mounted under the store (a hidden mount shows once the one above
    # it is gone), then the store itself.
    for _ in range(10):
        points = mounts_under(store)
        if not points:
            break
        for point in sorted(points, key=len, reverse=True):
            with contextlib.suppress(OSError):
                detach(point)
    shutil.rmtree(store, ignore_errors=True)


def healthy(env: dict[str, str]) -> None:
    for args in (("ps", "--all"), ("images",)):
        done = store_podman(env, *args)
        assert done.returncode == 0 and "incomplete" not in done.stderr, (args, done.stderr)


def graph_root(env: dict[str, str]) -> str:
    info = json.loads(store_podman(env, "info", "--format", "json").stdout)
    return str(info["store"]["graphRoot"])


async def test_on_a_fresh_store_the_default_server_works_and_its_disk_limit_holds(
    fresh_store: dict[str, str], tmp_path: Path
) -> None:
    """Default settings but the limit, in a store where nothing runs: a session runs, a
    1.5 GB write stops near 1 GB with ENOSPC, Podman stays healthy, and nothing is ever
    mounted in Podman's storage by us."""
    server = start_server(fresh_store, tmp_path, "--disk-limit", "1g")
    try:
        async with server.client() as client:
            session = (await client.call_tool("create_session", {})).structured_content
            sid = session["session_id"]
            result = await sh(
                client,
                "head -c 1500m /dev/zero > /workspace/big; echo status=$?; "
                "stat -c %s /workspace/big; df -P -B1M / | awk 'NR==2 {print $2}'",
                session_id=sid, timeout=180,
            )  # fmt: skip
            storage = graph_root(fresh_store)
            ours = loop_disks_under(storage)
            await client.call_tool("end_session", {"session_id": sid})
    finally:
        server.stop()
    output = result["output"]
    assert "No space left on device" in output and "status=1" in output, output
    written, size = (int(n) for n in output.split()[-2:])
    assert 900 * 2**20 < written <= 2**30, output
    assert 900 <= size <= 1024, output
    assert ours == [], ours
    healthy(fresh_store)


def test_cleanup_repairs_what_an_earlier_version_left_hidden_in_podmans_storage(
    fresh_store: dict[str, str], tmp_path: Path
) -> None:
    """Round 2's fault, made by hand as its code did it: a loop disk mounted on a created
    container's layer directory while nothing runs, then `podman start` (whose bind of
    the storage home hides it), then `podman rm`. Podman is then broken for everyone;
    `pod_exec_mcp --cleanup` must repair it, and say so."""
    env = fresh_store
    created = store_podman(env, "create", "--name", "old", AGENT_IMAGE, "/agent", "init", "60")
    assert created.returncode == 0, created.stderr
    upper = store_podman(
        env, "container", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", "old"
    ).stdout.strip()
    layer = os.path.dirname(upper)
    disk = tmp_path / "old-disk"
    subprocess.run(["truncate", "-s", "64m", str(disk)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", layer, str(disk)], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(disk)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", loop, layer], check=True)
        assert store_podman(env, "start", "old").returncode == 0
        store_podman(env, "rm", "--force", "--time", "0", "old")
        broken = store_podman(env, "images")
        # The fault is real: Podman cannot delete the layer, and says so on every call.
        assert broken.returncode != 0 or "incomplete" in broken.stderr, broken
        done = run_cli(env, "--cleanup")
        assert done.returncode == 0, done.stderr
        assert re.search(r"unmounted an earlier version's (hidden )?ext4 mount", done.stdout), (
            done.stdout
        )
        assert "Podman's storage is healthy again" in done.stdout, done.stdout
        healthy(env)
        assert [p for p in mounts_under(Path(graph_root(env))) if p == layer] == []
    finally:
        subprocess.run(["umount", "-l", layer], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
