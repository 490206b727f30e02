#!/usr/bin/env python3
"""Benchmark pod_exec_mcp against raw Podman and the host, side by side, in one run.

    python bench/run.py                      # full run (~3-5 min on 2 cores)
    python bench/run.py --quick              # smoke run (what CI runs)
    python bench/run.py --only warm,large --json /tmp/r.json
    python bench/run.py --show docs/bench-results.json --markdown

It starts the real server (`python -m pod_exec_mcp`, through tests/harness.py, on a free
loopback port) with `--warm-pool 2`, and measures, each against its comparator:

  warm         shell_exec("true"), legacy and modern clients, against raw `podman exec CTR
               /bin/sh -lc true` into the SAME container and the host's own `sh -lc true`;
               to split the time: an MCP call that never reaches a sandbox, and the exec
               agent driven directly from this process (no MCP);
  throughput   16 sessions each making N sequential `true` calls at once, against 16
               concurrent loops of N raw `podman exec` into the same containers;
  first        a new session's first call (legacy: first shell_exec after connecting;
               modern: create_session + shell_exec) with the warm pool, against raw
               `podman run` (the server's own arguments) + `podman exec`;
  large        10 MB of output through shell_exec against raw podman exec reading it all;
  kill         deadline to result for a TERM-ignoring tree (with a setsid child) that times
               out, on servers with kill_grace 0 and 1;
  agent        the exec agent's own cost: RSS and the pids of an idle sandbox, from /proc;
  podman_exec  warm shell_exec("true") on a server with exec_channel=podman-exec (the old
               one-podman-exec-per-command path), for reference;
  flood        another session's warm shell_exec("true") while one sandbox floods its own
               egress proxy (100 connections trickling heads, 50 threads of requests with
               2,000-character host names) for 20 s, against the same calls without the
               flood; how much the server's log grew meanwhile; and, as a control, the
               same calls while that sandbox only burns its CPU share;
  slots        an idle session's warm shell_exec("true") while 16 sessions, two `sleep 1`
               loops each, keep every server-wide exec slot busy, against the same calls
               with the slots free.

Variants are interleaved in random order within every repetition, so that the noise of a
shared machine hits all alike. Every container carries the server's instance label or
ours (bench.run=RUN); whatever carries them is removed at the end, nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.server
import json
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

from fastmcp import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import (  # noqa: E402  (tests/ is put on the path just above)
    ServerProcess,
    containers_of,
    containers_with,
    podman,
    remove_containers,
    start_server,
    structured,
)

from pod_exec_mcp.agent_channel import AGENT_PATH, AgentChannel  # noqa: E402
from pod_exec_mcp.config import load_settings  # noqa: E402
from pod_exec_mcp.engine import sandbox_spec  # noqa: E402
from pod_exec_mcp.podman import Podman  # noqa: E402
from pod_exec_mcp.podman_engine import agent_volume, podman_facts, run_arguments  # noqa: E402
from pod_exec_mcp.root_disk import hostname_for  # noqa: E402

LARGE_BYTES = 10_000_000
LARGE_COMMAND = f"head -c {LARGE_BYTES} /dev/zero | tr '\\0' a"
# A tree that ignores SIGTERM, with a child that left the session: only a KILL ends it.
STUBBORN = "trap '' TERM; while :; do sleep 1; done"
KILL_COMMAND = f'sh -c "{STUBBORN}" & setsid sh -c "{STUBBORN}" & {STUBBORN}'
KILL_TIMEOUT = 1.0
# Lists every process of the container but the listing shell, with builtins only.
PROC_LIST = (
    'for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = "$$" ] && continue; n=; pp=; r=0; '
    "while read -r k v _; do case $k in Name:) n=$v;; PPid:) pp=$v;; VmRSS:) r=$v;; esac; "
    'done < "$d/status"; echo "$p $pp $n $r"; done'
)
DOWNLOAD_BYTES = 100 * 1024 * 1024
# Timed by curl inside the sandbox: the transfer alone, not the tool call around it.
DOWNLOAD_COMMAND = "curl -sS -o /dev/null -w '%{{size_download}} %{{time_total}}' http://{}:{}/"
PHASES = (
    "warm", "throughput", "first", "large", "kill", "agent", "podman_exec", "download",
    "flood", "slots",
)  # fmt: skip
POOL = 2

# Issue 10's targets: result key -> (comparison, bound) on its ratio.
TARGETS = {
    "warm.legacy": ("<=", 0.12),
    "warm.modern": ("<=", 0.12),
    "warm.legacy_vs_host": ("<=", 2.5),
    "warm.modern_vs_host": ("<=", 2.5),
    "throughput.16": (">=", 4.0),
    "first.legacy": ("<=", 0.2),
    "first.modern": ("<=", 0.2),
    "large": ("<=", 0.5),
    # Issue 11's: the isolated network's proxy against --network bridge, in MB/s.
    "download": (">=", 0.5),
    # Issue 22's: one sandbox's flood of its proxy lifts another session's warm p50 by at
    # most 1.5x, and grows the server's log by under 5 MB (the row's "ratio" is the MB).
    "flood": ("<=", 1.5),
    "flood.log": ("<=", 5.0),
}

# The flood phase's attack, run by python3 in the flooding sandbox: every byte goes to
# 127.0.0.1:3128 in the sandbox, its own egress proxy, and nowhere else. Each request is
# one the proxy refuses without a lookup or a connection (this host's own address; a host
# name over 253 characters). argv: seconds, holders, bad-request threads.
FLOOD_SCRIPT = r"""
import json, socket, sys, threading, time
from collections import Counter

END = time.monotonic() + float(sys.argv[1])
HOLDERS, BAD = int(sys.argv[2]), int(sys.argv[3])
PROXY = ("127.0.0.1", 3128)
BIG = ("h" * 63 + ".") * 31 + "example"  # 1,991 characters
counts = Counter()
lock = threading.Lock()

def note(key):
    with lock:
        counts[key] += 1

def answer(data):
    if data.startswith(b"HTTP/1.1 "):
        return data[9:12].decode("ascii", "replace")
    return "closed" if not data else "other"

def holder():
    # One of HOLDERS connections open at once: a request head trickled a byte a second.
    trickle = b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nX-A: " + b"a" * 100000
    while time.monotonic() < END:
        try:
            s = socket.create_connection(PROXY, timeout=5)
        except OSError:
            note("connect failed")
            time.sleep(0.05)
            continue
        s.settimeout(1.0)
        try:
            for i in range(len(trickle)):
                if time.monotonic() >= END:
                    break
                s.send(trickle[i : i + 1])
                try:
                    data = s.recv(256)
                except socket.timeout:
                    continue
                note(answer(data))
                break
        except OSError:
            note("reset")
        finally:
            s.close()

def bad():
    request = f"CONNECT {BIG}:443 HTTP/1.1\r\nHost: {BIG}:443\r\n\r\n".encode()
    while time.monotonic() < END:
        try:
            with socket.create_connection(PROXY, timeout=5) as s:
                s.sendall(request)
                s.settimeout(5)
                note(answer(s.recv(256)))
        except OSError:
            note("reset")

threads = [threading.Thread(target=holder) for _ in range(HOLDERS)]
threads += [threading.Thread(target=bad) for _ in range(BAD)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(dict(counts)))
"""
FLOOD_HOLDERS, FLOOD_BAD_THREADS = 100, 50
# The flood's control: the same sandbox burning all the CPU it may (--cpus), nothing else.
BURN_SCRIPT = r"""
import json, multiprocessing, sys, time

def burn(end):
    while time.monotonic() < end:
        pass

end = time.monotonic() + float(sys.argv[1])
procs = [multiprocessing.Process(target=burn, args=(end,)) for _ in range(4)]
for p in procs:
    p.start()
for p in procs:
    p.join()
print(json.dumps({}))
"""
# The slots phase: sessions that keep the server-wide exec slots (16 by default) busy.
SLOT_SESSIONS, SLOT_LOOPS = 16, 2


class _Zeros(http.server.BaseHTTPRequestHandler):
    """Serves DOWNLOAD_BYTES of zeros to any GET (the download phase's origin, on this host)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(DOWNLOAD_BYTES))
        self.end_headers()
        chunk = bytes(1024 * 1024)
        for _ in range(DOWNLOAD_BYTES // len(chunk)):
            self.wfile.write(chunk)

    def log_message(self, *args: Any) -> None:
        pass


# --- statistics ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else float("nan"),
        "p10": percentile(values, 10),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": min(values, default=float("nan")),
        "max": max(values, default=float("nan")),
    }


def compare(
    what: str, ours: list[float], ref: list[float], ref_what: str, **extra: Any
) -> dict[str, Any]:
    """A result row: ours against a comparator, with the ratio of medians and the median of
    per-repetition ratios (the samples were taken side by side)."""
    paired = [a / b for a, b in zip(ours, ref, strict=False) if b > 0]
    return {
        "what": what,
        "ours": summary(ours),
        "ref": summary(ref),
        "ref_what": ref_what,
        "ratio": statistics.median(ours) / statistics.median(ref),
        "paired_ratio": statistics.median(paired) if paired else float("nan"),
        **extra,
    }


async def interleave(
    variants: Mapping[str, Callable[[], Awaitable[Any]]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant; every repetition runs all in a random order."""
    for _ in range(warmup):
        for make in variants.values():
            await make()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            started = time.perf_counter()
            await variants[name]()
            samples[name].append(time.perf_counter() - started)
    return samples


def cpu_seconds(pid: int) -> float:
    """CPU (user + system) a process has used, from /proc (tick-granular)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- commands -------------------------------------------------------------------------------


async def run_cmd(*argv: str) -> tuple[int, int, bytes]:
    """Run argv to its end, reading all of its output: (status, stdout bytes, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout

    async def count() -> int:
        n = 0
        while chunk := await out.read(65536):
            n += len(chunk)
        return n

    size, err = await asyncio.gather(count(), proc.stderr.read())
    return await proc.wait(), size, err


def ok(result: Any) -> dict[str, Any]:
    data = structured(result)
    if data.get("retval") != 0:
        raise RuntimeError(f"shell_exec failed: {data}")
    return data


def idle_queue_wait(line: str) -> float | None:
    """The slot wait of a server log line that is the audit event of a shell_exec("true")
    call (JSON, or text's key=value fields), else None."""
    if line.startswith("{"):
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if event.get("tool") == "shell_exec" and event.get("command") == "true":
            wait = event.get("queue_wait")
            return float(wait) if wait is not None else None
        return None
    if "tool=shell_exec" not in line or not re.search(r'\bcommand="?true"?(\s|$)', line):
        return None
    match = re.search(r"\bqueue_wait=([0-9.]+(?:e-?[0-9]+)?)", line)
    return float(match.group(1)) if match else None


# --- the benchmark ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = load_settings()
        podman_path = shutil.which(self.settings.podman)
        if podman_path is None:
            raise SystemExit(f"bench: podman executable {self.settings.podman!r} not found")
        self.podman = podman_path
        self.run_id = secrets.token_hex(4)
        self.labels = {"bench.run": self.run_id}
        self.tmp = Path(tempfile.mkdtemp(prefix="pod_exec_mcp_bench."))
        # Own state and config dirs: nothing of the user's instance is touched.
        self.env = {
            **os.environ,
            "XDG_STATE_HOME": str(self.tmp / "state"),
            "XDG_CONFIG_HOME": str(self.tmp / "config"),
        }
        self.servers: list[ServerProcess] = []
        self.main: ServerProcess | None = None
        self.results: dict[str, Any] = {}
        self.samples: dict[str, Any] = {}
        self._raw_seq = 0

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def server(self, *args: str) -> ServerProcess:
        server = start_server(self.env, self.tmp, "--max-sandboxes", "64", *args)
        self.servers.append(server)
        self.log(f"server {server.instance} pid {server.pid} on {server.url}: {' '.join(args)}")
        return server

    async def raw_exec(self, container: str, command: str = "true") -> int:
        status, size, err = await run_cmd(self.podman, "exec", container, "/bin/sh", "-lc", command)
        if status != 0:
            raise RuntimeError(f"raw podman exec failed ({status}): {err.decode()}")
        return size

    async def host_sh(self) -> None:
        status, _, _ = await run_cmd("sh", "-lc", "true")
        assert status == 0

    async def container_of(self, server: ServerProcess, client: Client, **args: Any) -> str:
        """The id of the container a session runs in, by its hostname: the id's prefix,
        or on a root disk one made from its name (root_disk.hostname_for)."""
        data = ok(await client.call_tool("shell_exec", {"command": "hostname", **args}))
        hostname = data["output"].strip()
        (ctr,) = [
            c["Id"]
            for c in containers_of(server.instance)
            if c["Id"].startswith(hostname) or hostname_for((c.get("Names") or [""])[0]) == hostname
        ]
        return ctr

    async def modern(
        self, stack: contextlib.AsyncExitStack, server: ServerProcess
    ) -> tuple[Client, str, str]:
        """A connected modern client with a new session, and that session's container."""
        client = await stack.enter_async_context(Client(server.url))
        sid = structured(await client.call_tool("create_session", {}))["session_id"]
        return client, sid, await self.container_of(server, client, session_id=sid)

    # phases ----------------------------------------------------------------------------------

    async def phase_warm(self) -> None:
        assert self.main is not None
        main = self.main
        async with contextlib.AsyncExitStack() as stack:
            legacy = await stack.enter_async_context(Client(main.url, mode="legacy"))
            legacy_ctr = await self.container_of(main, legacy)
            modern, sid, modern_ctr = await self.modern(stack, main)
            # The agent alone: a channel of our own into the same container, no MCP.
            agent = await AgentChannel.attach(
                [self.podman, "exec", "--interactive", modern_ctr, AGENT_PATH, "serve"]
            )
            stack.push_async_callback(agent.close)

            async def agent_true() -> None:
                ran = await agent.run("true", timeout=30, kill_grace=1, on_output=lambda _: None)
                assert ran.status == 0, ran

            cpu: dict[str, float] = {"legacy": 0.0, "modern": 0.0}

            def mcp(name: str, client: Client, arguments: dict[str, Any]) -> Any:
                async def call() -> None:
                    before = cpu_seconds(main.pid)
                    ok(await client.call_tool("shell_exec", {"command": "true", **arguments}))
                    cpu[name] += cpu_seconds(main.pid) - before

                return call

            variants: dict[str, Callable[[], Awaitable[Any]]] = {
                "legacy": mcp("legacy", legacy, {}),
                "modern": mcp("modern", modern, {"session_id": sid}),
                "raw_legacy_ctr": lambda: self.raw_exec(legacy_ctr),
                "raw_modern_ctr": lambda: self.raw_exec(modern_ctr),
                "host": self.host_sh,
                "agent_direct": agent_true,
                # A tool call that never reaches a sandbox (unknown session): MCP alone.
                "mcp_noop": lambda: modern.call_tool(
                    "end_session", {"session_id": "no-such-session"}, raise_on_error=False
                ),
            }
            reps = self.args.reps
            self.log(f"warm: {reps} interleaved repetitions of {len(variants)} variants")
            s = await interleave(variants, reps, warmup=3)
            await modern.call_tool("end_session", {"session_id": sid})
        self.samples["warm"] = s
        raw_what = "podman exec CTR /bin/sh -lc true, into the same container"
        for kind in ("legacy", "modern"):
            cpu_ms = round(1000 * cpu[kind] / (reps + 3), 2)
            self.results[f"warm.{kind}"] = compare(
                f"shell_exec('true'), {kind} client, warm", s[kind], s[f"raw_{kind}_ctr"],
                raw_what, server_cpu_ms_per_call=cpu_ms,
            )  # fmt: skip
            self.results[f"warm.{kind}_vs_host"] = compare(
                f"shell_exec('true'), {kind} client, warm", s[kind], s["host"],
                "the host's own sh -lc true",
            )  # fmt: skip
        for name, what in (
            ("host", "the host's own sh -lc true (the floor)"),
            ("agent_direct", "the exec agent driven from this process, no MCP: run 'true'"),
            ("mcp_noop", "an MCP tool call that never reaches a sandbox"),
            ("raw_modern_ctr", raw_what),
        ):
            self.results[f"warm.{name}"] = {"what": what, "ours": summary(s[name])}

    async def phase_podman_exec(self) -> None:
        server = self.server("--exec-channel", "podman-exec")
        reps = max(4, self.args.reps // 3)
        async with contextlib.AsyncExitStack() as stack:
            client, sid, ctr = await self.modern(stack, server)
            self.log(f"podman_exec: {reps} interleaved repetitions")

            async def ours() -> None:
                ok(await client.call_tool("shell_exec", {"command": "true", "session_id": sid}))

            s = await interleave({"ours": ours, "raw": lambda: self.raw_exec(ctr)}, reps)
            await client.call_tool("end_session", {"session_id": sid})
        server.stop()
        self.samples["podman_exec"] = s
        self.results["podman_exec.warm"] = compare(
            "shell_exec('true'), modern client, exec_channel=podman-exec (reference)",
            s["ours"], s["raw"], "podman exec CTR /bin/sh -lc true, into the same container",
        )  # fmt: skip

    async def phase_throughput(self) -> None:
        assert self.main is not None
        n, calls, reps = self.args.sessions, self.args.calls, self.args.tp_reps
        self.log(f"throughput: {n} sessions x {calls} calls, {reps} repetitions")
        async with contextlib.AsyncExitStack() as stack:
            pool = [await self.modern(stack, self.main) for _ in range(n)]

            async def ours(client: Client, sid: str) -> None:
                for _ in range(calls):
                    ok(await client.call_tool("shell_exec", {"command": "true", "session_id": sid}))

            async def raw(ctr: str) -> None:
                for _ in range(calls):
                    await self.raw_exec(ctr)

            variants = {
                "ours": lambda: asyncio.gather(*(ours(c, s) for c, s, _ in pool)),
                "raw": lambda: asyncio.gather(*(raw(ctr) for _, _, ctr in pool)),
            }
            s = await interleave(variants, reps)
            for client, sid, _ in pool:
                await client.call_tool("end_session", {"session_id": sid})
        rate = {k: [n * calls / t for t in v] for k, v in s.items()}
        self.samples["throughput"] = rate
        self.results[f"throughput.{n}"] = compare(
            f"{n} concurrent sessions x {calls} sequential shell_exec('true'), calls/s",
            rate["ours"], rate["raw"], f"{n} concurrent loops of {calls} raw podman exec",
            unit="calls/s",
        )  # fmt: skip

    async def pool_refilled(self, baseline: int) -> None:
        """Wait until the main server holds `baseline` running containers again (the warm
        pool refilled after a take), then a little more for the new agent to attach."""
        assert self.main is not None
        instance = self.main.instance

        def running() -> int:
            return sum(1 for c in containers_of(instance) if c.get("State") == "running")

        for _ in range(300):  # at most 30 s
            if running() == baseline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)

    async def raw_first(self) -> None:
        self._raw_seq += 1
        name = f"bench-{self.run_id}-{self._raw_seq}"
        # The server's agent volume, looked up (or made) again each time and not timed:
        # the server does the same once per start, and a shared machine's cleanups may
        # remove it meanwhile.
        volume = None
        if self.settings.exec_channel == "agent":
            volume = await agent_volume(Podman(self.podman), self.settings.agent_image)
        spec = sandbox_spec(self.settings, name, self.labels)
        if self._raw_without_disk_limit:
            spec = dataclasses.replace(spec, disk_limit=None)
        args = run_arguments(spec, volume)
        started = time.perf_counter()
        status, _, err = await run_cmd(self.podman, *args)
        if status != 0:
            raise RuntimeError(f"raw podman run failed: {err.decode()}")
        await self.raw_exec(name)
        self._raw_first.append(time.perf_counter() - started)
        await run_cmd(self.podman, "rm", "--force", "--time", "0", name)

    async def phase_first(self) -> None:
        assert self.main is not None
        main = self.main
        reps = self.args.first_reps
        self.log(f"first: {reps} interleaved repetitions, warm pool of {POOL}")
        self._raw_first: list[float] = []
        # Raw Podman cannot enforce the disk limit on this storage where the server gives
        # each sandbox a root disk: the baseline then goes without, to its advantage.
        facts = await podman_facts(Podman(self.podman))
        self._raw_without_disk_limit = facts.disk_limit_by_root_disk()
        times: dict[str, list[float]] = {"legacy": [], "modern": []}
        await self.pool_refilled(POOL)
        baseline = sum(1 for c in containers_of(main.instance) if c.get("State") == "running")

        async def legacy() -> None:
            async with Client(main.url, mode="legacy") as client:
                await client.list_tools()  # what the client does inside its first call
                started = time.perf_counter()
                ok(await client.call_tool("shell_exec", {"command": "true"}))
                times["legacy"].append(time.perf_counter() - started)
            await self.pool_refilled(baseline)

        async def modern(client: Client) -> None:
            started = time.perf_counter()
            sid = structured(await client.call_tool("create_session", {}))["session_id"]
            ok(await client.call_tool("shell_exec", {"command": "true", "session_id": sid}))
            times["modern"].append(time.perf_counter() - started)
            await client.call_tool("end_session", {"session_id": sid})
            await self.pool_refilled(baseline)

        async with Client(main.url) as client:
            await interleave(
                {"legacy": legacy, "modern": lambda: modern(client), "raw": self.raw_first},
                reps,
            )
        # Only the timed parts count (interleave's own times include the refill waits).
        raw = self._raw_first[1:]
        legacy_t, modern_t = times["legacy"][1:], times["modern"][1:]
        self.samples["first"] = {"legacy": legacy_t, "modern": modern_t, "raw": raw}
        raw_what = "podman run -d (the server's own arguments) + podman exec /bin/sh -lc true"
        self.results["first.legacy"] = compare(
            f"legacy: first shell_exec of a new MCP session, warm pool of {POOL}",
            legacy_t, raw, raw_what,
        )  # fmt: skip
        self.results["first.modern"] = compare(
            f"modern: create_session + first shell_exec, warm pool of {POOL}",
            modern_t, raw, raw_what,
        )  # fmt: skip

    async def phase_large(self) -> None:
        assert self.main is not None
        reps = self.args.large_reps
        self.log(f"large: {reps} interleaved repetitions of 10 MB of output")
        async with contextlib.AsyncExitStack() as stack:
            client, sid, ctr = await self.modern(stack, self.main)

            async def ours() -> None:
                data = ok(
                    await client.call_tool(
                        "shell_exec", {"command": LARGE_COMMAND, "session_id": sid}
                    )
                )
                assert data["truncated"], "10 MB came back whole"

            async def raw() -> None:
                size = await self.raw_exec(ctr, LARGE_COMMAND)
                assert size == LARGE_BYTES, size

            s = await interleave({"ours": ours, "raw": raw}, reps)
            await client.call_tool("end_session", {"session_id": sid})
        self.samples["large"] = s
        self.results["large"] = compare(
            "10 MB of output through shell_exec (the server reads it all, keeps head+tail)",
            s["ours"], s["raw"], "podman exec of the same command, reading all 10 MB",
        )  # fmt: skip

    async def phase_download(self) -> None:
        reps = self.args.download_reps
        self.log(f"download: {reps} interleaved 100 MB downloads, isolated (proxy) and bridge")
        origin = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Zeros)
        origin.daemon_threads = True
        threading.Thread(target=origin.serve_forever, daemon=True).start()
        port = origin.server_address[1]
        # The isolated server's operator allows exactly 127.0.0.2 (the proxy connects from
        # the host, so that is this host's loopback); the bridge sandbox reaches the same
        # listener through Podman's gateway.
        targets = {
            "ours": (self.server("--egress-allow", "public,127.0.0.2/32"), "127.0.0.2"),
            "raw": (self.server("--network", "bridge"), "host.containers.internal"),
        }
        rates: dict[str, list[float]] = {name: [] for name in targets}
        try:
            async with contextlib.AsyncExitStack() as stack:
                sessions: dict[str, tuple[Client, str, str]] = {}
                for name, (server, host) in targets.items():
                    client, sid, _ = await self.modern(stack, server)
                    sessions[name] = (client, sid, host)

                def fetch(name: str) -> Callable[[], Awaitable[None]]:
                    client, sid, host = sessions[name]

                    async def call() -> None:
                        command = DOWNLOAD_COMMAND.format(host, port)
                        arguments = {"command": command, "session_id": sid, "timeout": 120}
                        data = ok(await client.call_tool("shell_exec", arguments))
                        size, seconds = data["output"].split()
                        assert int(size) == DOWNLOAD_BYTES, data["output"]
                        rates[name].append(int(size) / float(seconds) / 1e6)

                    return call

                await interleave({name: fetch(name) for name in targets}, reps)
        finally:
            origin.shutdown()
            origin.server_close()
        reps_rates = {name: r[-reps:] for name, r in rates.items()}  # the warm-up left out
        self.samples["download"] = reps_rates
        self.results["download"] = compare(
            "100 MB over HTTP in the default network (isolated: through the agent's proxy)",
            reps_rates["ours"], reps_rates["raw"], "the same download with --network bridge",
            unit="MB/s",
        )  # fmt: skip

    async def phase_kill(self) -> None:
        reps = self.args.kill_reps
        for grace in (0, 1):
            server = self.server("--kill-grace", str(grace))
            self.log(f"kill: kill_grace {grace}, {reps} repetitions")
            late: list[float] = []
            notes: set[str] = set()
            async with contextlib.AsyncExitStack() as stack:
                client, sid, _ = await self.modern(stack, server)
                arguments = {"command": KILL_COMMAND, "session_id": sid, "timeout": KILL_TIMEOUT}
                for _ in range(reps):
                    started = time.perf_counter()
                    data = structured(await client.call_tool("shell_exec", arguments))
                    late.append(time.perf_counter() - started - KILL_TIMEOUT)
                    assert data["timed_out"], data
                    notes.add(data["output"].strip().splitlines()[-1])
                left = ok(await client.call_tool("shell_exec", {
                    "command": "grep -l '[w]hile :' /proc/[0-9]*/cmdline 2>/dev/null | wc -l",
                    "session_id": sid,
                }))["output"].strip()  # fmt: skip
                await client.call_tool("end_session", {"session_id": sid})
            server.stop()
            self.samples[f"kill.grace{grace}"] = late
            self.results[f"kill.grace{grace}"] = {
                "what": f"timeout {KILL_TIMEOUT:g} s of a TERM-ignoring tree with a setsid "
                f"child, kill_grace {grace}: seconds from the deadline to the result",
                "ours": summary(late),
                "result_notes": sorted(notes),
                "processes_left_after": int(left or 0),
            }

    async def phase_agent(self) -> None:
        assert self.main is not None
        async with contextlib.AsyncExitStack() as stack:
            client, sid, ctr = await self.modern(stack, self.main)
            # Idle: no command of ours runs. A finished command's supervisor may take a
            # moment to go on a busy machine, so look again (bounded) until it has.
            waited = 0.0
            for _ in range(20):
                await asyncio.sleep(0.5)
                waited += 0.5
                listing = podman("exec", ctr, "/bin/sh", "-c", PROC_LIST).stdout
                if "supervisor" not in listing:
                    break
            await client.call_tool("end_session", {"session_id": sid})
        procs: list[dict[str, Any]] = []
        for line in listing.splitlines():
            pid, ppid, name, rss = [*line.split(), "", "", "", "0"][:4]
            procs.append({"pid": int(pid), "ppid": int(ppid), "name": name, "rss_kib": int(rss)})
        # The serving agent names itself (e.g. pem-agent); PID 1 is the agent's init.
        serve = [p for p in procs if "agent" in p["name"] and p["pid"] != 1]
        init = [p for p in procs if p["pid"] == 1]
        self.results["agent"] = {
            "what": "an idle sandbox of the server, from /proc in the container",
            "processes": procs,
            "idle_pids": len(procs),
            "seconds_until_idle": waited,
            "agent_serve_rss_kib": sum(p["rss_kib"] for p in serve),
            "agent_init_rss_kib": sum(p["rss_kib"] for p in init),
        }

    async def warm_trues(
        self, client: Client, sid: str, seconds: float, until: asyncio.Future[Any] | None = None
    ) -> list[float]:
        """Seconds per warm shell_exec("true") of one session, one call at a time with a
        random pause of up to 50 ms between calls (so that they do not lock step with a
        load's own rhythm), for `seconds`, or until `until` is done."""
        samples: list[float] = []
        end = time.perf_counter() + seconds
        arguments = {"command": "true", "session_id": sid}
        while (until is None and time.perf_counter() < end) or (
            until is not None and not until.done()
        ):
            started = time.perf_counter()
            ok(await client.call_tool("shell_exec", arguments))
            samples.append(time.perf_counter() - started)
            await asyncio.sleep(random.uniform(0, 0.05))
        return samples

    def loaded_row(
        self,
        key: str,
        what: str,
        loaded: list[float],
        quiet: list[float],
        ref_what: str,
        **extra: Any,
    ) -> None:
        """A row of `loaded` against `quiet` calls (not paired: the ratio is of medians),
        with the p99s and their ratio."""
        row = compare(what, loaded, quiet, ref_what, **extra)
        row["paired_ratio"] = float("nan")  # taken in blocks, not side by side
        row["p99_ratio"] = row["ours"]["p99"] / row["ref"]["p99"]
        self.results[key] = row

    async def phase_flood(self) -> None:
        """Issue 22: one sandbox floods its own egress proxy; another session's warm calls
        are timed during the flood and, as the comparator, in equal time without it (half
        before, half after). The server's log is measured around the flood. The control: the
        same calls while a sandbox only burns the CPU it may use (what of the lift is the
        machine's CPU, not the proxy)."""
        assert self.main is not None
        main, seconds = self.main, self.args.flood_seconds
        self.log(
            f"flood: {seconds:g} s of {FLOOD_HOLDERS} connections + {FLOOD_BAD_THREADS} "
            "bad-request threads from one sandbox to its own proxy"
        )
        async with contextlib.AsyncExitStack() as stack:
            flooder, flood_sid, _ = await self.modern(stack, main)
            victim, sid, _ = await self.modern(stack, main)

            async def load(script: str, session: str) -> tuple[list[float], dict[str, Any]]:
                """The victim's calls while `script` runs in the sandbox of `session`."""
                arguments = {
                    "command": f"python3 -c {shlex.quote(script)} {seconds:g} {FLOOD_HOLDERS} "
                    f"{FLOOD_BAD_THREADS}",
                    "session_id": session,
                    "timeout": seconds + 60,
                }
                running = asyncio.ensure_future(flooder.call_tool("shell_exec", arguments))
                await asyncio.sleep(1.0)  # under way: its threads started
                samples = await self.warm_trues(victim, sid, 0, until=running)
                return samples, ok(await running)

            await self.warm_trues(victim, sid, 1.0)  # warm-up, not counted
            quiet = await self.warm_trues(victim, sid, seconds / 2)
            log_before = main.log_path.stat().st_size
            cpu_before, wall_before = cpu_seconds(main.pid), time.perf_counter()
            loaded, data = await load(FLOOD_SCRIPT, flood_sid)
            cpu_share = (cpu_seconds(main.pid) - cpu_before) / (time.perf_counter() - wall_before)
            log_after_flood = main.log_path.stat().st_size
            # Ending the flooding session closes its refusal log: its last count is logged.
            await flooder.call_tool("end_session", {"session_id": flood_sid})
            await asyncio.sleep(0.5)
            log_after = main.log_path.stat().st_size
            # The control: a sandbox that only burns its CPU share (--cpus), no proxy.
            burn_sid = structured(await flooder.call_tool("create_session", {}))["session_id"]
            ok(await flooder.call_tool("shell_exec", {"command": "true", "session_id": burn_sid}))
            cpu_before, wall_before = cpu_seconds(main.pid), time.perf_counter()
            burning, _ = await load(BURN_SCRIPT, burn_sid)
            burn_cpu = (cpu_seconds(main.pid) - cpu_before) / (time.perf_counter() - wall_before)
            await flooder.call_tool("end_session", {"session_id": burn_sid})
            quiet += await self.warm_trues(victim, sid, seconds / 2)
            await victim.call_tool("end_session", {"session_id": sid})
        with main.log_path.open("rb") as f:
            f.seek(log_before)
            grown = f.read(log_after - log_before).decode(errors="replace").splitlines()
        egress = [line for line in grown if "egress" in line or "connections at once" in line]
        answers = json.loads(data["output"].strip().splitlines()[-1])
        self.samples["flood"] = {"loaded": loaded, "quiet": quiet, "cpu_only": burning}
        self.loaded_row(
            "flood",
            f"another session's warm shell_exec('true') during one sandbox's {seconds:g} s "
            "flood of its own proxy",
            loaded, quiet, "the same session's calls without the flood (same run)",
            flood_answers=answers,
            server_cpu_share_during_flood=round(cpu_share, 3),
            log_bytes_during_flood=log_after_flood - log_before,
        )  # fmt: skip
        self.loaded_row(
            "flood.cpu_only",
            f"the same calls while one sandbox only burns its CPU share for {seconds:g} s "
            "(the control: no proxy)",
            burning, quiet, "the same session's calls without load (same run)",
            server_cpu_share=round(burn_cpu, 3),
        )  # fmt: skip
        self.results["flood.log"] = {
            "what": "MB the server's log grew from the flood's start to the end of its "
            "session, 0.5 s later (every line: the other session's audit lines included)",
            "ratio": (log_after - log_before) / 1e6,
            "log_bytes": log_after - log_before,
            "log_lines": len(grown),
            "egress_lines": len(egress),
            "egress_bytes": sum(len(line) + 1 for line in egress),
        }

    async def phase_slots(self) -> None:
        """Issue 22: SLOT_SESSIONS sessions, SLOT_LOOPS `sleep 1` loops each, keep every
        server-wide exec slot busy; an idle session's warm calls are timed meanwhile and,
        as the comparator, in equal time with the slots free (half before, half after)."""
        assert self.main is not None
        main, seconds = self.main, self.args.slots_seconds
        self.log(
            f"slots: {SLOT_SESSIONS} sessions x {SLOT_LOOPS} `sleep 1` loops for {seconds:g} s, "
            "and an idle session"
        )
        async with contextlib.AsyncExitStack() as stack:
            busy = [await self.modern(stack, main) for _ in range(SLOT_SESSIONS)]
            idle, sid, _ = await self.modern(stack, main)
            await self.warm_trues(idle, sid, 1.0)  # warm-up, not counted
            quiet = await self.warm_trues(idle, sid, seconds / 2)
            stop = asyncio.Event()
            sleeps: list[float] = []

            async def sleeper(session: str, delay: float) -> None:
                async with Client(main.url) as client:
                    await asyncio.sleep(delay)
                    arguments = {"command": "sleep 1", "session_id": session}
                    while not stop.is_set():
                        ok(await client.call_tool("shell_exec", arguments))
                        sleeps.append(time.perf_counter())

            loops = [
                asyncio.ensure_future(sleeper(s, random.uniform(0, 1)))
                for _, s, _ in busy
                for _ in range(SLOT_LOOPS)
            ]
            try:
                await asyncio.sleep(2.0)  # every loop started: the slots are full
                log_from = main.log_path.stat().st_size
                started = time.perf_counter()
                loaded = await self.warm_trues(idle, sid, seconds)
                ended = time.perf_counter()
                log_to = main.log_path.stat().st_size
            finally:
                stop.set()
                await asyncio.gather(*loops)
            quiet += await self.warm_trues(idle, sid, seconds / 2)
            for client, session, _ in [*busy, (idle, sid, "")]:
                await client.call_tool("end_session", {"session_id": session})
        done = sum(1 for t in sleeps if started <= t <= ended)
        # The idle session's own slot waits, from the server's audit trail: its calls are
        # the only `true` ones meanwhile (the others run `sleep 1`).
        with main.log_path.open("rb") as f:
            f.seek(log_from)
            window = f.read(log_to - log_from).decode(errors="replace").splitlines()
        waits = [w for line in window if (w := idle_queue_wait(line)) is not None]
        if not waits:
            example = next((line for line in window if "shell_exec" in line), "(none)")
            self.log(f"slots: no queue_wait of the idle session's calls in the log: {example}")
        self.samples["slots"] = {"loaded": loaded, "quiet": quiet, "idle_queue_waits": waits}
        self.loaded_row(
            "slots",
            f"an idle session's warm shell_exec('true') while {SLOT_SESSIONS} sessions x "
            f"{SLOT_LOOPS} `sleep 1` loops fill the server-wide exec slots",
            loaded, quiet, "the same session's calls with the slots free (same run)",
            sleeps_per_s=round(done / (ended - started), 2),
            idle_queue_wait=summary(waits),
        )  # fmt: skip

    # driver --------------------------------------------------------------------------------

    async def run_phases(self) -> None:
        for phase in self.args.only:
            started = time.perf_counter()
            await getattr(self, f"phase_{phase}")()
            self.log(f"  {phase} took {time.perf_counter() - started:.1f} s")

    def run(self) -> dict[str, Any]:
        machine = describe_machine()
        started = time.time()
        try:
            self.main = self.server("--warm-pool", str(POOL))
            asyncio.run(self.run_phases())
        finally:
            for server in self.servers:
                server.stop()
            leftovers = [c["Id"] for s in self.servers for c in containers_of(s.instance)]
            leftovers += [c["Id"] for c in containers_with(f"bench.run={self.run_id}")]
            remove_containers(leftovers)
            shutil.rmtree(self.tmp, ignore_errors=True)
        machine["loadavg_end"] = os.getloadavg()
        machine["other_containers_end"] = count_running_containers()
        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": machine,
            "config": {k: v for k, v in vars(self.args).items() if k not in ("json", "show")},
            "image": self.settings.image,
            "leftover_containers_removed": len(leftovers),
            "results": self.results,
            "targets": check_targets(self.results),
            "samples": self.samples,
        }


# --- reporting --------------------------------------------------------------------------------


def count_running_containers() -> int:
    """Running containers on this Podman (ours are gone by then): how busy it was."""
    return len([c for c in json.loads(podman("ps", "--format", "json").stdout or "[]") or []])


def describe_machine() -> dict[str, Any]:
    mem = next(
        (int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
         if line.startswith("MemTotal:")), 0,
    )  # fmt: skip
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "",
    )  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_mib": mem // 1024,
        "kernel": platform.release(),
        "podman": podman("version", "--format", "{{.Client.Version}}", check=False).stdout.strip(),
        "oci_runtime": podman(
            "info", "--format", "{{.Host.OCIRuntime.Name}}", check=False
        ).stdout.strip(),
        "python": platform.python_version(),
        "fastmcp": pkg_version("fastmcp"),
        "loadavg_start": os.getloadavg(),
        "other_containers_start": count_running_containers(),
    }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, (op, bound) in TARGETS.items():
        if key in results:
            ratio = results[key]["ratio"]
            met = ratio <= bound if op == "<=" else ratio >= bound
            out.append({"result": key, "ratio": ratio, "target": f"{op} {bound:g}", "met": met})
    return out


def table(report: dict[str, Any], markdown: bool = False) -> str:
    results = report["results"]
    goals = {t["result"]: t for t in report["targets"]}
    rows = [("measurement", "median", "p10-p90", "vs median", "ratio", "target")]

    def fmt(x: float, unit: str | None) -> str:
        if unit == "calls/s":
            return f"{x:.1f}/s"
        return f"{x:.0f} MB/s" if unit == "MB/s" else f"{1000 * x:.1f} ms"

    for key, r in results.items():
        if "ours" not in r:
            continue
        unit, o = r.get("unit"), r["ours"]
        spread = f"{fmt(o['p10'], unit)}-{fmt(o['p90'], unit)}"
        if "ref" not in r:
            rows.append((key, fmt(o["median"], unit), spread, "", "", ""))
            continue
        goal = goals.get(key)
        verdict = f"{goal['target']} {'MET' if goal['met'] else 'MISSED'}" if goal else ""
        ref = fmt(r["ref"]["median"], unit)
        rows.append((key, fmt(o["median"], unit), spread, ref, f"{r['ratio']:.3f}", verdict))
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
    for kind in ("legacy", "modern"):
        if f"warm.{kind}" in results:
            cpu = results[f"warm.{kind}"]["server_cpu_ms_per_call"]
            lines.append(f"server CPU per warm {kind} call: {cpu} ms")
    for grace in (0, 1):
        if (r := results.get(f"kill.grace{grace}")) is not None:
            lines.append(
                f"kill_grace {grace}: result notes {r['result_notes']}; "
                f"processes left after: {r['processes_left_after']}"
            )
    for key in ("flood", "flood.cpu_only", "slots"):
        if (r := results.get(key)) is not None:
            ours, ref = r["ours"], r["ref"]
            lines.append(
                f"{key}: p99 {1000 * ours['p99']:.1f} ms against {1000 * ref['p99']:.1f} ms "
                f"({r['p99_ratio']:.2f}x); {ours['n']} loaded / {ref['n']} quiet calls"
            )
    if (r := results.get("flood")) is not None:
        log_row = results["flood.log"]
        goal = goals.get("flood.log")
        verdict = (
            f" (target {goal['target']} MB {'MET' if goal['met'] else 'MISSED'})" if goal else ""
        )
        lines.append(
            f"flood: server log +{log_row['log_bytes']} bytes{verdict} "
            f"({log_row['log_lines']} lines, "
            f"{log_row['egress_lines']} of them egress, {log_row['egress_bytes']} bytes); server "
            f"CPU {100 * r['server_cpu_share_during_flood']:.0f} % of a core; the flood's "
            f"answers {r['flood_answers']}"
        )
    if (r := results.get("slots")) is not None:
        q = r["idle_queue_wait"]
        lines.append(
            f"slots: `sleep 1` calls finished per second meanwhile: {r['sleeps_per_s']}; the "
            f"idle session's wait for a slot (audit queue_wait, {q['n']} calls): median "
            f"{1000 * q['median']:.1f} ms, p99 {1000 * q['p99']:.1f} ms, "
            f"max {1000 * q['max']:.1f} ms"
        )
    if "agent" in results:
        a = results["agent"]
        names = ", ".join(f"{p['pid']}:{p['name']}" for p in a["processes"])
        lines.append(
            f"agent: serve RSS {a['agent_serve_rss_kib']} KiB, init (PID 1) RSS "
            f"{a['agent_init_rss_kib']} KiB; idle sandbox pids: {a['idle_pids']} ({names})"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (CI smoke run)")
    parser.add_argument("--reps", type=int, help="warm repetitions (default 60)")
    parser.add_argument("--first-reps", type=int, help="first-call repetitions (default 10)")
    parser.add_argument("--tp-reps", type=int, help="throughput repetitions (default 5)")
    parser.add_argument("--sessions", type=int, default=16, help="throughput sessions (16)")
    parser.add_argument("--calls", type=int, help="sequential calls per session (default 4)")
    parser.add_argument("--large-reps", type=int, help="10 MB repetitions (default 9)")
    parser.add_argument("--kill-reps", type=int, help="timeout kills per grace (default 5)")
    parser.add_argument("--download-reps", type=int, help="100 MB downloads per mode (default 5)")
    parser.add_argument(
        "--only", type=lambda s: [x for x in s.split(",") if x], default=list(PHASES),
        help=f"comma-separated phases out of {','.join(PHASES)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--flood-seconds", type=float, help="flood length (default 20)")
    parser.add_argument("--slots-seconds", type=float, help="busy-slots length (default 20)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--show", type=Path, help="print the table of an earlier run's JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", type=Path, help="write the whole report (JSON) here")
    args = parser.parse_args(argv)
    defaults = {
        "reps": (8, 60), "first_reps": (2, 10), "tp_reps": (1, 5), "calls": (2, 4),
        "large_reps": (2, 9), "kill_reps": (1, 5), "download_reps": (1, 5),
        "flood_seconds": (4.0, 20.0), "slots_seconds": (4.0, 20.0),
    }  # fmt: skip
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for phase in args.only:
        if phase not in PHASES:
            parser.error(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show:
        print(table(json.loads(args.show.read_text()), args.markdown))
        return 0
    if args.seed is not None:
        random.seed(args.seed)
    report = Bench(args).run()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report, args.markdown))
    m = report["machine"]
    print(
        f"\n{m['cpus']} cpus, kernel {m['kernel']}, podman {m['podman']} ({m['oci_runtime']}); "
        f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; other running "
        f"containers {m['other_containers_start']} -> {m['other_containers_end']}; "
        f"{report['duration_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
