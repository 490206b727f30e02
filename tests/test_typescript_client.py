"""An MCP client written by someone else: the official TypeScript SDK (legacy era)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ServerProcess, wait_until

CLIENT_DIR = Path(__file__).parent / "ts_client"


@pytest.fixture(scope="module")
def ts_client() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed (scripts/dev.sh installs them)"
    if not (CLIENT_DIR / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=CLIENT_DIR, check=True
        )
    return CLIENT_DIR / "client.mjs"


def test_typescript_sdk_gets_a_private_persistent_shell(
    server: ServerProcess, ts_client: Path
) -> None:
    done = subprocess.run(
        ["node", str(ts_client), server.url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["protocol"] == "2025-11-25"
    assert report["tools"] == [
        "create_session", "delete_snapshot", "edit_file", "end_session", "fork_session",
        "list_snapshots", "read_file", "read_job", "shell_exec", "snapshot_session",
        "start_job", "stop_job", "write_file",
    ]  # fmt: skip
    assert report["write"] == {
        "isError": False,
        "structured": {**report["write"]["structured"], "output": "err\n", "retval": 3},
    }
    assert report["readSame"]["structured"]["output"] == "from-ts\n"
    assert report["readOther"]["structured"]["retval"] == 1
    # The SDK ended both MCP sessions with DELETE: their sandboxes are gone.
    assert wait_until(lambda: server.containers() == [], timeout=15)
