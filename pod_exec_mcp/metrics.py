"""Prometheus metrics, from the official `prometheus-client`, served at /metrics.

Every metric lives in a CollectorRegistry of one `Metrics` object (one per server), never in
the library's global registry: building a second server in one process (tests) would
otherwise fail on duplicate names. Counters and histograms follow the audit events
(`audit.subscribe`); gauges are read from the live state when scraped, so they cannot
drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from pod_exec_mcp import __version__, audit
from pod_exec_mcp.slots import ExecSlots

PREFIX = "pod_exec_mcp"
CONTENT_TYPE = CONTENT_TYPE_LATEST

TOOLS = ("shell_exec", "create_session", "end_session")
OUTCOMES = ("ok", "error", "timed_out", "cancelled")
ERAS = ("legacy", "modern")

# Commands run from milliseconds to the 600 s maximum timeout.
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Waiting for an exec slot is normally ~0; anything visible means the server is saturated.
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Removal reasons as the registry words them (free text), mapped to label values.
_REMOVAL_REASONS = (
    ("idle", "idle"),
    ("end_session", "end_session"),
    ("mcp session ended", "mcp_session_ended"),
    ("shut down", "shutdown"),
    ("failed to start", "start_failed"),
    ("broke", "broken"),
    ("died", "pool_died"),
    ("warm pool", "pool_stale"),
)


def removal_reason(text: str) -> str:
    """A low-cardinality label value for a removal reason given as free text."""
    lowered = text.lower()
    for needle, label in _REMOVAL_REASONS:
        if needle in lowered:
            return label
    return "other"


def start_reason(text: str) -> str:
    lowered = text.lower()
    if "from" in lowered:
        return "from_pool"
    if "pool" in lowered:
        return "pool"
    return "new"


class _Session(Protocol):
    """What the gauges read of a sessions.Session."""

    @property
    def key(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def sandbox(self) -> object | None: ...


# The live sessions, and the names of the pooled sandboxes (Sessions.census).
Census = tuple[Sequence[_Session], Sequence[str]]


class LiveState:
    """What the gauges read at scrape time; the server supplies the functions."""

    def __init__(
        self, census: Callable[[], Census], slots_in_use: Callable[[], int], slots_total: int
    ) -> None:
        self.census = census
        self.slots_in_use = slots_in_use
        self.slots_total = slots_total


class _GaugeCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # only collected when scraped: the state may not exist yet

    def collect(self) -> Iterator[Metric]:
        live = self.metrics.live
        info = InfoMetricFamily(PREFIX + "_build", "The server's version.")
        info.add_metric([], {"version": __version__})
        yield info
        if live is None:
            return
        entries, pooled = live.census()
        sessions = [(e.key, e.kind, e.sandbox is not None) for e in entries]
        eras = self.metrics.session_eras(sessions)
        by_era = GaugeMetricFamily(
            PREFIX + "_sessions",
            "Live sessions, by the MCP era of the client that started them.",
            labels=["era"],
        )
        for era in (*ERAS, "unknown"):
            by_era.add_metric([era], sum(1 for e in eras.values() if e == era))
        yield by_era
        sandboxes = GaugeMetricFamily(
            PREFIX + "_sandboxes",
            "Live sandbox containers, by role (a session's, or ready in the warm pool).",
            labels=["role"],
        )
        sandboxes.add_metric(["session"], sum(1 for _, _, has in sessions if has))
        sandboxes.add_metric(["pool"], len(pooled))
        yield sandboxes
        yield GaugeMetricFamily(
            PREFIX + "_exec_slots_in_use",
            "Exec slots held by running commands (of max_concurrent_execs).",
            value=live.slots_in_use(),
        )
        yield GaugeMetricFamily(
            PREFIX + "_exec_slots", "Exec slots in all (max_concurrent_execs).",
            value=live.slots_total,
        )  # fmt: skip


class Metrics:
    """The metrics of one server: a registry of its own, fed by its audit events."""

    def __init__(self, live: LiveState | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.live = live
        # The era each live session was started from (sessions themselves do not know it).
        self._eras: dict[str, str] = {}
        r = self.registry
        self.tool_calls = Counter(
            PREFIX + "_tool_calls", "Tool calls, by tool, outcome and MCP era.",
            ["tool", "outcome", "era"], registry=r,
        )  # fmt: skip
        self.command_duration = Histogram(
            PREFIX + "_command_duration_seconds", "Seconds shell_exec commands ran.",
            registry=r, buckets=_DURATION_BUCKETS,
        )  # fmt: skip
        self.queue_wait = Histogram(
            PREFIX + "_exec_queue_wait_seconds",
            "Seconds shell_exec calls waited for an exec slot (max_concurrent_execs).",
            registry=r, buckets=_QUEUE_BUCKETS,
        )  # fmt: skip
        self.sandbox_starts = Counter(
            PREFIX + "_sandbox_starts",
            "Sandboxes started or handed out: new (for a session), pool (warm pool), "
            "from_pool (a pooled one taken by a session).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.sandbox_removals = Counter(
            PREFIX + "_sandbox_removals", "Sandboxes removed, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.sandbox_replacements = Counter(
            PREFIX + "_sandbox_replacements",
            "Broken sandboxes replaced by a fresh one for the same session.", registry=r,
        )  # fmt: skip
        self.podman_failures = Counter(
            PREFIX + "_podman_failures",
            "podman invocations that failed, by podman subcommand.", ["command"], registry=r,
        )  # fmt: skip
        self.kills = Counter(
            PREFIX + "_command_kills",
            "Commands killed inside their sandbox, by reason (timeout, cancelled).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.timeouts = Counter(
            PREFIX + "_command_timeouts", "Commands that ran out of time.", registry=r
        )
        # Known label sets start at 0, so that rate() and "moved by one" work from the start.
        for tool in TOOLS:
            for outcome in OUTCOMES:
                for era in ERAS:
                    self.tool_calls.labels(tool, outcome, era)
        for reason in ("new", "pool", "from_pool"):
            self.sandbox_starts.labels(reason)
        for reason in ("timeout", "cancelled"):
            self.kills.labels(reason)
        r.register(_GaugeCollector(self))
        self._unsubscribe = audit.subscribe(self.observe)

    @classmethod
    def for_server(cls, podman: Any, registry: Any, slots: ExecSlots) -> Metrics:
        """Metrics wired to a server's podman (failures), registry (census) and exec slots."""
        metrics = cls(LiveState(registry.census, lambda: slots.in_use, slots.size))
        podman.on_failure = metrics.podman_failed
        return metrics

    def close(self) -> None:
        self._unsubscribe()

    def observe(self, event: audit.AuditEvent) -> None:
        if isinstance(event, audit.ToolCall):
            self._tool_call(event)
        elif event.action == "started":
            self.sandbox_starts.labels(start_reason(event.reason)).inc()
        elif event.action == "replaced":
            self.sandbox_replacements.inc()
        else:
            self.sandbox_removals.labels(removal_reason(event.reason)).inc()

    def _tool_call(self, call: audit.ToolCall) -> None:
        self.tool_calls.labels(call.tool, call.outcome, call.era).inc()
        if call.session is not None and call.outcome == "ok":
            self._eras.setdefault(call.session, call.era)
        if call.queue_wait is not None:
            self.queue_wait.observe(call.queue_wait)
        if call.exec_duration is not None:
            self.command_duration.observe(call.exec_duration)
        if call.timed_out:
            self.timeouts.inc()
            self.kills.labels("timeout").inc()
        elif call.outcome == "cancelled" and call.queue_wait is not None:
            # It held an exec slot, so its command was running: the sandbox killed it.
            self.kills.labels("cancelled").inc()

    def podman_failed(self, subcommand: str) -> None:
        self.podman_failures.labels(subcommand).inc()

    def session_eras(self, sessions: list[tuple[str, str, bool]]) -> dict[str, str]:
        """The era of each live session; forgets sessions that are gone."""
        live = {key for key, _, _ in sessions}
        for gone in set(self._eras) - live:
            del self._eras[gone]
        return {
            key: "legacy" if kind == "legacy" else self._eras.get(key, "unknown")
            for key, kind, _ in sessions
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "LiveState", "Metrics", "removal_reason"]
