"""`pod_exec_mcp_build`: build and tag the sandbox base image and the exec agent's image.

Both come from files packaged with pod_exec_mcp: image/Containerfile (the sandbox base) and
image/agent/ (the static agent binary, built in a multi-stage Containerfile, so no compiler
is needed on the host). Sandboxes mount the agent image read-only (docs/agent-protocol.md).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from pod_exec_mcp.agent_channel import DEFAULT_AGENT_IMAGE
from pod_exec_mcp.podman import PodmanError, find_podman

DEFAULT_TAG = "pod_exec_mcp_base"
DEFAULT_AGENT_TAG = DEFAULT_AGENT_IMAGE
DEFAULT_BASE_IMAGE = "docker.io/library/debian:trixie-slim"
PULL_POLICIES = ("missing", "always", "never", "newer")


@contextlib.contextmanager
def packaged_file(*parts: str) -> Iterator[Path]:
    """A file of the packaged image/ dir, as a real file while the context is open.

    A wheel carries image/ as package data (pod_exec_mcp/image/...). An editable install
    runs from the source tree, where it is the top-level image/ dir. The file's directory is
    its build context, so the packaged copy must be a real directory (as in any wheel
    installed on disk).
    """
    packaged = resources.files("pod_exec_mcp").joinpath("image", *parts)
    if packaged.is_file():
        with resources.as_file(packaged) as path:
            yield path
            return
    source_tree = Path(__file__).resolve().parent.parent.joinpath("image", *parts)
    if source_tree.is_file():
        yield source_tree
        return
    name = "/".join(parts)
    raise FileNotFoundError(f"the packaged image/{name} is missing: reinstall pod_exec_mcp")


def containerfile() -> contextlib.AbstractContextManager[Path]:
    """The sandbox base image's Containerfile."""
    return packaged_file("Containerfile")


def agent_containerfile() -> contextlib.AbstractContextManager[Path]:
    """The exec agent image's Containerfile (its context holds the agent's C sources)."""
    return packaged_file("agent", "Containerfile")


def build_command(
    podman: str, file: Path, tag: str, base_image: str, pull: str | None, no_cache: bool
) -> list[str]:
    cmd = [podman, "build", "--tag", tag, "--file", str(file)]
    cmd += ["--build-arg", f"BASE_IMAGE={base_image}"]
    if pull is not None:
        cmd.append(f"--pull={pull}")
    if no_cache:
        cmd.append("--no-cache")
    return [*cmd, str(file.parent)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pod_exec_mcp_build",
        description="Build the pod_exec_mcp sandbox image and its exec agent image from the "
        "Containerfiles in this package.",
    )
    parser.add_argument(
        "--tag", default=DEFAULT_TAG, help=f"sandbox base image tag (default: {DEFAULT_TAG})"
    )
    parser.add_argument(
        "--agent-tag",
        default=DEFAULT_AGENT_TAG,
        help=f"exec agent image tag (default: {DEFAULT_AGENT_TAG})",
    )
    parser.add_argument(
        "--base-image",
        default=DEFAULT_BASE_IMAGE,
        help=f"Debian base image, e.g. from your own mirror (default: {DEFAULT_BASE_IMAGE})",
    )
    parser.add_argument(
        "--pull",
        choices=PULL_POLICIES,
        default=None,
        help="when to pull the base image (podman's default: missing)",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not reuse cached layers")
    parser.add_argument("--podman", default="podman", help="podman executable (default: podman)")
    parser.add_argument(
        "--print-containerfile", action="store_true", help="print the Containerfile and exit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with containerfile() as file:
            if args.print_containerfile:
                sys.stdout.write(file.read_text())
                return 0
            podman = find_podman(args.podman)
            status = _build(podman, file, args.tag, args)
        if status == 0:
            with agent_containerfile() as file:
                status = _build(podman, file, args.agent_tag, args)
    except (PodmanError, FileNotFoundError) as exc:
        print(f"pod_exec_mcp_build: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pod_exec_mcp_build: error: interrupted", file=sys.stderr)
        return 130
    if status != 0:
        print(
            f"pod_exec_mcp_build: error: podman build failed (exit status {status}); "
            "see its output above",
            file=sys.stderr,
        )
        return 1
    print(f"pod_exec_mcp_build: built {args.tag} and {args.agent_tag}", file=sys.stderr)
    return 0


def _build(podman: str, file: Path, tag: str, args: argparse.Namespace) -> int:
    cmd = build_command(podman, file, tag, args.base_image, args.pull, args.no_cache)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    # Podman's output streams straight through as it builds.
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
