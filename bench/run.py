#!/usr/bin/env python3
"""Benchmark pod_exec_mcp against raw Podman, side by side, in one run.

    python bench/run.py                 # full run (~2.5-5 min on 2 cores)
    python bench/run.py --quick         # smoke run (< 1 min)
    python bench/run.py --proto         # also the persistent-channel PROTOTYPE
    python bench/run.py --only warm,first --reps 50 --json /tmp/r.json
    python bench/run.py --show docs/bench-results.json --markdown

It starts the server itself on a free port (the real server, through
bench/serve_instrumented.py, which times Sandbox.execute; --no-instrument for plain
`python -m pod_exec_mcp`) and measures:

  rss         the server's VmRSS fresh and with 0, 10 and 50 live sessions;
  warm        shell_exec("true") over MCP (legacy client, modern client with session_id)
              against `podman exec CTR /bin/sh -lc true` into the SAME container, the
              host's own `sh -lc true`, and, to split the time: the package's
              Sandbox.execute in this process, podman exec with our exact argv, and an MCP
              tool call that never reaches podman;
  first       the first call of a new session (legacy: the first shell_exec after
              connecting and listing tools, and the whole with the handshake; modern:
              create_session + first shell_exec) against raw `podman run -d ...` (the
              server's own arguments, from sandbox.run_arguments) + `podman exec ... true`;
  throughput  1, 4 and 16 concurrent sessions each doing N sequential `true` calls, against
              the same number of concurrent raw `podman exec` loops into the same containers;
  large       10 MB of output through shell_exec (capped; our read path reads all of it)
              against raw `podman exec` of the same command reading all of it;
  proto       (--proto) the PROTOTYPE persistent exec channel of bench/proto_channel.py.

Ours and raw are interleaved in random order within every repetition, so that the noise of
a shared machine hits both alike; every figure comes with its ratio to raw.

Every container it creates carries a label: the server's own (io.pod_exec_mcp.instance=ID)
or ours (bench.raw=1, bench.run=RUN). At the end, whatever still carries them is removed;
nothing else is touched. Podman must work in this environment (set CONTAINERS_CONF first
if the host needs one). See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

from fastmcp import Client

from pod_exec_mcp.config import load_settings
from pod_exec_mcp.engine import RunRequest, Sandbox, sandbox_spec
from pod_exec_mcp.podman import LABEL_INSTANCE
from pod_exec_mcp.podman import Podman as ProductPodman
from pod_exec_mcp.podman_engine import _EXEC_WRAPPER, EXEC_ID_ENV, PodmanEngine, run_arguments

HERE = Path(__file__).resolve().parent
LARGE_BYTES = 10_000_000
LARGE_COMMAND = f"head -c {LARGE_BYTES} /dev/zero | tr '\\0' a"
PHASES = ("rss", "warm", "first", "throughput", "large", "proto")

# Targets of issue 6: (result key, comparison, bound).
TARGETS = [
    ("warm.legacy", "<=", 1.15),
    ("warm.modern", "<=", 1.15),
    ("first.legacy", "<=", 1.2),
    ("first.modern", "<=", 1.2),
    ("throughput.16", ">=", 0.9),
]


# --- statistics -------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else float("nan"),
        "p90": percentile(values, 90),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def paired_ratio(ours: list[float], raw: list[float]) -> float:
    """Median of per-repetition ratios (samples taken side by side)."""
    ratios = [a / b for a, b in zip(ours, raw, strict=False) if b > 0]
    return statistics.median(ratios) if ratios else float("nan")


# --- subprocesses -------------------------------------------------------------------------


async def run_cmd(*argv: str) -> tuple[int, int, bytes]:
    """Run argv, reading all of stdout and stderr; returns (status, stdout bytes, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None

    async def drain_stdout() -> int:
        n = 0
        while chunk := await proc.stdout.read(65536):
            n += len(chunk)
        return n

    size, err = await asyncio.gather(drain_stdout(), proc.stderr.read())
    return await proc.wait(), size, err


async def timed(make: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = await make()
    return time.perf_counter() - started, value


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def system_busy() -> float:
    """CPU seconds the whole machine has spent not idle (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


class CpuMeter:
    """CPU used per call, split into the server, this process (the MCP client) and the
    whole machine (podman, conmon, runc, the command, ...). Tick-granular (10 ms), so only
    meaningful summed over many calls."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.totals: dict[str, list[float]] = {}  # name -> [server, client, system, calls]

    def snapshot(self) -> tuple[float, float, float]:
        return process_cpu(self.server_pid), time.process_time(), system_busy()

    def add(self, name: str, before: tuple[float, float, float], calls: int = 1) -> None:
        after = self.snapshot()
        total = self.totals.setdefault(name, [0.0, 0.0, 0.0, 0])
        for i in range(3):
            total[i] += after[i] - before[i]
        total[3] += calls

    def per_call_ms(self, name: str) -> dict[str, float]:
        server, client, system, calls = self.totals[name]
        return {
            "server": round(1000 * server / calls, 2),
            "client": round(1000 * client / calls, 2),
            "machine": round(1000 * system / calls, 2),
        }


class Podman:
    def __init__(self, executable: str) -> None:
        path = shutil.which(executable)
        if path is None:
            raise SystemExit(f"bench: podman executable {executable!r} not found")
        self.path = path

    async def __call__(self, *args: str, check: bool = True) -> tuple[int, int, bytes]:
        status, size, err = await run_cmd(self.path, *args)
        if check and status != 0:
            raise RuntimeError(f"podman {' '.join(args[:2])} failed ({status}): {err.decode()}")
        return status, size, err

    def ps(self, *labels: str) -> list[dict[str, Any]]:
        args = [self.path, "ps", "--all", "--format", "json"]
        for label in labels:
            args += ["--filter", f"label={label}"]
        out = subprocess.run(args, capture_output=True, check=True).stdout
        return json.loads(out or b"[]") or []

    def remove(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            subprocess.run(
                [self.path, "rm", "--force", "--time", "0", "--ignore", *ids],
                capture_output=True,
                check=False,
            )


# --- the server under test ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    extra_args: list[str]
    instrument: bool = True
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    instance: str = ""
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))
    times_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".json")[1]))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.port = free_port()
        log = self.log_path.open("wb")
        # The instrumented launcher is the real server (cli.main) with Sandbox.execute timed.
        entry = [str(HERE / "serve_instrumented.py")] if self.instrument else ["-m", "pod_exec_mcp"]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "--port", str(self.port), *self.extra_args],
            env={**os.environ, "BENCH_EXEC_TIMES": str(self.times_path)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Not the checkout: `-m` puts the cwd first on sys.path, which would shadow
            # PYTHONPATH (used to benchmark a patched copy of the package).
            cwd=tempfile.gettempdir(),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: the server exited:\n{self.log_path.read_text()}")
            if not self.instance:
                found = re.search(r"\(instance ([0-9a-f]+),", self.log_path.read_text())
                self.instance = found.group(1) if found else ""
            if self.instance:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
                ):
                    return
            time.sleep(0.05)
        raise SystemExit(f"bench: the server did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def exec_times(self) -> list[tuple[float, float]]:
        """(wall start, seconds) of every Sandbox.execute, once the server has exited."""
        try:
            return [tuple(x) for x in json.loads(self.times_path.read_text() or "[]")]
        except (OSError, ValueError):
            return []

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return -1


# --- the benchmark ------------------------------------------------------------------------


def _checked(result: Any) -> dict[str, Any]:
    data = result.structured_content or {}
    if result.is_error or data.get("retval") != 0:
        raise RuntimeError(f"shell_exec failed: {result}")
    return data


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = load_settings()
        self.podman = Podman(self.settings.podman)
        self.run_id = secrets.token_hex(4)
        self.raw_labels = {"bench.raw": "1", "bench.run": self.run_id}
        self.server = Server(["--max-sandboxes", "64", *args.server_arg], args.instrument)
        # Wall-clock start and duration of timed warm calls, to pair with the server's.
        self.stamps: dict[str, list[tuple[float, float]]] = {
            "legacy": [],
            "modern": [],
            "large": [],
        }
        self.results: dict[str, Any] = {}
        self.samples: dict[str, Any] = {}
        self._raw_seq = 0
        self._connects: list[float] = []
        self._with_handshake: list[float] = []
        self.large_command, self.large_bytes = LARGE_COMMAND, LARGE_BYTES

    # helpers ------------------------------------------------------------------------------

    def ours(self) -> set[str]:
        """Ids of the server's containers now."""
        return {c["Id"] for c in self.podman.ps(f"{LABEL_INSTANCE}={self.server.instance}")}

    async def wait_count(self, count: int, timeout: float = 20.0) -> None:
        """Wait until the server holds `count` containers (e.g. after a session ended)."""
        for _ in range(int(timeout * 10)):
            if len(self.ours()) == count:
                return
            await asyncio.sleep(0.1)

    async def exec_raw(self, container: str, command: str = "true") -> int:
        status, size, err = await self.podman("exec", container, "/bin/sh", "-lc", command)
        if status != 0:
            raise RuntimeError(f"raw exec failed: {err.decode()}")
        return size

    async def host_sh(self) -> None:
        status, _, _ = await run_cmd("sh", "-lc", "true")
        assert status == 0

    async def container_of(self, client: Client, args: dict[str, Any]) -> str:
        """The id of the container a session runs in (its hostname is the id's prefix)."""
        data = _checked(await client.call_tool("shell_exec", {"command": "hostname", **args}))
        prefix = data["output"].strip()
        (ctr,) = [c for c in self.ours() if c.startswith(prefix)]
        return ctr

    async def new_modern(self, stack: contextlib.AsyncExitStack) -> tuple[Client, str, str]:
        """A connected modern client with a fresh session, and that session's container."""
        client = await stack.enter_async_context(Client(self.server.url))
        sid = (await client.call_tool("create_session", {})).structured_content["session_id"]
        return client, sid, await self.container_of(client, {"session_id": sid})

    async def sessions(
        self, stack: contextlib.AsyncExitStack, count: int
    ) -> list[tuple[Client, str, str]]:
        """`count` modern sessions, one client each, four created at a time."""
        # Clients are entered here, in this task: their exit must happen in the same task.
        clients = [await stack.enter_async_context(Client(self.server.url)) for _ in range(count)]
        gate = asyncio.Semaphore(4)

        async def one(client: Client) -> tuple[Client, str, str]:
            async with gate:
                r = await client.call_tool("create_session", {})
                sid = r.structured_content["session_id"]
                return client, sid, await self.container_of(client, {"session_id": sid})

        return list(await asyncio.gather(*(one(c) for c in clients)))

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # phases -------------------------------------------------------------------------------

    async def phase_warm(self) -> None:
        reps = self.args.reps
        async with contextlib.AsyncExitStack() as stack:
            legacy = await stack.enter_async_context(Client(self.server.url, mode="legacy"))
            legacy_ctr = await self.container_of(legacy, {})
            modern, sid, modern_ctr = await self.new_modern(stack)
            # Our exec path without MCP: the product's own Sandbox, driven in this process.
            direct = PodmanEngine(ProductPodman(self.settings.podman))
            direct_sandbox = Sandbox(modern_ctr, {})
            request = RunRequest("true", 30.0, 3.0, 65536, 5.0)
            wrapper = [
                "exec", "--env", f"{EXEC_ID_ENV}=0123456789abcdef01234567", modern_ctr,
                "/bin/sh", "-c", _EXEC_WRAPPER, "pod_exec_mcp", "true",
            ]  # fmt: skip

            async def direct_true() -> None:
                result = await direct.run(direct_sandbox, request, None)
                assert result.retval == 0, result

            variants: dict[str, Callable[[], Awaitable[Any]]] = {
                "legacy": lambda: legacy.call_tool("shell_exec", {"command": "true"}),
                "modern": lambda: modern.call_tool(
                    "shell_exec", {"command": "true", "session_id": sid}
                ),
                "raw_legacy_ctr": lambda: self.exec_raw(legacy_ctr),
                "raw_modern_ctr": lambda: self.exec_raw(modern_ctr),
                "host": self.host_sh,
                "direct_sandbox": direct_true,
                "raw_wrapper": lambda: self.podman(*wrapper),
                # A tool call that never reaches podman (an unknown session): MCP alone.
                "mcp_noop": lambda: modern.call_tool(
                    "end_session", {"session_id": "no-such-session"}, raise_on_error=False
                ),
            }
            self.log(f"warm: {reps} interleaved repetitions of {len(variants)} variants")
            samples: dict[str, list[float]] = {k: [] for k in variants}
            cpu = CpuMeter(self.server.pid)
            for _ in range(3):  # warm-up, not counted
                for make in variants.values():
                    await make()
            orders: list[list[str]] = []
            for _ in range(reps):
                order = list(variants)
                random.shuffle(order)
                orders.append(order)
                for name in order:
                    snap = cpu.snapshot()
                    wall = time.time()
                    elapsed, value = await timed(variants[name])
                    cpu.add(name, snap)
                    if name in ("legacy", "modern"):
                        _checked(value)
                        self.stamps[name].append((wall, elapsed))
                    samples[name].append(elapsed)
            await modern.call_tool("end_session", {"session_id": sid})
        self.samples["warm"] = samples
        self.samples["warm_order"] = orders
        med = {k: statistics.median(v) for k, v in samples.items()}
        for kind in ("legacy", "modern"):
            ours, raw = samples[kind], samples[f"raw_{kind}_ctr"]
            self.results[f"warm.{kind}"] = {
                "what": f"shell_exec('true'), {kind} client, warm",
                "ours": summary(ours),
                "raw": summary(raw),
                "raw_what": "podman exec CTR /bin/sh -lc true (same container)",
                "ratio": med[kind] / med[f"raw_{kind}_ctr"],
                "paired_ratio": paired_ratio(ours, raw),
                # Against the raw execs into both session containers (twice the samples).
                "ratio_pooled": med[kind]
                / statistics.median(samples["raw_legacy_ctr"] + samples["raw_modern_ctr"]),
                "overhead_ms": 1000 * (med[kind] - med[f"raw_{kind}_ctr"]),
                "cpu_ms_per_call": cpu.per_call_ms(kind),
                "raw_cpu_ms_per_call": cpu.per_call_ms(f"raw_{kind}_ctr"),
            }
        for name, what in (
            ("host", "host sh -lc true (the floor)"),
            ("direct_sandbox", "pod_exec_mcp Sandbox.execute('true') in-process, no MCP"),
            ("raw_wrapper", "podman exec --env ID CTR /bin/sh -c WRAPPER true (our argv)"),
            ("mcp_noop", "MCP tool call that never reaches podman (end_session, unknown id)"),
        ):
            self.results[f"warm.{name}"] = {
                "what": what,
                "ours": summary(samples[name]),
                "cpu_ms_per_call": cpu.per_call_ms(name),
            }

        # Where a warm call's time goes. Differences of medians of podman execs are noisy
        # (their IQR is ~50 ms here), so only paired differences are given, and the MCP
        # share is measured directly: a tool call that never reaches podman (mcp_noop), and,
        # with the instrumented server, each call minus its own Sandbox.execute.
        def paired_ms(a: str, b: str) -> float:
            return 1000 * statistics.median(
                x - y for x, y in zip(samples[a], samples[b], strict=True)
            )

        self.results["warm.breakdown_ms"] = {
            "raw podman exec (median)": 1000 * med["raw_modern_ctr"],
            "raw exec IQR (noise)": 1000
            * (
                percentile(samples["raw_modern_ctr"], 75)
                - percentile(samples["raw_modern_ctr"], 25)
            ),
            "our argv minus raw (paired)": paired_ms("raw_wrapper", "raw_modern_ctr"),
            "Sandbox.execute minus raw (paired)": paired_ms("direct_sandbox", "raw_modern_ctr"),
            "modern call minus raw (paired)": paired_ms("modern", "raw_modern_ctr"),
            "legacy call minus raw (paired)": paired_ms("legacy", "raw_legacy_ctr"),
            "MCP tool call alone (mcp_noop median)": 1000 * med["mcp_noop"],
        }

    def pair_with_server(self) -> None:
        """Split each timed call into the server's Sandbox.execute and the rest."""
        times = self.server.exec_times()
        for kind, stamps in self.stamps.items():
            rest, inner = [], []
            for wall, elapsed in stamps:
                match = [d for w, d in times if wall <= w <= wall + elapsed]
                if match:
                    inner.append(match[0])
                    rest.append(elapsed - match[0])
            if not rest:
                continue
            split = {
                f"{kind}: server Sandbox.execute (median)": 1000 * statistics.median(inner),
                f"{kind}: call minus its Sandbox.execute (median)": 1000 * statistics.median(rest),
                f"{kind}: call minus its Sandbox.execute (p90)": 1000 * percentile(rest, 90),
            }
            if kind == "large":
                if "large" in self.results:
                    self.results["large"]["split_ms"] = split
                continue
            if f"warm.{kind}" not in self.results:  # interrupted before the warm results
                continue
            # A lower-noise estimate of the ratio: raw exec plus what the call adds around
            # its own exec (assumes Sandbox.execute ~ raw exec, which direct_sandbox checks).
            raw = self.results[f"warm.{kind}"]["raw"]["median"]
            self.results[f"warm.{kind}"]["ratio_split"] = (raw + statistics.median(rest)) / raw
            self.results["warm.breakdown_ms"].update(split)

    async def raw_first(self) -> float:
        self._raw_seq += 1
        name = f"bench-raw-{self.run_id}-{self._raw_seq}"
        started = time.perf_counter()
        await self.podman(*run_arguments(sandbox_spec(self.settings, name, self.raw_labels)))
        await self.exec_raw(name)
        elapsed = time.perf_counter() - started
        await self.podman("rm", "--force", "--time", "0", name, check=False)
        return elapsed

    async def legacy_first(self) -> float:
        """A new legacy MCP session: connect, list tools (as every agent does before its
        first call, and as fastmcp's Client would do inside the first call_tool anyway),
        then the first shell_exec, which starts the sandbox. Returns that first call; the
        whole, handshake included, is kept too."""
        base = len(self.ours())
        started = time.perf_counter()
        async with Client(self.server.url, mode="legacy") as client:
            await client.list_tools()
            connected = time.perf_counter()
            _checked(await client.call_tool("shell_exec", {"command": "true"}))
            ended = time.perf_counter()
        self._connects.append(connected - started)
        self._with_handshake.append(ended - started)
        await self.wait_count(base)
        return ended - connected

    async def modern_first(self, client: Client) -> float:
        started = time.perf_counter()
        sid = (await client.call_tool("create_session", {})).structured_content["session_id"]
        _checked(await client.call_tool("shell_exec", {"command": "true", "session_id": sid}))
        elapsed = time.perf_counter() - started
        await client.call_tool("end_session", {"session_id": sid})
        return elapsed

    async def phase_first(self) -> None:
        reps = self.args.first_reps
        self.log(f"first: {reps} interleaved repetitions of new-session first calls")
        async with Client(self.server.url) as modern:
            variants: dict[str, Callable[[], Awaitable[float]]] = {
                "legacy": self.legacy_first,
                "modern": lambda: self.modern_first(modern),
                "raw": self.raw_first,
            }
            for make in variants.values():  # warm-up, not counted
                await make()
            self._connects.clear()
            self._with_handshake.clear()
            samples: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(reps):
                order = list(variants)
                random.shuffle(order)
                for name in order:
                    samples[name].append(await variants[name]())
        samples["legacy_with_handshake"] = self._with_handshake
        samples["legacy_handshake_only"] = self._connects
        self.samples["first"] = samples
        raw = samples["raw"]
        self.results["first.handshake"] = {
            "what": "legacy: initialize + tools/list (fastmcp Client), no sandbox involved",
            "ours": summary(self._connects),
        }
        for kind, what in (
            ("legacy", "legacy: first shell_exec of a new MCP session (starts the sandbox)"),
            ("modern", "modern: create_session + first shell_exec"),
            (
                "legacy_with_handshake",
                "legacy: initialize + tools/list + first shell_exec, all of it",
            ),
        ):
            ours = samples[kind]
            self.results[f"first.{kind}"] = {
                "what": what,
                "ours": summary(ours),
                "raw": summary(raw),
                "raw_what": "podman run -d (server's args) + podman exec /bin/sh -lc true",
                "ratio": statistics.median(ours) / statistics.median(raw),
                "paired_ratio": paired_ratio(ours, raw),
                "overhead_ms": 1000 * (statistics.median(ours) - statistics.median(raw)),
            }

    async def phase_throughput(self) -> None:
        levels = self.args.levels
        calls = self.args.calls
        reps = self.args.tp_reps
        self.log(f"throughput: sessions {levels}, {calls} calls each, {reps} repetitions")
        async with contextlib.AsyncExitStack() as stack:
            pool = await self.sessions(stack, max(levels))

            async def ours_loop(client: Client, sid: str, lat: list[float]) -> None:
                for _ in range(calls):
                    elapsed, value = await timed(
                        lambda c=client: c.call_tool(
                            "shell_exec", {"command": "true", "session_id": sid}
                        )
                    )
                    _checked(value)
                    lat.append(elapsed)

            async def raw_loop(ctr: str, lat: list[float]) -> None:
                for _ in range(calls):
                    elapsed, _ = await timed(lambda: self.exec_raw(ctr))
                    lat.append(elapsed)

            cpu = CpuMeter(self.server.pid)

            async def measure(kind: str, k: int) -> tuple[float, list[float]]:
                lat: list[float] = []
                snap = cpu.snapshot()
                started = time.perf_counter()
                if kind == "ours":
                    await asyncio.gather(*(ours_loop(c, s, lat) for c, s, _ in pool[:k]))
                else:
                    await asyncio.gather(*(raw_loop(ctr, lat) for _, _, ctr in pool[:k]))
                rate = k * calls / (time.perf_counter() - started)
                cpu.add(f"{kind}.{k}", snap, k * calls)
                return rate, lat

            tput: dict[str, dict[str, list[float]]] = {
                str(k): {"ours": [], "raw": []} for k in levels
            }
            lats: dict[str, dict[str, list[float]]] = {
                str(k): {"ours": [], "raw": []} for k in levels
            }
            await measure("ours", 1)  # warm-up
            await measure("raw", 1)
            for _ in range(reps):
                for k in levels:
                    order = ["ours", "raw"]
                    random.shuffle(order)
                    for kind in order:
                        rate, lat = await measure(kind, k)
                        tput[str(k)][kind].append(rate)
                        lats[str(k)][kind] += lat
            await asyncio.gather(
                *(c.call_tool("end_session", {"session_id": s}) for c, s, _ in pool)
            )
        self.samples["throughput"] = {"calls_per_s": tput, "latency": lats}
        for k in levels:
            ours, raw = tput[str(k)]["ours"], tput[str(k)]["raw"]
            self.results[f"throughput.{k}"] = {
                "what": f"{k} concurrent sessions x {calls} sequential `true` calls",
                "unit": "calls/s",
                "ours": summary(ours),
                "raw": summary(raw),
                "raw_what": f"{k} concurrent loops of podman exec",
                "ratio": statistics.median(ours) / statistics.median(raw),
                "paired_ratio": paired_ratio(ours, raw),
                "latency_ours": summary(lats[str(k)]["ours"]),
                "latency_raw": summary(lats[str(k)]["raw"]),
                "cpu_ms_per_call": cpu.per_call_ms(f"ours.{k}"),
                "raw_cpu_ms_per_call": cpu.per_call_ms(f"raw.{k}"),
            }

    async def phase_large(self) -> None:
        reps = self.args.large_reps
        self.log(f"large: {reps} interleaved repetitions of 10 MB output")
        async with contextlib.AsyncExitStack() as stack:
            client, sid, ctr = await self.new_modern(stack)

            async def ours() -> None:
                wall, started = time.time(), time.perf_counter()
                data = _checked(
                    await client.call_tool(
                        "shell_exec", {"command": LARGE_COMMAND, "session_id": sid}
                    )
                )
                self.stamps["large"].append((wall, time.perf_counter() - started))
                assert data["truncated"], data

            async def raw() -> None:
                size = await self.exec_raw(ctr, LARGE_COMMAND)
                assert size == LARGE_BYTES, size

            variants = {"ours": ours, "raw": raw}
            samples: dict[str, list[float]] = {k: [] for k in variants}
            await ours()
            await raw()
            for _ in range(reps):
                order = list(variants)
                random.shuffle(order)
                for name in order:
                    samples[name].append((await timed(variants[name]))[0])
            await client.call_tool("end_session", {"session_id": sid})
        self.samples["large"] = samples
        self.results["large"] = {
            "what": "10 MB of output through shell_exec (capped to max_output_bytes)",
            "ours": summary(samples["ours"]),
            "raw": summary(samples["raw"]),
            "raw_what": "podman exec of the same command, reading all 10 MB",
            "ratio": statistics.median(samples["ours"]) / statistics.median(samples["raw"]),
            "paired_ratio": paired_ratio(samples["ours"], samples["raw"]),
        }

    async def phase_rss(self) -> None:
        levels = self.args.rss_levels
        self.log(f"rss: server VmRSS with {levels} live sessions")
        rss: dict[str, int] = {"fresh": self.server.rss_kib()}
        timings: dict[str, float] = {}
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(Client(self.server.url))
            # One session and call first, so that lazy imports and first-use caches are in.
            sid = (await client.call_tool("create_session", {})).structured_content["session_id"]
            _checked(await client.call_tool("shell_exec", {"command": "true", "session_id": sid}))
            await client.call_tool("end_session", {"session_id": sid})
            await asyncio.sleep(0.5)
            rss["0"] = self.server.rss_kib()
            sids: list[str] = []
            gate = asyncio.Semaphore(4)

            async def create() -> None:
                async with gate:
                    r = await client.call_tool("create_session", {})
                    sids.append(r.structured_content["session_id"])

            async def end(sid: str) -> None:
                async with gate:
                    await client.call_tool("end_session", {"session_id": sid})

            for level in levels:
                if level == 0:
                    continue
                started = time.perf_counter()
                await asyncio.gather(*(create() for _ in range(level - len(sids))))
                timings[f"create_to_{level}_s"] = time.perf_counter() - started
                await asyncio.sleep(0.5)
                rss[str(level)] = self.server.rss_kib()
            started = time.perf_counter()
            await asyncio.gather(*(end(s) for s in sids))
            timings["end_all_s"] = time.perf_counter() - started
        await asyncio.sleep(0.5)
        rss["0_after"] = self.server.rss_kib()
        top = max(levels)
        self.results["rss"] = {
            "what": "server VmRSS (KiB) by live sessions",
            "kib": rss,
            "per_session_kib": (rss[str(top)] - rss["0"]) / top if top else 0,
            "timings": timings,
        }

    async def phase_proto(self) -> None:
        """The persistent exec channel prototype (bench/proto_channel.py), not product code."""
        import proto_channel  # bench-local module, only needed for this phase

        reps = max(8, self.args.reps // 2)
        self.log(f"proto: {reps} interleaved repetitions, persistent channel PROTOTYPE")
        name = f"bench-raw-{self.run_id}-proto"
        await self.podman(*run_arguments(sandbox_spec(self.settings, name, self.raw_labels)))
        try:
            channel = await proto_channel.Channel.open(self.podman.path, name)
            try:
                await proto_channel.measure_into(self, channel, name, reps)
            finally:
                await channel.close()
        finally:
            await self.podman("rm", "--force", "--time", "0", name, check=False)

    # driver -------------------------------------------------------------------------------

    async def run_phases(self) -> None:
        for phase in self.args.only:
            started = time.perf_counter()
            await getattr(self, f"phase_{phase}")()
            self.log(f"  {phase} took {time.perf_counter() - started:.1f} s")

    def cleanup(self) -> list[str]:
        """Remove whatever still carries our labels; returns what was left over."""
        leftovers = []
        if self.server.instance:
            leftovers += self.podman.ps(f"{LABEL_INSTANCE}={self.server.instance}")
        leftovers += self.podman.ps(f"bench.run={self.run_id}")
        ids = [c["Id"] for c in leftovers]
        self.podman.remove(ids)
        return ids

    def run(self) -> dict[str, Any]:
        machine = describe_machine(self.podman)
        started = time.time()
        try:
            self.server.start()
            self.log(
                f"server pid {self.server.pid}, {self.server.url}, instance {self.server.instance}"
            )
            rss_start = self.server.rss_kib()
            asyncio.run(self.run_phases())
        finally:
            self.server.stop()
            leftovers = self.cleanup()
            if leftovers:
                self.log(f"removed {len(leftovers)} leftover container(s)")
        self.pair_with_server()
        machine["loadavg_end"] = os.getloadavg()
        machine["other_containers_end"] = count_other_containers(self.podman)
        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": machine,
            "config": {k: v for k, v in vars(self.args).items() if k not in ("json", "publish")},
            "server_settings": self.settings.model_dump(),
            "server_rss_kib_at_start": rss_start,
            "leftover_containers_removed": len(leftovers),
            "results": self.results,
            "targets": check_targets(self.results),
            "samples": self.samples,
        }


# --- reporting ------------------------------------------------------------------------------


def count_other_containers(podman: Podman) -> int:
    """Running containers that are not ours: a hint of how busy podman was."""
    return sum(
        1
        for c in podman.ps()
        if not (c.get("Labels") or {}).get("bench.raw") and c.get("State") == "running"
    )


def describe_machine(podman: Podman) -> dict[str, Any]:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    version = subprocess.run(
        [podman.path, "version", "--format", "{{.Client.Version}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    runtime = subprocess.run(
        [podman.path, "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_mib": mem_kib // 1024,
        "kernel": platform.release(),
        "os": _os_release(),
        "podman": version,
        "oci_runtime": runtime,
        "python": platform.python_version(),
        "fastmcp": pkg_version("fastmcp"),
        "loadavg_start": os.getloadavg(),
        "other_containers_start": count_other_containers(podman),
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, op, bound in TARGETS:
        if key not in results:
            continue
        ratio = results[key]["ratio"]
        met = ratio <= bound if op == "<=" else ratio >= bound
        out.append({"result": key, "ratio": ratio, "target": f"{op} {bound}", "met": met})
    return out


def table(report: dict[str, Any], markdown: bool = False) -> str:
    results = report["results"]
    goals = {t["result"]: t for t in report["targets"]}
    rows = [("measurement", "ours med", "ours p90", "raw med", "raw p90", "ratio", "target")]

    def ms(x: float) -> str:
        return f"{1000 * x:.1f} ms"

    for key, r in results.items():
        if "ours" not in r:
            continue
        if "raw" not in r:
            rows.append((key, ms(r["ours"]["median"]), ms(r["ours"]["p90"]), "", "", "", ""))
            continue
        fmt = (lambda x: f"{x:.2f}/s") if r.get("unit") == "calls/s" else ms
        goal = goals.get(key)
        verdict = f"{goal['target']} {'MET' if goal['met'] else 'MISSED'}" if goal else ""
        rows.append(
            (
                key,
                fmt(r["ours"]["median"]),
                fmt(r["ours"]["p90"]),
                fmt(r["raw"]["median"]),
                fmt(r["raw"]["p90"]),
                f"{r['ratio']:.3f}",
                verdict,
            )
        )
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
        lines.append("")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
    for kind in ("legacy", "modern"):
        r = results.get(f"warm.{kind}", {})
        if "ratio_pooled" in r:
            lines.append(
                f"warm.{kind} other ratio estimates: against both containers' raw execs "
                f"{r['ratio_pooled']:.3f}; raw median + the call minus its own exec "
                f"{r.get('ratio_split', float('nan')):.3f}"
            )
    if "warm.breakdown_ms" in results:
        lines.append("where a warm call's time goes (ms):")
        for k, v in results["warm.breakdown_ms"].items():
            lines.append(f"  {k:48} {v:7.1f}")
    if "split_ms" in results.get("large", {}):
        lines.append("10 MB call (ms):")
        for k, v in results["large"]["split_ms"].items():
            lines.append(f"  {k:48} {v:7.1f}")
    if "proto.checks" in results:
        lines.append(f"prototype semantics checks: {results['proto.checks']}")
    if "rss" in results:
        r = results["rss"]
        parts = ", ".join(f"{k} sessions: {v / 1024:.1f} MiB" for k, v in r["kib"].items())
        lines.append(f"server RSS: {parts}; {r['per_session_kib']:.0f} KiB per session")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (< 1 min)")
    parser.add_argument("--reps", type=int, help="warm repetitions per variant (default 60)")
    parser.add_argument("--first-reps", type=int, help="first-call repetitions (default 10)")
    parser.add_argument("--tp-reps", type=int, help="throughput repetitions (default 3)")
    parser.add_argument("--calls", type=int, help="sequential calls per session (default 5)")
    parser.add_argument("--large-reps", type=int, help="10 MB repetitions (default 7)")
    parser.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--rss-levels", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument(
        "--only",
        type=lambda s: [x for x in s.split(",") if x],
        help=f"comma-separated phases out of {','.join(PHASES)} (default: all but proto)",
    )
    parser.add_argument("--proto", action="store_true", help="also measure the prototype")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for the server (repeatable), e.g. --server-arg=--strict",
    )
    parser.add_argument(
        "--no-instrument",
        dest="instrument",
        action="store_false",
        help="start plain `python -m pod_exec_mcp` instead of bench/serve_instrumented.py",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--show", type=Path, help="print the table of an earlier run's JSON, run nothing"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--json", type=Path, default=HERE / "results.json", help="where to write the JSON"
    )
    parser.add_argument(
        "--publish", type=Path, help="also write the JSON here (e.g. docs/bench-results.json)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "reps": 8 if quick else 60,
        "first_reps": 3 if quick else 10,
        "tp_reps": 1 if quick else 3,
        "calls": 2 if quick else 4,
        "large_reps": 2 if quick else 7,
        "rss_levels": [0, 10] if quick else [0, 10, 50],
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.only is None:
        args.only = [p for p in PHASES if p != "proto"] + (["proto"] if args.proto else [])
    for phase in args.only:
        if phase not in PHASES:
            parser.error(f"unknown phase {phase!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show:
        print(table(json.loads(args.show.read_text()), args.markdown))
        return 0
    if args.seed is not None:
        random.seed(args.seed)
    sys.path.insert(0, str(HERE))
    bench = Bench(args)
    report = bench.run()
    text = json.dumps(report, indent=1)
    for path in filter(None, (args.json, args.publish)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(table(report, args.markdown))
    m = report["machine"]
    print(
        f"\n{m['cpus']} cpus, {m['mem_total_mib']} MiB, kernel {m['kernel']}, podman "
        f"{m['podman']} ({m['oci_runtime']}); load {m['loadavg_start'][0]:.2f} -> "
        f"{m['loadavg_end'][0]:.2f}; other running containers {m['other_containers_start']}"
        f" -> {m['other_containers_end']}; {report['duration_s']} s; JSON: {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
