"""Liveness and readiness, as /healthz and /readyz answer them."""

from __future__ import annotations

import asyncio
import logging
import time

from pod_exec_mcp.podman import Podman, PodmanError

log = logging.getLogger(__name__)

# A probe every second must not mean a podman invocation every second.
READY_CACHE_SECONDS = 5.0
# A podman that does not answer within this is as good as down.
READY_CHECK_TIMEOUT = 10.0


class Readiness:
    """Ready means: podman answers, and the sandbox image is in its storage. Checked at most
    every `ttl` seconds (concurrent probes share one check); the reason for a failure goes
    to the log, never into the HTTP answer."""

    def __init__(self, podman: Podman, image: str, ttl: float = READY_CACHE_SECONDS) -> None:
        self.podman = podman
        self.image = image
        self.ttl = ttl
        self._lock = asyncio.Lock()
        self._checked_at: float | None = None
        self._ready = False

    async def check(self) -> bool:
        async with self._lock:
            now = time.monotonic()
            if self._checked_at is not None and now - self._checked_at < self.ttl:
                return self._ready
            problem = await self._problem()
            ready = problem is None
            if ready != self._ready or self._checked_at is None:
                if ready:
                    log.info("ready: podman answers and image %s exists", self.image)
                else:
                    log.warning("not ready: %s", problem)
            self._ready, self._checked_at = ready, time.monotonic()
            return ready

    async def _problem(self) -> str | None:
        try:
            exists = await asyncio.wait_for(
                self.podman.image_exists(self.image), READY_CHECK_TIMEOUT
            )
        except TimeoutError:
            return f"podman did not answer within {READY_CHECK_TIMEOUT:g} s"
        except (PodmanError, OSError) as exc:
            return f"podman failed: {exc}"
        return None if exists else f"image {self.image} is not in podman's storage"
