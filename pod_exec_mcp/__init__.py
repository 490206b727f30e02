"""pod_exec_mcp: an MCP server that gives every agent session its own Podman sandbox."""

# The one place the version is written. Hatch reads it from here for the wheel and sdist
# ([tool.hatch.version] in pyproject.toml), flake.nix reads it from here too, and a release
# tag must equal it (.github/workflows/release.yml). A literal, so that a source tree that
# was never installed reports the same version as a wheel.
__version__ = "0.1.0"
