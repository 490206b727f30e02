"""Run the real pod_exec_mcp server with `Sandbox.execute` timed, for bench/run.py.

Nothing in the package is changed: this wraps `Sandbox.execute` at start-up (a clock read
and a list append per call) and, when the server exits, writes one (wall-clock start,
seconds) pair per command to the file named by BENCH_EXEC_TIMES. The benchmark pairs them
with its own client-side timings, which splits a call into "our exec path" and
"everything else" (fastmcp client, HTTP, fastmcp server, tool glue) without guessing.

    python bench/serve_instrumented.py --port 8000     # same flags as pod_exec_mcp
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time

import pod_exec_mcp.cli as cli
import pod_exec_mcp.podman_engine as podman_engine

_times: list[tuple[float, float]] = []
_execute = podman_engine.PodmanEngine.run


async def _timed_execute(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    wall, started = time.time(), time.perf_counter()
    try:
        return await _execute(self, *args, **kwargs)
    finally:
        _times.append((wall, time.perf_counter() - started))


def _dump() -> None:
    path = os.environ.get("BENCH_EXEC_TIMES")
    if path:
        with open(path, "w") as out:
            json.dump(_times, out)


if __name__ == "__main__":
    podman_engine.PodmanEngine.run = _timed_execute  # type: ignore[method-assign]
    atexit.register(_dump)
    sys.exit(cli.main(sys.argv[1:]))
