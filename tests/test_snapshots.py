"""File-system snapshots and forks against real Podman, over HTTP (issue 26, its file-system
half): snapshot_session, create_session(snapshot_id=...), fork_session, list_snapshots,
delete_snapshot; ownership, bounds, a server restart, and nothing left behind."""

from __future__ import annotations

import json
import secrets
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FIGURES,
    IMAGE,
    ServerProcess,
    disk_limit_by,
    error_text,
    podman,
    sh,
    structured,
)
from fastmcp import Client

from pod_exec_mcp.podman import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_SNAPSHOT,
    LABEL_SNAPSHOT_KIND,
    has_labels,
)

pytestmark = pytest.mark.podman

TOKEN_A = "snapshot-token-a-0123456789abcdef"
TOKEN_B = "snapshot-token-b-0123456789abcdef"

# A file in /workspace, an "installed" tool outside it (no apt: a script in /usr/local),
# a deleted file of the image, and a file owned by ids other than root's.
PREPARE = (
    "echo kept > /workspace/file && mkdir -p /workspace/owned && "
    "chown 1234:4321 /workspace/owned && "
    "printf '#!/bin/sh\\necho tool-ran\\n' > /usr/local/bin/mytool && "
    "chmod +x /usr/local/bin/mytool && rm /etc/issue"
)
CHECK = (
    "cat /workspace/file; mytool; stat -c %u:%g /workspace/owned; "
    "test -e /etc/issue && echo issue-back || echo issue-gone"
)


def snapshot_images(*labels: str) -> list[dict[str, Any]]:
    """Every image (tagged or not) carrying our snapshot label and all of `labels`."""
    # Checked here: Podman 4.3 ORs several label filters of `images`.
    done = podman("images", "--all", "--format", "json", "--filter", f"label={LABEL_SNAPSHOT}")
    found: list[dict[str, Any]] = json.loads(done.stdout or "[]") or []
    return [i for i in found if has_labels(i.get("Labels") or {}, labels)]


@pytest.fixture(autouse=True)
def no_snapshot_left(run_dir: Path) -> Iterator[None]:
    """Whatever a test asserts, no snapshot image of this run's state dir outlives it: they
    survive server restarts by design, so a failed test would leave them for good."""
    yield
    owner = run_dir / "state" / "pod_exec_mcp" / "instances" / "owner"
    if owner.exists():
        left = snapshot_images(f"{LABEL_OWNER}={owner.read_text().strip()}")
        podman("rmi", *[i["Id"] for i in left], check=False)


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    return structured(await client.call_tool(tool, arguments))


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    return error_text(await client.call_tool(tool, arguments, raise_on_error=False))


async def create(client: Client, **arguments: Any) -> str:
    return (await call(client, "create_session", **arguments))["session_id"]


def _timed() -> float:
    return time.monotonic()


async def test_snapshot_restore_fork_own_bound_delete(launch: Any, run_dir: Path) -> None:
    env = {"POD_EXEC_MCP_AUTH_TOKEN": f"{TOKEN_A},{TOKEN_B}"}
    server: ServerProcess = launch("--max-snapshots-per-principal", "2", env=env)
    how = disk_limit_by() or "no disk limit"
    async with server.client(auth=TOKEN_A) as mine, server.client(auth=TOKEN_B) as other:
        source = await create(mine)
        assert (await sh(mine, PREPARE, session_id=source))["retval"] == 0
        taken = await call(mine, "snapshot_session", session_id=source)
        FIGURES[f"snapshot ({how}): took, size"] = f"{taken['took']:.2f} s, {taken['size']} bytes"
        snapshot_id = taken["snapshot_id"]
        assert taken["size"] > 0
        # The source changes after the snapshot, and goes on running.
        await sh(mine, "echo changed > /workspace/file", session_id=source)

        started = _timed()
        restored = await create(mine, snapshot_id=snapshot_id)
        FIGURES[f"create_session from a snapshot ({how})"] = f"{_timed() - started:.2f} s"
        seen = await sh(mine, CHECK, session_id=restored)
        assert seen["output"] == "kept\ntool-ran\n1234:4321\nissue-gone\n", seen
        assert (await sh(mine, "cat /workspace/file", session_id=source))["output"] == "changed\n"

        started = _timed()
        forks = (await call(mine, "fork_session", session_id=source, count=2))["session_ids"]
        FIGURES[f"fork_session, count 2 ({how})"] = f"{_timed() - started:.2f} s"
        assert len(set(forks)) == 2 and source not in forks
        await sh(mine, "echo mine > /workspace/only-here", session_id=forks[0])
        for sid in (forks[1], source):
            alone = await sh(mine, "cat /workspace/file; ls /workspace/only-here", session_id=sid)
            assert alone["output"].startswith("changed\n") and alone["retval"] != 0, alone
        forked = await sh(mine, CHECK.replace("kept", "changed"), session_id=forks[0])
        assert forked["output"] == "changed\ntool-ran\n1234:4321\nissue-gone\n", forked
        # No fork's passing copy stays.
        assert (
            snapshot_images(f"{LABEL_INSTANCE}={server.instance}", f"{LABEL_SNAPSHOT_KIND}=fork")
            == []
        )

        # Another principal sees nothing of it and can use none of it.
        assert (await call(other, "list_snapshots"))["snapshots"] == []
        assert "unknown snapshot_id" in await refused(
            other, "create_session", snapshot_id=snapshot_id
        )
        assert "unknown snapshot_id" in await refused(
            other, "delete_snapshot", snapshot_id=snapshot_id
        )
        assert "unknown session_id" in await refused(other, "fork_session", session_id=source)

        # The bound per principal: 2 kept, the third refused (and nothing made).
        second = (await call(mine, "snapshot_session", session_id=restored))["snapshot_id"]
        assert "maximum of 2 snapshots" in await refused(
            mine, "snapshot_session", session_id=source
        )
        listed = [s["snapshot_id"] for s in (await call(mine, "list_snapshots"))["snapshots"]]
        assert sorted(listed) == sorted([snapshot_id, second])
        assert "file-system snapshots only" in await refused(
            mine, "snapshot_session", session_id=source, memory=True
        )

        # Delete removes the image; the session started from it keeps its files.
        for sid in (snapshot_id, second):
            assert (await call(mine, "delete_snapshot", snapshot_id=sid))["deleted"] is True
            assert snapshot_images(f"{LABEL_SNAPSHOT}={sid}") == []
        assert (await call(mine, "list_snapshots"))["snapshots"] == []
        assert (await sh(mine, "cat /workspace/file", session_id=restored))["output"] == "kept\n"
        for sid in (source, restored, *forks):
            await call(mine, "end_session", session_id=sid)
    server.stop()
    assert server.containers() == []
    assert snapshot_images(f"{LABEL_INSTANCE}={server.instance}") == []
    if how == "root disk":
        # Of the files root disks are built over, only the server image's stay: a fork's
        # copy and a deleted snapshot's go with the last sandbox built over them.
        images = run_dir / "state" / "pod_exec_mcp" / "disks" / "images"
        base = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
        assert {p.name for p in images.iterdir()} <= {base, f"{base}.lock"}


async def test_snapshots_survive_a_restart_and_the_size_bound(launch: Any) -> None:
    first: ServerProcess = launch("--disk-limit", "0")
    async with first.client() as client:
        source = await create(client)
        await sh(client, PREPARE, session_id=source)
        taken = await call(client, "snapshot_session", session_id=source)
        FIGURES["snapshot (userns export+import): took, size"] = (
            f"{taken['took']:.2f} s, {taken['size']} bytes"
        )
        started = _timed()
        forks = (await call(client, "fork_session", session_id=source, count=2))["session_ids"]
        FIGURES["fork_session, count 2 (userns export+import)"] = f"{_timed() - started:.2f} s"
        await sh(client, "echo one > /workspace/file", session_id=forks[0])
        other = await sh(client, "cat /workspace/file", session_id=forks[1])
        assert other["output"] == "kept\n"
    first.stop()
    # Kept across the restart (same state dir), unlike its sessions.
    assert len(snapshot_images(f"{LABEL_SNAPSHOT}={taken['snapshot_id']}")) == 1
    second: ServerProcess = launch("--disk-limit", "0", "--max-snapshot-bytes", "1k")
    try:
        async with second.client() as client:
            listed = (await call(client, "list_snapshots"))["snapshots"]
            assert [s["snapshot_id"] for s in listed] == [taken["snapshot_id"]]
            started = _timed()
            restored = await create(client, snapshot_id=taken["snapshot_id"])
            FIGURES["create_session from a snapshot (userns export+import)"] = (
                f"{_timed() - started:.2f} s"
            )
            seen = await sh(client, CHECK, session_id=restored)
            assert seen["output"] == "kept\ntool-ran\n1234:4321\nissue-gone\n", seen
            # The kept snapshot already passes 1 KiB: the next one is refused.
            text = await refused(client, "snapshot_session", session_id=restored)
            assert "of the 1024 allowed" in text and "POD_EXEC_MCP_MAX_SNAPSHOT_BYTES" in text
            # Deleted while a session started from it runs: gone from the list at once,
            # its image once that session has ended.
            await call(client, "delete_snapshot", snapshot_id=taken["snapshot_id"])
            assert (await call(client, "list_snapshots"))["snapshots"] == []
            assert (await sh(client, "cat /workspace/file", session_id=restored))["retval"] == 0
            await call(client, "end_session", session_id=restored)
            assert snapshot_images(f"{LABEL_SNAPSHOT}={taken['snapshot_id']}") == []
    finally:
        second.stop()
    assert second.containers() == [] and first.containers() == []
    assert snapshot_images(f"{LABEL_INSTANCE}={first.instance}") == []


async def test_without_a_user_namespace_podman_commits_only_the_changes(launch: Any) -> None:
    server: ServerProcess = launch("--disk-limit", "0", "--userns", "host")
    assert "snapshots: file-system only" in server.log() and "podman commit" in server.log()
    async with server.client() as client:
        source = await create(client)
        await sh(client, PREPARE, session_id=source)
        taken = await call(client, "snapshot_session", session_id=source)
        FIGURES["snapshot (podman commit: --disk-limit 0, --userns host): took, size"] = (
            f"{taken['took']:.2f} s, {taken['size']} bytes"
        )
        # The layer's own bytes (a few files), not the image's.
        assert 0 < taken["size"] < 10_000_000
        restored = await create(client, snapshot_id=taken["snapshot_id"])
        seen = await sh(client, CHECK, session_id=restored)
        assert seen["output"] == "kept\ntool-ran\n1234:4321\nissue-gone\n", seen
        started = _timed()
        (fork,) = (await call(client, "fork_session", session_id=restored))["session_ids"]
        FIGURES["fork_session, count 1 (podman commit)"] = f"{_timed() - started:.2f} s"
        assert (await sh(client, CHECK, session_id=fork))["output"] == seen["output"]
        await call(client, "delete_snapshot", snapshot_id=taken["snapshot_id"])
    server.stop()
    assert server.containers() == []
    assert snapshot_images(f"{LABEL_INSTANCE}={server.instance}") == []


def _import_labelled(tar: Path, reference: str, labels: dict[str, str]) -> str:
    changes = [arg for k, v in labels.items() for arg in ("--change", f"LABEL {k}={v}")]
    done = podman("import", "--quiet", *changes, str(tar), reference)
    return done.stdout.strip().removeprefix("sha256:")


async def test_a_dead_servers_passing_copies_are_swept_and_snapshots_kept(
    launch: Any, run_dir: Path, tmp_path: Path
) -> None:
    launch("--disk-limit", "0").stop()  # the state dir's owner id exists from now on
    owner = (run_dir / "state" / "pod_exec_mcp" / "instances" / "owner").read_text().strip()
    tar = tmp_path / "tiny.tar"
    with tarfile.open(tar, "w") as archive:
        (tmp_path / "f").write_text("x")
        archive.add(tmp_path / "f", "f")
    dead = secrets.token_hex(8)  # an instance without a lock: its server is gone
    labels = {LABEL_MANAGED: "true", LABEL_OWNER: owner, LABEL_INSTANCE: dead}
    tag = secrets.token_hex(6)
    made = {
        kind: _import_labelled(
            tar,
            f"localhost/pod_exec_mcp_snapshot:{kind}_{tag}",
            {**labels, LABEL_SNAPSHOT: f"{kind}_{tag}", LABEL_SNAPSHOT_KIND: kind},
        )
        for kind in ("fork", "snapshot", "deleted")
    }
    # A deleted snapshot that a container used until it went: only its tag was removed.
    podman("untag", made["deleted"])
    try:
        launch("--disk-limit", "0").stop()  # its start-up sweep
        left = {i["Id"] for i in snapshot_images(f"{LABEL_INSTANCE}={dead}")}
        assert left == {made["snapshot"]}
    finally:
        podman("rmi", *made.values(), check=False)
