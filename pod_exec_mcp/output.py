"""Bounded command output that keeps both the head and the tail."""

from __future__ import annotations


def notice(output: str, message: str) -> str:
    """A marker line of ours, to append after `output`: on a line of its own."""
    newline = "\n" if output and not output.endswith("\n") else ""
    return f"{newline}[pod_exec_mcp: {message}]"


class BoundedOutput:
    """Collects a byte stream, keeping at most `limit` bytes: the first half and the last half.

    The tail matters most to agents (the error at the end of a build log), the head gives
    context; what is cut from the middle is counted and said.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            # Trim lazily so that many small chunks cost amortised O(1) each.
            if len(self._tail) > 2 * self._tail_limit:
                del self._tail[: len(self._tail) - self._tail_limit]

    @property
    def held(self) -> int:
        """Bytes held in memory now."""
        return len(self._head) + len(self._tail)

    def compact(self) -> None:
        """Give back what the lazy trimming keeps beyond the limit: for output that will
        wait a long time, unread (a finished job's)."""
        self._tail = bytearray(self._tail[-self._tail_limit :])

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(
        self,
        whole_output_in: str | None = None,
        whole_output_lost: bool = False,
        file_keeps: int | None = None,
    ) -> str:
        """The kept output as text; invalid UTF-8 becomes U+FFFD, never an exception.
        `whole_output_in` names the file that holds every byte, for the marker line;
        `whole_output_lost` says that keeping every byte in such a file failed;
        `file_keeps`: that file keeps only this many bytes, its head and its tail."""
        if not self.truncated:
            return (bytes(self._head) + bytes(self._tail)).decode("utf-8", "replace")
        tail = bytes(self._tail[-self._tail_limit :])
        omitted = self.total - len(self._head) - len(tail)
        kept_in = f"; the whole output is in {whole_output_in}" if whole_output_in else ""
        if whole_output_in and file_keeps is not None:
            kept_in = (
                f"; {whole_output_in} keeps its first {file_keeps // 2} and last "
                f"{file_keeps - file_keeps // 2} bytes (the sandbox's bound on such files)"
            )
        if whole_output_lost:
            kept_in = (
                "; the whole output could not be kept in a file in the sandbox (its disk is "
                "full or the output directory is not writable), so the omitted bytes are lost"
            )
        marker = (
            f"\n[pod_exec_mcp: {omitted} bytes of output omitted here; "
            f"{self.total} bytes in all, first {len(self._head)} and last {len(tail)} kept"
            f"{kept_in}]\n"
        )
        head = bytes(self._head).decode("utf-8", "replace")
        return head + marker + tail.decode("utf-8", "replace")
