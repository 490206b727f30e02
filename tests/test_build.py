"""`pod_exec_mcp_build`: its failures are one clear line and a non-zero exit (issue 2)."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

BUILD = [sys.executable, "-m", "pod_exec_mcp.build"]


def run_build(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BUILD, *args], capture_output=True, text=True, env=env, timeout=300)


def test_missing_podman_is_one_line_and_non_zero() -> None:
    done = run_build("--podman", "no-such-podman-xyz")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "pod_exec_mcp_build: error: podman not found: 'no-such-podman-xyz' is not on PATH. "
        "Install Podman (e.g. `apt-get install podman`) or point POD_EXEC_MCP_PODMAN at it."
    ]


@pytest.mark.podman
def test_failed_build_is_reported_with_a_non_zero_exit() -> None:
    done = run_build(
        "--tag", "pod_exec_mcp_test_never_built",
        "--base-image", "localhost/pod_exec_mcp_no_such_base:none",
        "--pull", "never",
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pod_exec_mcp_build: error: podman build failed (exit status")
    exists = subprocess.run(["podman", "image", "exists", "pod_exec_mcp_test_never_built"])
    assert exists.returncode != 0


def test_print_containerfile_shows_the_packaged_file() -> None:
    done = run_build("--print-containerfile")
    assert done.returncode == 0
    assert "ARG BASE_IMAGE=docker.io/library/debian:trixie-slim" in done.stdout
    for tool in ("ripgrep", "jq", "git", "curl", "procps", "iproute2", "netcat-openbsd"):
        assert tool in done.stdout


def test_bad_option_is_refused() -> None:
    done = run_build("--pull", "sometimes")
    assert done.returncode == 2 and "invalid choice" in done.stderr


@pytest.mark.podman
def test_built_image_carries_the_promised_tools_and_defaults() -> None:
    from conftest import IMAGE, podman

    tools = (
        "bash git curl rg jq ps sed grep find xargs tar zip unzip xz file diff patch make ssh "
        "python3 pip3 ip ping dig nc"
    )
    script = (
        f"for t in {tools}; do command -v $t >/dev/null || echo missing $t; done; "
        "test -s /etc/ssl/certs/ca-certificates.crt || echo missing ca-certificates; "
        "ls /var/lib/apt/lists | grep -v -e '^lock$' -e '^partial$' || true; "
        "python3 -m venv /tmp/v >/dev/null || echo no venv; "
        "git config user.name >/dev/null || echo no git identity; "
        'echo "$LANG $PAGER $GIT_PAGER $GIT_TERMINAL_PROMPT $DEBIAN_FRONTEND $(pwd)"; '
        'echo "$GIT_EDITOR $EDITOR $(git config init.defaultBranch)"'
    )
    done = podman("run", "--rm", IMAGE, "/bin/sh", "-lc", script)
    assert done.stdout == "C.UTF-8 cat cat 0 noninteractive /workspace\ntrue true main\n", (
        done.stdout
    )
    labels = podman("image", "inspect", "--format", "{{json .Labels}}", IMAGE).stdout
    assert '"org.opencontainers.image.title":"pod_exec_mcp_base"' in labels


def test_agent_sources_are_found_and_the_tag_option_exists() -> None:
    from pod_exec_mcp.build import DEFAULT_AGENT_TAG, agent_containerfile

    with agent_containerfile() as file:
        assert (file.parent / "main.c").is_file() and (file.parent / "protocol.h").is_file()
        text = file.read_text()
    assert "ARG BASE_IMAGE=docker.io/library/debian:trixie-slim" in text
    assert "gcc -static" in text and "FROM scratch" in text
    done = run_build("--help")
    assert done.returncode == 0 and "--agent-tag" in done.stdout
    assert DEFAULT_AGENT_TAG == "pod_exec_mcp_agent"


@pytest.mark.podman
def test_build_makes_both_images_under_the_given_tags() -> None:
    """Layers are cached by scripts/dev.sh's build, so this mostly re-tags."""
    from conftest import IMAGE, podman

    suffix = uuid.uuid4().hex[:8]
    base, agent = f"pod_exec_mcp_test_base_{suffix}", f"pod_exec_mcp_test_agent_{suffix}"
    try:
        done = run_build("--tag", base, "--agent-tag", agent)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"pod_exec_mcp_build: built {base} and {agent}"
        )
        # The agent image is the static binary alone; it runs in any sandbox image.
        files = podman("image", "inspect", "--format", "{{len .RootFS.Layers}}", agent).stdout
        assert files.strip() == "1"
        out = podman(
            "run", "--rm", "--label", "io.pod_exec_mcp.test.build=1", "--read-only",
            "--cap-drop=ALL", "--mount", f"type=image,source={agent},destination=/.pod_exec_mcp",
            IMAGE, "/.pod_exec_mcp/agent", "--version",
        ).stdout  # fmt: skip
        assert out == "pod_exec_mcp agent, protocol version 1\n"
    finally:
        podman("rmi", "--ignore", base, agent, check=False)
