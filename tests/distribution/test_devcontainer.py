"""The devcontainer door: the configuration is valid for the devcontainers CLI, the image
builds with it on Podman, and a container started with the configuration's runArgs runs a
nested rootless Podman with the limits our sandboxes use.

Why the test starts that container itself rather than with `devcontainer up`: on Podman the
CLI adds --userns=keep-id for a non-root remoteUser, which only rootless Podman accepts, and
CI runs rootful Podman. So the test starts the image with exactly the configuration's
runArgs and user, as `devcontainer up` does on a Docker host, then runs the lifecycle scripts
the nested Podman depends on (post-start.sh, and post-create.sh's sub-id step).

Not checked here: VS Code itself, Docker hosts, rootless Podman hosts, and post-create's
`pip install -e .[test]` and base-image build (the latter needs a registry inside the
container; the wheel and server-image tests cover installing and building).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FIGURES
from dist_helpers import ROOT, TEST_LABEL, podman, remove_image, run, timed, unique

pytestmark = [pytest.mark.slow, pytest.mark.podman]

CONFIG_DIR = ROOT / ".devcontainer"
WORKSPACE = f"/workspaces/{ROOT.name}"

# A tiny image made inside the dev container from its own dash and sleep (no registry
# needed), then run by the nested rootless Podman with the limits a sandbox gets.
NESTED_CHECK = r"""
set -eu
cd "$HOME"
mkdir -p rootfs/bin
for bin in /bin/dash /bin/sleep; do
    cp "$bin" rootfs/bin/
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
        mkdir -p "rootfs$(dirname "$lib")" && cp -n "$lib" "rootfs$lib"
    done
done
tar -C rootfs -cf rootfs.tar .
podman import -q rootfs.tar localhost/nested-check >/dev/null
info='rootless={{.Host.Security.Rootless}} storage={{.Store.GraphDriverName}}'
podman info --format "$info cgroups={{.Host.CgroupsVersion}}"
podman run --rm --init --memory 256m --cpus 1 --pids-limit 100 \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --security-opt no-new-privileges \
    localhost/nested-check /bin/dash -c 'echo nested-run-ok'
podman run -d --name nested-sandbox --init localhost/nested-check /bin/sleep 60 >/dev/null
podman exec nested-sandbox /bin/dash -c 'echo nested-exec-ok'
podman rm -f -t 0 nested-sandbox >/dev/null
python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version; print("python-ok")'
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The devcontainers CLI: from PATH, else installed from npm into a temporary prefix."""
    found = shutil.which("devcontainer")
    if found:
        return [found]
    if shutil.which("npm") is None:
        pytest.skip("the devcontainers CLI is not installed, and there is no npm to install it")
    prefix = tmp_path_factory.mktemp("devcontainers-cli")
    done = subprocess.run(
        ["npm", "install", "--prefix", str(prefix), "@devcontainers/cli"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    binary = prefix / "node_modules" / ".bin" / "devcontainer"
    if done.returncode != 0 or not binary.exists():
        pytest.skip(
            "the devcontainers CLI is not installed and could not be installed "
            f"(`npm install @devcontainers/cli` failed: {done.stderr.strip()[-300:]})"
        )
    return [str(binary)]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # The CLI's temporary files in a directory of ours; Podman builds without keeping
    # intermediate images, so that nothing but the tag (removed at the end) is left.
    return {
        **os.environ,
        "TMPDIR": str(tmp_path_factory.mktemp("devcontainer-tmp")),
        "BUILDAH_LAYERS": "false",
    }


@pytest.fixture(scope="module")
def configuration(cli: list[str], cli_env: dict[str, str]) -> dict[str, Any]:
    done = run(
        [*cli, "read-configuration", "--docker-path", "podman", "--workspace-folder", ROOT],
        timeout=120, env=cli_env,
    )  # fmt: skip
    return json.loads(done.stdout)


def test_configuration(configuration: dict[str, Any]) -> None:
    config = configuration["configuration"]
    assert config["build"]["dockerfile"] == "Containerfile"
    assert (CONFIG_DIR / config["build"]["dockerfile"]).is_file()
    # The base by tag, behind an ARG of the Containerfile.
    assert config["build"]["args"]["BASE_IMAGE"] == "docker.io/library/debian:trixie-slim"
    assert "ARG BASE_IMAGE=" in (CONFIG_DIR / "Containerfile").read_text()
    assert "--privileged" not in config["runArgs"]
    assert {"--device=/dev/fuse", "--device=/dev/net/tun"} <= set(config["runArgs"])
    assert config["remoteUser"] == config["containerUser"] == "vscode"
    for command in (config["postCreateCommand"], config["postStartCommand"]):
        script = command.split()[-1]
        assert (ROOT / script).is_file(), script
    assert configuration["workspace"]["workspaceFolder"] == WORKSPACE


@pytest.fixture(scope="module")
def dev_image(cli: list[str], cli_env: dict[str, str]) -> Iterator[str]:
    tag = f"localhost/{unique('pod_exec_mcp_devcontainer_test')}"
    try:
        with timed("devcontainer: devcontainer build --docker-path podman (cold)"):
            done = run(
                [
                    *cli, "build", "--docker-path", "podman", "--workspace-folder", ROOT,
                    "--image-name", tag,
                ],
                timeout=900, env=cli_env,
            )  # fmt: skip
        assert json.loads(done.stdout.strip().splitlines()[-1])["outcome"] == "success"
        yield tag
    finally:
        remove_image(tag)


@pytest.fixture
def dev_container(dev_image: str, configuration: dict[str, Any]) -> Iterator[str]:
    config = configuration["configuration"]
    name = unique("pod_exec_mcp_devcontainer_test")
    try:
        podman(
            "run", "--detach", "--name", name, "--label", f"{TEST_LABEL}=devcontainer",
            "--user", config["containerUser"],
            "--mount", f"type=bind,source={ROOT},target={WORKSPACE},readonly",
            "--workdir", WORKSPACE,
            *config["runArgs"],
            dev_image, "sleep", "infinity",
        )  # fmt: skip
        yield name
    finally:
        podman("rm", "--force", "--time", "0", "--ignore", name, check=False)


def test_nested_rootless_podman(dev_container: str, tmp_path: Path) -> None:
    def dev_exec(*command: str) -> str:
        return podman("exec", dev_container, *command, timeout=300).stdout

    with timed("devcontainer: lifecycle scripts + nested Podman check"):
        dev_exec("bash", ".devcontainer/post-start.sh")
        dev_exec("bash", ".devcontainer/post-create.sh", "subids")
        out = dev_exec("bash", "-c", NESTED_CHECK)
    lines = out.splitlines()
    assert "rootless=true storage=overlay" in lines[0], out
    FIGURES["devcontainer: nested Podman"] = lines[0]
    for marker in ("nested-run-ok", "nested-exec-ok", "python-ok"):
        assert marker in lines, out
    assert dev_exec("podman", "--version").startswith("podman version ")
