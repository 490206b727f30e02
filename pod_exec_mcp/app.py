"""The whole HTTP app, apart from the host checks: `cli.serve` checks Podman, the image and
the settings, then calls `create_app`; tests call it directly over an in-memory engine."""

from __future__ import annotations

from dataclasses import dataclass

from fastmcp.server.auth import AuthProvider
from starlette.applications import Starlette

from pod_exec_mcp.config import Settings
from pod_exec_mcp.engine import SandboxEngine
from pod_exec_mcp.health import Readiness
from pod_exec_mcp.http import http_app
from pod_exec_mcp.instances import Instance
from pod_exec_mcp.metrics import LiveState, Metrics
from pod_exec_mcp.podman import Podman
from pod_exec_mcp.server import build_server
from pod_exec_mcp.sessions import Sessions


@dataclass
class App:
    asgi: Starlette
    sessions: Sessions
    # The caller closes it (it unsubscribes from the audit trail) once serving ended.
    metrics: Metrics


def create_app(
    settings: Settings,
    engine: SandboxEngine,
    instance: Instance,
    auth: AuthProvider | None = None,
    podman: Podman | None = None,
) -> App:
    """The MCP server, its guards and the operator's endpoints. With `podman`, /readyz asks
    it and /metrics counts its failures; without (an engine that is not Podman's), /readyz
    always says ok."""
    mcp, sessions = build_server(settings, engine, instance, auth)
    if podman is not None:
        metrics = Metrics.for_server(podman, sessions, sessions.exec_slots)
        ready = Readiness(podman, settings.image).check
    else:
        slots = sessions.exec_slots
        metrics = Metrics(LiveState(sessions.census, lambda: slots.in_use, slots.size))
        ready = None
    return App(http_app(mcp, settings, metrics, ready), sessions, metrics)
