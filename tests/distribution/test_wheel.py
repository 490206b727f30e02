"""The pip/pipx door: the wheel and sdist, installed into a fresh venv outside the checkout.

pipx installs a wheel into a venv of its own and links its console scripts; this test does
the same by hand (a fresh venv in a temporary directory, no access to the source tree), and
then uses `pod_exec_mcp_build` from there to build a real image.
"""

from __future__ import annotations

import os
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dist_helpers import (
    BASE_IMAGE,
    ROOT,
    TEST_LABEL,
    podman,
    remove_image,
    run,
    source_version,
    timed,
    unique,
)

pytestmark = pytest.mark.slow

CONTAINERFILE = (ROOT / "image" / "Containerfile").read_text()
VERSION = source_version()
SCRIPTS = ("pod_exec_mcp", "pod_exec_mcp_build")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    with timed("wheel: python -m build (sdist, then the wheel from it)"):
        run([sys.executable, "-m", "build", "--outdir", out, ROOT], timeout=600, cwd=out)
    # Both file names carry the version hatch read from __init__.py.
    (wheel,) = out.glob(f"pod_exec_mcp-{VERSION}-py3-none-any.whl")
    (sdist,) = out.glob(f"pod_exec_mcp-{VERSION}.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_and_sdist_contents(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = wheel.namelist()
        # The Containerfile ships inside the package, where pod_exec_mcp_build looks for it.
        assert wheel.read("pod_exec_mcp/image/Containerfile").decode() == CONTAINERFILE
        # So does the exec agent's source and Containerfile (the agent image's build context).
        sources = sorted(p.name for p in (ROOT / "image" / "agent").iterdir() if p.is_file())
        assert {"main.c", "protocol.h", "Containerfile"} <= set(sources)
        for name in sources:
            source = (ROOT / "image" / "agent" / name).read_bytes()
            assert wheel.read(f"pod_exec_mcp/image/agent/{name}") == source
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
        (metadata_file,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = wheel.read(metadata_file).decode()
        # PEP 561: type checkers use the package's own hints only when this marker ships.
        assert "pod_exec_mcp/py.typed" in names
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nClassifier: Typing :: Typed\n" in metadata
    assert "\nProject-URL: Source, https://" in metadata
    assert "pod_exec_mcp = pod_exec_mcp.cli:main" in scripts
    assert "pod_exec_mcp_build = pod_exec_mcp.build:main" in scripts
    assert not [n for n in names if n.startswith("tests/")]

    with tarfile.open(dists["sdist"]) as sdist:
        members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "image/Containerfile", "pod_exec_mcp/cli.py"} <= members
    assert {f"image/agent/{name}" for name in sources} <= members


@pytest.fixture(scope="module")
def installed(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout, with the wheel (and its dependencies from PyPI)."""
    place = tmp_path_factory.mktemp("pipx-like")
    venv = place / "venv"
    with timed("wheel: fresh venv + pip install of the wheel and its dependencies"):
        run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120, cwd=place)
        # This interpreter's pip, installing into the new venv (as pipx's shared pip does).
        pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
        run([*pip, "install", "--quiet", dists["wheel"]], timeout=600, cwd=place)
    return venv


@pytest.fixture
def outside(installed: Path, tmp_path: Path) -> dict[str, Any]:
    """subprocess arguments that run from a directory outside the checkout, with nothing of
    it importable: no PYTHONPATH, and the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed / 'bin'}:{env.get('PATH', '')}"
    return {"cwd": tmp_path, "env": env}


def test_both_commands_installed(installed: Path, outside: dict[str, Any]) -> None:
    for script in SCRIPTS:
        assert (installed / "bin" / script).is_file(), script
    location = run(
        [installed / "bin" / "python", "-c", "import pod_exec_mcp; print(pod_exec_mcp.__file__)"],
        timeout=60, **outside,
    ).stdout.strip()  # fmt: skip
    assert location.startswith(str(installed)), location
    version = run(["pod_exec_mcp", "--version"], timeout=60, **outside).stdout.strip()
    assert version == f"pod_exec_mcp {VERSION}"


@pytest.fixture
def wheel_tag() -> Iterator[str]:
    tag = f"localhost/{unique('pod_exec_mcp_wheel_test')}"
    yield tag
    remove_image(tag)
    remove_image(f"{tag}_agent")


@pytest.mark.podman
def test_build_image_from_the_installed_wheel(
    installed: Path, outside: dict[str, Any], wheel_tag: str
) -> None:
    printed = run(["pod_exec_mcp_build", "--print-containerfile"], timeout=60, **outside).stdout
    assert printed == CONTAINERFILE
    with timed("wheel: pod_exec_mcp_build from the venv (layers cached by scripts/dev.sh)"):
        run(
            ["pod_exec_mcp_build", "--tag", wheel_tag, "--agent-tag", f"{wheel_tag}_agent",
             "--base-image", BASE_IMAGE],
            timeout=900, **outside,
        )  # fmt: skip
    tools = podman(
        "run", "--rm", "--label", f"{TEST_LABEL}=wheel", wheel_tag,
        "sh", "-c", "for t in git jq rg curl; do command -v $t; done",
    ).stdout  # fmt: skip
    assert len(tools.split()) == 4, tools


def test_release_version_check(dists: dict[str, Path], installed: Path) -> None:
    """The check release.yml runs before publishing: the tag, the command and the metadata."""
    check = [sys.executable, ROOT / "scripts" / "check_release_version.py"]
    dist_dir = dists["wheel"].parent
    command = ["--command", installed / "bin" / "pod_exec_mcp", dist_dir]
    ok = run([*check, "--tag", f"v{VERSION}", *command], timeout=60)
    assert ok.stdout.strip() == VERSION
    wrong = run([*check, "--tag", "v9.9.9", *command], timeout=60, check=False)
    assert wrong.returncode == 1 and not wrong.stdout
    assert "versions disagree" in wrong.stderr and "tag: 9.9.9" in wrong.stderr, wrong.stderr
    assert f"pod_exec_mcp --version: {VERSION}" in wrong.stderr, wrong.stderr
    bare = run([*check, "--tag", VERSION, *command], timeout=60, check=False)
    assert bare.returncode == 1 and "release tags are v<version>" in bare.stderr, bare.stderr
