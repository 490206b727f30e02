"""Log lines at a bounded rate: events that a sandbox can repeat as fast as it likes
(proxy refusals, connections past a cap) are logged as the first of each interval and a
count of the rest, so one source adds at most two bounded lines per interval to the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# What one logged line may say of the event (the rest is cut).
MAX_LINE = 300


class RateLimitedLog:
    """The events of one source: the first of each interval is logged as it is; the others
    are counted, and the count is logged with the next event after the interval (or at
    `close`)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.interval, self.clock = logger, interval, clock
        self._since: float | None = None
        self._counted = 0
        self._count_line = ""
        self._level = logging.INFO

    def note(self, line: str, count_line: str, level: int = logging.INFO) -> None:
        """One event: `line` if it is the first of its interval, else counted.
        `count_line` says how many more there were: `{n}` and `{seconds}` in it are
        filled in."""
        now = self.clock()
        self._count_line, self._level = count_line, level
        if self._since is not None and now - self._since < self.interval:
            self._counted += 1
            return
        self._flush(now)
        self._since = now
        self.logger.log(level, "%s", line[:MAX_LINE])

    def _flush(self, now: float) -> None:
        if self._counted and self._since is not None:
            self.logger.log(
                self._level,
                "%s",
                self._count_line.format(n=self._counted, seconds=f"{now - self._since:.0f}"),
            )
        self._counted = 0

    def close(self) -> None:
        """Log what is still counted (the source is gone)."""
        self._flush(self.clock())
