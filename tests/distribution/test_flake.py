"""The Nix door, as far as this machine can check it offline.

Debian's Nix (2.8) cannot fetch nixpkgs or build anything here (no cache.nixos.org, no
GitHub), so flake.nix is checked in two ways:
- it parses (`nix-instantiate --parse`), which also reports any undefined variable;
- its `outputs` function is evaluated, strictly, against stub-nixpkgs/: a stand-in with only
  the attributes the flake may use, shaped like nixpkgs' own. A misspelt or missing name, a
  wrong argument or a wrong output shape fails here. What the stub cannot prove is that the
  real nixpkgs revision has every name and version the flake expects: that needs `nix build`.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from dist_helpers import ROOT, run, source_version
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
FLAKE = ROOT / "flake.nix"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SYSTEM = "x86_64-linux"

# The nixpkgs Python the flake builds with: requirement markers are judged for it.
NIX_PYTHON = {"python_version": "3.13", "python_full_version": "3.13.0", "sys_platform": "linux"}
# Which extras of each pinned wheel the flake must provide (fastmcp asks for these).
WANTED_EXTRAS = {"fastmcp-slim": {"client", "server"}}
# The packages an extra stands for, as nixpkgs lists them (pydantic[email] and the like).
EXTRA_PACKAGES = {
    ("pydantic", "email"): "email-validator",
    ("pyjwt", "crypto"): "cryptography",
    ("py-key-value-aio", "filetree"): "aiofile",
    ("py-key-value-aio", "memory"): "cachetools",
}

NO_NIX = "nix-instantiate is not installed (apt-get install nix-bin; scripts/dev.sh does not yet)"
needs_nix = pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason=NO_NIX)


@needs_nix
def test_flake_parses() -> None:
    run(["nix-instantiate", "--parse", FLAKE], timeout=60)


@pytest.fixture(scope="module")
def evaluated() -> dict[str, Any]:
    if shutil.which("nix-instantiate") is None:
        pytest.skip(NO_NIX)
    expr = f'import {HERE / "eval-flake.nix"} {{ system = "{SYSTEM}"; }}'
    done = run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr], timeout=120)
    return json.loads(done.stdout)


def test_outputs(evaluated: dict[str, Any]) -> None:
    assert set(evaluated["outputNames"]) == {"packages", "apps", "devShells", "checks", "formatter"}
    assert evaluated["systems"] == ["aarch64-linux", "x86_64-linux"]
    # nixpkgs is pinned to one revision, in the URL.
    assert re.fullmatch(r"github:NixOS/nixpkgs/[0-9a-f]{40}", evaluated["nixpkgsUrl"])
    assert evaluated["formatter"] == "nixfmt"
    assert set(evaluated["checks"]) >= {"package", "podman-on-path", "lint"}


def test_package(evaluated: dict[str, Any]) -> None:
    pkg = evaluated["package"]
    assert evaluated["sameDefault"]
    assert pkg["kind"] == "buildPythonApplication"
    assert pkg["pyproject"] is True
    assert pkg["buildSystem"] == ["hatchling"]
    # Read from __init__.py, the version's one source (pyproject.toml has it as dynamic).
    assert pkg["version"] == source_version()
    declared = {
        canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]
    }
    assert set(pkg["dependencies"]) == declared
    # The Containerfile is force-included from image/: the source must hold it.
    assert str(ROOT / "image") in pkg["srcFiles"]
    # Podman after the user's PATH, so that their own podman wins.
    suffix, var, sep, path = pkg["makeWrapperArgs"]
    assert (suffix, var, sep) == ("--suffix", "PATH", ":")
    assert re.fullmatch(r"/nix/store/[^:]*podman[^:]*/bin", path), path


def test_apps_and_dev_shell(evaluated: dict[str, Any]) -> None:
    scripts = PYPROJECT["project"]["scripts"]
    apps = evaluated["apps"]
    assert apps["default"]["type"] == apps["build-image"]["type"] == "app"
    assert apps["default"]["program"].endswith("/bin/pod_exec_mcp")
    assert apps["build-image"]["program"].endswith("/bin/pod_exec_mcp_build")
    assert {Path(a["program"]).name for a in apps.values()} == set(scripts)

    shell = evaluated["devShell"]
    assert {"podman-5", "uv", "ruff"} <= {p.split("/")[-1] for p in shell["packages"]}
    assert {"pytest", "pytest-asyncio", "fastmcp"} <= set(shell["python"])


def _required_names(dist: str, extras: set[str]) -> set[str]:
    """The distributions `dist` (as installed here) requires, for the nixpkgs Python."""
    names: set[str] = set()
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        envs = [{**NIX_PYTHON, "extra": e} for e in ({""} | extras)]
        if req.marker is None or any(Marker(str(req.marker)).evaluate(env) for env in envs):
            name = canonicalize_name(req.name)
            names.add(name)
            names |= {EXTRA_PACKAGES[(name, x)] for x in req.extras if (name, x) in EXTRA_PACKAGES}
    return names


def test_pinned_wheels(evaluated: dict[str, Any]) -> None:
    wheels = evaluated["wheels"]
    assert {"fastmcp", "fastmcp-slim", "mcp", "mcp-types"} <= set(wheels)
    fastmcp_bound = next(
        Requirement(r).specifier
        for r in PYPROJECT["project"]["dependencies"]
        if canonicalize_name(Requirement(r).name) == "fastmcp"
    )
    assert wheels["fastmcp"]["version"] in SpecifierSet(str(fastmcp_bound)), fastmcp_bound
    for name, wheel in wheels.items():
        filename = f"{name.replace('-', '_')}-{wheel['version']}-py3-none-any.whl"
        assert wheel["url"].startswith("https://files.pythonhosted.org/packages/")
        assert wheel["url"].endswith("/" + filename), wheel["url"]
        assert wheel["format"] == "wheel"
        assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", wheel["hash"]), wheel["hash"]


def test_pinned_wheels_declare_what_their_metadata_requires(evaluated: dict[str, Any]) -> None:
    """Where this venv has the same version as a pinned wheel, the flake must give that wheel
    every dependency its metadata names (else the Nix build's runtime-deps check fails)."""
    compared = []
    for name, wheel in evaluated["wheels"].items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != wheel["version"]:
            continue
        missing = _required_names(name, WANTED_EXTRAS.get(name, set())) - set(wheel["dependencies"])
        assert not missing, f"flake.nix: {name} {installed} also needs {sorted(missing)}"
        compared.append(name)
    assert "fastmcp-slim" in compared, "the venv's fastmcp differs from the flake's pin"
