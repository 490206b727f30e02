"""The code stays ruff-clean (lint and format) and mypy-clean, checked with the rest of the
suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _passes(*tool: str) -> None:
    """Run `python -m TOOL ...` at the repository's root; its output is the failure text."""
    done = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_check() -> None:
    _passes("ruff", "check", ".")


def test_ruff_format() -> None:
    _passes("ruff", "format", "--check", ".")


def test_mypy() -> None:
    # The product, its tests and the benchmark: a test's wrong argument type is as much a
    # defect as the product's (one here passed network=True where a mode name belongs).
    _passes("mypy", "pod_exec_mcp", "tests", "bench")


def test_readme_settings_table_matches_the_model() -> None:
    from pod_exec_mcp.config import settings_table

    assert settings_table() in (ROOT / "README.md").read_text(), (
        "README's settings table is stale: regenerate it with "
        "`python -c 'from pod_exec_mcp.config import settings_table; print(settings_table())'`"
    )


def test_architecture_names_every_module() -> None:
    # The code map lives in one place; a new module without a line there is a stale map.
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        p.name
        for p in sorted((ROOT / "pod_exec_mcp").glob("*.py"))
        if p.name not in ("__init__.py", "__main__.py") and p.name not in text
    ]
    assert not missing, f"docs/architecture.md does not name: {missing}"
