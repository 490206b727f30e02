"""An agent's own mistakes are logged at info, not as warnings or errors (issue 25)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from pod_exec_mcp.logs import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("level", ["info", "warning"])
def test_fastmcps_invalid_arguments_warning_is_info(restore_logging: None, level: str) -> None:
    out = io.StringIO()
    configure_logging("text", level, out)
    fastmcp = logging.getLogger("fastmcp.server.server")
    fastmcp.warning("Invalid arguments for tool %r: %s", "shell_exec", {"error_count": 1})
    fastmcp.warning("something else")
    lines = out.getvalue().splitlines()
    mistake = [line for line in lines if "Invalid arguments" in line]
    if level == "info":
        assert len(mistake) == 1 and " INFO " in mistake[0], lines
    else:
        assert mistake == [], lines  # below the level set: not written at all
    assert any("something else" in line and " WARNING " in line for line in lines), lines
