"""The benchmark still runs end to end (its figures are judged by people, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import disk_quota_supported

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_and_reports_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    if not disk_quota_supported():
        env["POD_EXEC_MCP_DISK_LIMIT"] = "0"  # the server would refuse to start otherwise
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--only", "warm,first", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    for row in ("warm.legacy", "warm.modern", "first.legacy", "first.modern"):
        assert results[row]["ratio"] > 0, row
