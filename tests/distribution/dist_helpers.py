"""What the distribution tests share: the paths, a command runner that shows its output when
it fails, unique names for what they create, and timings for the end-of-run figures."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import FIGURES

ROOT = Path(__file__).resolve().parents[2]
# The Debian base every image of ours is built FROM, by tag; CI provides it locally.
BASE_IMAGE = os.environ.get("POD_EXEC_MCP_BASE_IMAGE", "docker.io/library/debian:trixie-slim")
# Builds behind a TLS-intercepting proxy need the host's CA bundle for pip (see Dockerfile).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Every container the distribution tests start carries this label (for cleanup by label).
TEST_LABEL = "io.pod_exec_mcp.test"
# The version's one source; read as text, so that it is this checkout's whatever is installed.
INIT_PY = ROOT / "pod_exec_mcp" / "__init__.py"
VERSION_LINE = re.compile(r'^__version__ = "([^"]+)"$', re.MULTILINE)


def source_version() -> str:
    """The version written in pod_exec_mcp/__init__.py (it must be written there exactly once)."""
    (version,) = VERSION_LINE.findall(INIT_PY.read_text())
    return version


def unique(prefix: str) -> str:
    """A name no other run (or agent on this machine) uses: prefix, pid and random bits."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(
    cmd: Sequence[object],
    *,
    timeout: float,
    check: bool = True,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` to completion; with `check`, a failure fails the test with its output."""
    args = [str(c) for c in cmd]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        pytest.fail(
            f"`{shlex.join(args)}` exited {done.returncode}\n"
            f"--- stdout (tail)\n{_tail(done.stdout)}\n--- stderr (tail)\n{_tail(done.stderr)}",
            pytrace=False,
        )
    return done


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], timeout=timeout, check=check)


def remove_image(tag: str) -> None:
    """Untag `tag` (and delete the image when that was its only name); never fails."""
    with contextlib.suppress(Exception):
        podman("rmi", "--ignore", tag, check=False)


@contextlib.contextmanager
def timed(figure: str) -> Iterator[None]:
    """Record how long the block took, printed at the end of the run."""
    started = time.monotonic()
    try:
        yield
    finally:
        FIGURES[figure] = f"{time.monotonic() - started:.1f} s"


def pip_ca_build_args() -> list[str]:
    """`podman build` arguments that let pip inside the build trust the host's CA bundle."""
    if not HOST_CA_BUNDLE.is_file():
        return []
    return [
        "--volume", f"{HOST_CA_BUNDLE}:/tmp/host-ca.crt:ro",
        "--build-arg", "PIP_CERT=/tmp/host-ca.crt",
    ]  # fmt: skip
