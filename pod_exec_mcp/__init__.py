"""pod_exec_mcp: an MCP server that gives every agent session its own Podman sandbox."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pod_exec_mcp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
