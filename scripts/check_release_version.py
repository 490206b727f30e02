#!/usr/bin/env python3
"""Check that a release's version agrees everywhere, before anything is published.

    scripts/check_release_version.py --tag v0.1.0 --command VENV/bin/pod_exec_mcp dist/

The tag must be `v` + the version; the wheel's METADATA and the sdist's PKG-INFO must carry
that version, and `pod_exec_mcp --version` (run from the installed wheel) must print it.
Prints the version on success; exits 1 naming every disagreement. Used by
.github/workflows/release.yml and by tests/distribution/test_wheel.py.
"""

from __future__ import annotations

import argparse
import email.parser
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PREFIX = "pod_exec_mcp"


def _metadata_version(text: str) -> str:
    return email.parser.Parser().parsestr(text, headersonly=True)["Version"] or "(none)"


def wheel_version(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return _metadata_version(zf.read(name).decode())


def sdist_version(sdist: Path) -> str:
    with tarfile.open(sdist) as tf:
        (member,) = [
            m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")
        ]
        handle = tf.extractfile(member)
        assert handle is not None
        return _metadata_version(handle.read().decode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True, help="the release tag, e.g. v0.1.0")
    parser.add_argument("--command", required=True, help="pod_exec_mcp from the installed wheel")
    parser.add_argument("dist", type=Path, help="directory with exactly one wheel and one sdist")
    args = parser.parse_args(argv)

    wheels = sorted(args.dist.glob(f"{PREFIX}-*.whl"))
    sdists = sorted(args.dist.glob(f"{PREFIX}-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(
            f"{args.dist}: want one wheel and one sdist, found {wheels + sdists}", file=sys.stderr
        )
        return 1
    if not args.tag.startswith("v"):
        print(f"tag {args.tag!r}: release tags are v<version>, e.g. v0.1.0", file=sys.stderr)
        return 1
    printed = subprocess.run(
        [args.command, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    found = {
        "tag": args.tag.removeprefix("v"),
        "pod_exec_mcp --version": printed.removeprefix(f"{PREFIX} "),
        f"{wheels[0].name} METADATA": wheel_version(wheels[0]),
        f"{sdists[0].name} PKG-INFO": sdist_version(sdists[0]),
    }
    if len(set(found.values())) != 1:
        print("the release's versions disagree:", file=sys.stderr)
        for where, version in found.items():
            print(f"  {where}: {version}", file=sys.stderr)
        print(
            "The version's one source is pod_exec_mcp/__init__.py: fix it or the tag.",
            file=sys.stderr,
        )
        return 1
    print(found["tag"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
