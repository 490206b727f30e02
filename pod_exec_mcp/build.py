"""`pod_exec_mcp_build`: build and tag the sandbox base image from the packaged Containerfile."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from pod_exec_mcp.podman import PodmanError, find_podman

DEFAULT_TAG = "pod_exec_mcp_base"
DEFAULT_BASE_IMAGE = "docker.io/library/debian:trixie-slim"
PULL_POLICIES = ("missing", "always", "never", "newer")


@contextlib.contextmanager
def containerfile() -> Iterator[Path]:
    """The Containerfile shipped in the package, as a real file while the context is open.

    A wheel carries it as package data (pod_exec_mcp/image/Containerfile). An editable
    install runs from the source tree, where it is the top-level image/Containerfile.
    """
    packaged = resources.files("pod_exec_mcp").joinpath("image", "Containerfile")
    if packaged.is_file():
        with resources.as_file(packaged) as path:
            yield path
            return
    source_tree = Path(__file__).resolve().parent.parent / "image" / "Containerfile"
    if source_tree.is_file():
        yield source_tree
        return
    raise FileNotFoundError("the packaged Containerfile is missing: reinstall pod_exec_mcp")


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
        description="Build the pod_exec_mcp sandbox image from the Containerfile in this package.",
    )
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default: {DEFAULT_TAG})")
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
            cmd = build_command(podman, file, args.tag, args.base_image, args.pull, args.no_cache)
            print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
            # Podman's output streams straight through as it builds.
            status = subprocess.call(cmd)
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
    print(f"pod_exec_mcp_build: built {args.tag}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
