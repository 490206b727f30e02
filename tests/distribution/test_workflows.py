"""The forge's CI and release workflows, the devcontainer file and the version, checked offline.

The workflows themselves only run on the forge (hosted runners, ghcr.io, PyPI, nixpkgs);
here they are checked statically, each tool first shown to catch a known-bad input:
- zizmor (its PyPI wheel carries the binary; `--offline` skips the audits that need the
  GitHub API, such as whether a pinned commit belongs to its repository), at its strictest
  persona: no findings;
- check-jsonschema's vendored GitHub workflow schema, and its stricter variant that demands
  `timeout-minutes` on every job;
- what the issue asks of them that neither tool knows: actions pinned by commit with the
  release named, least permissions, `id-token` only where PyPI needs it, and so on.
The devcontainer file is validated against the spec's own schema, vendored in schemas/
(neither check-jsonschema nor the devcontainers CLI ships it). And the version has one
source, pod_exec_mcp/__init__.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs
from dist_helpers import BASE_IMAGE, INIT_PY, ROOT, podman, remove_image, run, source_version
from dist_helpers import unique as unique_name

WORKFLOWS = ROOT / ".github" / "workflows"
CI, RELEASE = WORKFLOWS / "ci.yml", WORKFLOWS / "release.yml"
DEPENDABOT = ROOT / ".github" / "dependabot.yml"  # keeps the pinned actions current
DEVCONTAINER = ROOT / ".devcontainer" / "devcontainer.json"
# From github.com/devcontainers/spec, schemas/ (MIT, see schemas/README.md).
DEVCONTAINER_SCHEMA = Path(__file__).resolve().parent / "schemas" / "devContainer.base.schema.json"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RELEASE_IMAGES = ROOT / "scripts" / "release-images.sh"

# A workflow with the classic mistakes, to show that each checker catches what it should.
BAD_WORKFLOW = """\
name: bad
on: pull_request_target
jobs:
  build:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.pull_request.title }}"
"""


def tool(name: str) -> str:
    """A command of the test extra: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install the test extra (pip install -e '.[test]')")
    return found


def zizmor(*paths: Path) -> subprocess.CompletedProcess[str]:
    return run(
        [tool("zizmor"), "--offline", "--persona", "pedantic", "--format", "json", *paths],
        timeout=120, check=False,
    )  # fmt: skip


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as true.
    data["on"] = data.pop(True, data.get("on"))
    return data


def test_zizmor_finds_nothing_in_either_workflow() -> None:
    done = zizmor(CI, RELEASE, DEPENDABOT)
    findings = json.loads(done.stdout or "null")
    assert findings == [], [(f["ident"], f["desc"]) for f in findings or []]
    assert done.returncode == 0, done.stderr


def test_zizmor_catches_a_bad_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(BAD_WORKFLOW)
    done = zizmor(bad)
    idents = {f["ident"] for f in json.loads(done.stdout)}
    assert {"unpinned-uses", "artipacked", "template-injection", "excessive-permissions"} <= idents
    assert done.returncode != 0


@pytest.mark.parametrize(
    "schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"]
)
def test_workflows_match_the_schema(schema: str) -> None:
    run([tool("check-jsonschema"), "--builtin-schema", schema, CI, RELEASE], timeout=120)


def test_dependabot_config_matches_the_schema() -> None:
    run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.dependabot", DEPENDABOT], timeout=120
    )


def test_the_schemas_catch_bad_workflows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(BAD_WORKFLOW.replace("    runs-on: ubuntu-24.04\n", ""))  # no runner
    done = run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", bad],
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout
    no_timeout = tmp_path / "no-timeout.yml"
    no_timeout.write_text(BAD_WORKFLOW)
    done = run(
        [tool("check-jsonschema"), "--builtin-schema", "custom.github-workflows-require-timeout",
         no_timeout],
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout


@pytest.mark.parametrize("path", [CI, RELEASE], ids=["ci", "release"])
def test_every_action_is_pinned_by_commit_and_names_its_release(path: Path) -> None:
    uses = re.findall(r"^\s*(?:-\s+)?uses:\s*(.+)$", path.read_text(), re.MULTILINE)
    assert uses
    for line in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+", line), line


@pytest.mark.parametrize("path", [CI, RELEASE], ids=["ci", "release"])
def test_least_privilege(path: Path) -> None:
    workflow = load(path)
    assert workflow["permissions"] == {}, "grant per job, nothing at the top"
    assert workflow["concurrency"]["group"]
    for name, job in workflow["jobs"].items():
        granted = job["permissions"]
        assert granted.get("contents", "read") == "read", name
        # OIDC (trusted publishing) only in the PyPI job, and only behind its environment.
        if "id-token" in granted:
            assert (path, name, job["environment"]["name"]) == (RELEASE, "pypi", "pypi")
            assert granted == {"id-token": "write"}
        if granted.get("packages") == "write":
            assert path == RELEASE, name
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name


def _runs(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_ci_runs_the_readme_test_command_builds_the_images_and_the_flake() -> None:
    workflow = load(CI)
    assert set(workflow["on"]) == {"push", "pull_request"}
    jobs = workflow["jobs"]
    assert "scripts/dev.sh test" in (ROOT / "README.md").read_text()
    assert "scripts/dev.sh test" in _runs(jobs["test"])
    assert "pod_exec_mcp_build" in _runs(jobs["images"])
    assert "podman build" in _runs(jobs["images"])
    nix = _runs(jobs["nix"])
    for command in ("nix flake lock", "nix build", "nix flake check", "nix run . -- --version"):
        assert command in nix, command
    assert any("upload-artifact" in s.get("uses", "") for s in jobs["nix"]["steps"])
    for job in jobs.values():
        assert job["runs-on"].startswith("ubuntu-")


def test_release_checks_then_publishes_wheel_and_images() -> None:
    workflow = load(RELEASE)
    assert workflow["on"] == {"push": {"tags": ["v*"]}}
    jobs = workflow["jobs"]
    assert "check_release_version.py" in _runs(jobs["dist"])
    # Built once: the later jobs download the dist job's artifact, they never build again.
    assert "python -m build" not in _runs(jobs["pypi"]) + _runs(jobs["images"])
    assert set(jobs["pypi"]["needs"]) >= {"dist", "images"}
    publish = [s for s in jobs["pypi"]["steps"] if "gh-action-pypi-publish" in s.get("uses", "")]
    assert len(publish) == 1 and "password" not in publish[0].get("with", {})
    arches = {m["arch"]: m["runner"] for m in jobs["images"]["strategy"]["matrix"]["include"]}
    assert arches == {"amd64": "ubuntu-24.04", "arm64": "ubuntu-24.04-arm"}
    assert "ghcr.io/" in _runs(jobs["images"]) and "ghcr.io/" in _runs(jobs["manifests"])
    assert set(jobs["manifests"]["needs"]) >= {"images", "pypi"}


def test_release_images_are_the_three_images() -> None:
    script = RELEASE_IMAGES.read_text()
    assert "SANDBOX_IMAGES=(pod_exec_mcp_base pod_exec_mcp_agent)" in script
    assert "SERVER_IMAGE=pod_exec_mcp\n" in script


@pytest.mark.parametrize(
    ("version", "tags"),
    [("3.4.5", ["3.4.5", "latest"]), ("1.2.0rc1", ["1.2.0rc1"]), ("2.0.0.dev3", ["2.0.0.dev3"])],
)
def test_latest_moves_only_for_a_final_release(version: str, tags: list[str]) -> None:
    done = run([RELEASE_IMAGES, "tags"], timeout=30, env={**os.environ, "VERSION": version})
    assert done.stdout.split() == tags


@pytest.mark.podman
def test_release_labels_add_no_layer() -> None:
    """`stamp` is what gives each pushed image its OCI version, revision and source labels."""
    dest = f"localhost/{unique_name('pod_exec_mcp_stamp_test')}:1"
    env = {
        **os.environ,
        "VERSION": "9.8.7",
        "REVISION": "0123456789abcdef0123456789abcdef01234567",
        "SOURCE_URL": "https://example.invalid/pod_exec_mcp",
    }
    try:
        run([RELEASE_IMAGES, "stamp", BASE_IMAGE, dest], timeout=300, env=env)
        fmt = "{{json .Labels}} {{len .RootFS.Layers}}"
        labels_json, layers = podman("image", "inspect", "--format", fmt, dest).stdout.rsplit(
            " ", 1
        )
        base_layers = podman("image", "inspect", "--format", "{{len .RootFS.Layers}}", BASE_IMAGE)
        labels = json.loads(labels_json)
        assert labels["org.opencontainers.image.version"] == "9.8.7"
        assert labels["org.opencontainers.image.revision"] == env["REVISION"]
        assert labels["org.opencontainers.image.source"] == env["SOURCE_URL"]
        assert layers.strip() == base_layers.stdout.strip()
    finally:
        remove_image(dest)


def _strip_jsonc(text: str) -> str:
    """JSON with comments (devcontainer.json's dialect) to plain JSON; strings kept intact."""
    out, i = [], 0
    token = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.DOTALL)
    for m in token.finditer(text):
        out.append(text[i : m.start()])
        out.append(m.group() if m.group().startswith('"') else "")
        i = m.end()
    out.append(text[i:])
    return "".join(out)


def _validate_devcontainer(
    config: dict[str, Any], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    instance = tmp_path / "devcontainer.json"
    instance.write_text(json.dumps(config))
    return run(
        [tool("check-jsonschema"), "--schemafile", DEVCONTAINER_SCHEMA, instance],
        timeout=120, check=False,
    )  # fmt: skip


def test_devcontainer_matches_the_spec_schema(tmp_path: Path) -> None:
    config = json.loads(_strip_jsonc(DEVCONTAINER.read_text()))
    assert config["runArgs"], "the comment stripper lost content"
    done = _validate_devcontainer(config, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # The schema bites: a misspelt key and a wrongly typed value are both rejected.
    for broken in ({**config, "runargs": config["runArgs"]}, {**config, "runArgs": "--x"}):
        assert _validate_devcontainer(broken, tmp_path).returncode == 1


def test_the_version_has_one_source() -> None:
    version = source_version()
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == str(INIT_PY.relative_to(ROOT))
    assert "./pod_exec_mcp/__init__.py" in (ROOT / "flake.nix").read_text()
    # No other file of ours writes it (lock files and vendored files name other versions).
    literal = re.compile(rf"(?<![\w.]){re.escape(version)}(?![\w.])")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    if not tracked:  # not a git checkout (an unpacked sdist): every file
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    skip = ("package-lock.json", "flake.lock", "tests/distribution/schemas/", ".venv/", ".git/")
    holders = []
    for name in tracked:
        path = ROOT / name
        if any(s in name for s in skip) or not path.is_file():
            continue
        try:
            if literal.search(path.read_text()):
                holders.append(name)
        except UnicodeDecodeError:
            continue
    assert holders == ["pod_exec_mcp/__init__.py"], (
        f"{version} is written outside pod_exec_mcp/__init__.py: {holders}"
    )


def test_source_tree_reports_the_version() -> None:
    """`pod_exec_mcp --version` from a checkout that was never installed (PYTHONPATH only)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from pod_exec_mcp.cli import main; sys.exit(main(['--version']))"
    done = run([sys.executable, "-c", code], timeout=60, env=env, cwd=ROOT)
    assert done.stdout.strip() == f"pod_exec_mcp {source_version()}"
