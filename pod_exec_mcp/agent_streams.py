"""Host side of the agent's multiplexed byte streams (docs/agent-protocol.md, "Streams").

In network mode isolated the agent listens on 127.0.0.1:3128 inside the sandbox; each TCP
connection accepted there becomes one stream over the agent's stdio channel, handed to a
handler on this side (the egress proxy, proxy.py) as an `AgentStream`, a `ByteStream`.

Flow control is per stream and per direction: a sender may have at most `window` bytes
that the receiver has not credited back (STREAM_CREDIT). The agent credits bytes once it
has written them to the socket; this side once the handler has read them. So one slow
stream never blocks the channel (frames of every stream are always read at once) and never
holds more than `window` bytes on either side.

Where the channel has a pass socket (local Podman, runc), a stream can be spliced
(`AgentStream.splice`): the proxy hands the agent its connection to the destination, and
the agent copies between the two sockets itself, so a download's bytes never pass through
this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

from pod_exec_mcp.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

HEADER = struct.Struct(">BBHII")
# Host to agent.
(
    T_LISTEN,
    T_STREAM_DATA,
    T_STREAM_END,
    T_STREAM_CREDIT,
    T_STREAM_RESET,
    T_SPLICE,
    T_SPLICE_GO,
) = range(0x10, 0x17)
# Agent to host.
(
    T_STREAM_OPEN,
    T_STREAM_DATA_IN,
    T_STREAM_END_IN,
    T_STREAM_CREDIT_IN,
    T_STREAM_RESET_IN,
    T_LISTENING,
    T_SPLICED,
    T_SPLICE_END,
) = range(0x90, 0x98)
STREAM_FRAMES = frozenset(range(0x90, 0x98))
SPLICE_ONE_REQUEST = 1
UNLIMITED = 2**64 - 1

# Per stream: what the agent may buffer of ours (downloads: large, for throughput; the
# memory is the sandbox's), and what we buffer of the agent's (uploads: the server's memory,
# so smaller).
WINDOW_TO_AGENT = 1024 * 1024
WINDOW_TO_HOST = 256 * 1024
DATA_CHUNK = 256 * 1024
# Streams open at once per channel on this side; more are reset (bounds memory:
# MAX_STREAMS * WINDOW_TO_HOST per sandbox).
MAX_STREAMS = 32
# How long a closed stream waits for the sandbox's client to finish before it is reset.
LINGER = 10.0
# Streams past MAX_STREAMS are reset this long after they open, together, not at once:
# until then each holds a place in the agent's own table of streams (agent.h MAX_STREAMS,
# 128), and while that is full the agent accepts nothing (the sandbox's next connections
# wait in its listen backlog). A sandbox that reconnects as fast as it can thus opens at
# most about one table of streams per interval here, not thousands a second.
OVER_CAP_RESET_DELAY = 0.5
# Resets held back at most; past it they go at once (only a forged agent gets there).
MAX_HELD_RESETS = 256

# Sends a frame: its header (or the whole frame) and, optionally, the rest of it.
Sender = Callable[[bytes, bytes | memoryview], Awaitable[None]]
StreamHandler = Callable[["AgentStream"], Awaitable[None]]


def frame(ftype: int, fid: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, 0, 0, fid, len(payload)) + payload


class AgentStream:
    """One connection accepted by the agent in the sandbox (a proxy.ByteStream)."""

    def __init__(self, mux: StreamMux, stream_id: int, send_window: int, window: int) -> None:
        self.id = stream_id
        self._mux = mux
        self._window = window  # what we receive before crediting
        self._buf = bytearray()
        self._eof = False  # the agent sent END: the client will send nothing more
        self._reset: str | None = None
        self._readable = asyncio.Event()
        self._credit = send_window  # bytes we may still send
        self._credited = asyncio.Event()
        self._consumed = 0  # bytes read here and not yet credited to the agent
        self._ended = False  # we sent END
        self._closed = False
        # Splice: the agent's answer to SPLICE (True: it took the socket), then the end of
        # the exchange it copies (bytes to the destination, bytes to the client).
        self._spliced: asyncio.Future[bool] | None = None
        self._splice_end: asyncio.Future[tuple[int, int]] | None = None

    # --- from the channel's reader (synchronous, never blocks) ---

    def _on_data(self, data: bytes) -> None:
        if self._reset is not None:
            return
        if len(self._buf) + len(data) > self._window:
            self._on_reset("the agent sent more than its window")
            self._mux.send_soon(frame(T_STREAM_RESET, self.id, b"window exceeded"))
            return
        self._buf += data
        self._readable.set()

    def _on_end(self) -> None:
        self._eof = True
        self._readable.set()

    def _on_credit(self, n: int) -> None:
        self._credit += n
        self._credited.set()

    def _on_reset(self, why: str) -> None:
        if self._reset is None:
            self._reset = why or "reset"
        self._readable.set()
        self._credited.set()
        error = ConnectionResetError(f"the sandbox's connection was reset: {self._reset}")
        for waiter in (self._spliced, self._splice_end):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved here: nobody may be waiting any more

    def _on_spliced(self, payload: bytes) -> None:
        if self._spliced is not None and not self._spliced.done() and len(payload) >= 4:
            status = struct.unpack(">I", payload[:4])[0]
            if status != 0:
                log.debug("splice refused by the agent: %s", payload[4:].decode(errors="replace"))
            self._spliced.set_result(status == 0)

    def _on_splice_end(self, payload: bytes) -> None:
        if self._splice_end is not None and not self._splice_end.done() and len(payload) == 16:
            up, down = struct.unpack(">QQ", payload)
            self._splice_end.set_result((up, down))

    # --- the ByteStream interface ---

    async def read(self, n: int) -> bytes:
        while not self._buf and not self._eof and self._reset is None:
            self._readable.clear()
            await self._readable.wait()
        if self._buf:
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self._consumed += len(data)
            if self._consumed >= self._window // 4 or not self._buf:
                credit, self._consumed = self._consumed, 0
                if self._reset is None and not self._eof:
                    await self._mux.send(frame(T_STREAM_CREDIT, self.id, struct.pack(">I", credit)))
            return data
        if self._reset is not None:
            raise ConnectionResetError(f"the sandbox's connection was reset: {self._reset}")
        return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self._credit <= 0 and self._reset is None:
                self._credited.clear()
                await self._credited.wait()
            if self._reset is not None:
                raise ConnectionResetError(f"the sandbox's connection was reset: {self._reset}")
            if self._ended:
                raise ConnectionError("write after end of stream")
            size = min(len(view), self._credit, DATA_CHUNK)
            self._credit -= size
            header = HEADER.pack(T_STREAM_DATA, 0, 0, self.id, size)
            await self._mux.send(header, view[:size])  # no copy of the data here
            view = view[size:]

    async def write_eof(self) -> None:
        if not self._ended and self._reset is None:
            self._ended = True
            await self._mux.send(frame(T_STREAM_END, self.id))

    async def splice(
        self, upstream: socket.socket, first: bytes, limit: int | None, one_request: bool
    ) -> tuple[int, int] | None:
        """Hand `upstream` (connected, nothing read from it yet) to the agent, which copies
        between it and the client itself: `first`, then at most `limit` more bytes of the
        client's (None: all of them, then its EOF) go to upstream, and upstream's bytes to
        the client; with `one_request` the end of upstream's answer ends the exchange.
        Returns when the exchange is over, with the bytes each way (to upstream, to the
        client). None, with nothing sent, where the agent cannot take the socket (no pass
        socket, an agent without splice): the caller relays instead.

        The agent stops reading the client when it takes the socket; what the client sent
        before that is here (frames are ordered), and goes to upstream from here before
        GO lets the agent send the rest."""
        if self._reset is not None or self._spliced is not None:
            return None
        loop = asyncio.get_running_loop()
        if not self._mux.pass_fd(self.id, upstream.fileno()):
            return None
        self._spliced = loop.create_future()
        self._splice_end = loop.create_future()
        flags = SPLICE_ONE_REQUEST if one_request else 0
        await self._mux.send(frame(T_SPLICE, self.id, struct.pack(">I", flags)))
        if not await self._spliced:
            self._spliced = self._splice_end = None
            return None
        held = bytes(self._buf)
        self._buf.clear()
        if limit is not None:
            held = held[:limit]
            limit -= len(held)
        if first or held:
            await loop.sock_sendall(upstream, first + held)
        budget = UNLIMITED if limit is None else limit
        await self._mux.send(frame(T_SPLICE_GO, self.id, struct.pack(">Q", budget)))
        return await self._splice_end

    async def close(self) -> None:
        """End our side, let the client finish (reading and discarding what it still
        sends) for up to LINGER seconds, then reset whatever is left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._spliced is not None:  # the agent freed the stream when it ended or reset it
            if self._reset is None and not (self._splice_end and self._splice_end.done()):
                self._reset = "closed"  # given up on (cancelled) while spliced
                self._mux.send_soon(frame(T_STREAM_RESET, self.id, b"closed by the host"))
            self._mux.forget(self.id)
            return
        try:
            if self._reset is None:
                await self.write_eof()
                async with asyncio.timeout(LINGER):
                    while await self.read(DATA_CHUNK):
                        pass
        except (TimeoutError, ConnectionError):
            pass
        finally:
            if self._reset is None and not self._eof:
                self._reset = "closed"
                self._mux.send_soon(frame(T_STREAM_RESET, self.id, b"closed by the host"))
            self._mux.forget(self.id)


class StreamMux:
    """The streams of one agent channel."""

    def __init__(
        self,
        send: Sender,
        handler: StreamHandler | None,
        window: int = WINDOW_TO_HOST,
        send_window: int = WINDOW_TO_AGENT,
        pass_socket: socket.socket | None = None,
    ) -> None:
        self._send = send
        # Where descriptors go to the agent for SPLICE (a SOCK_SEQPACKET socketpair's end);
        # None: streams are relayed through this process.
        self.pass_socket = pass_socket
        self._handler = handler
        self.window = window
        self.send_window = send_window
        self._streams: dict[int, AgentStream] = {}
        # Streams reset past MAX_STREAMS: logged as a count per interval, not one line each.
        self.over_cap = RateLimitedLog(log)
        self._tasks: set[asyncio.Future[None]] = set()
        self._listening: dict[int, asyncio.Future[int]] = {}
        self._dead: str | None = None
        # Frames of send_soon not yet written, and the task that writes them.
        self._soon: list[bytes] = []
        self._flushing: asyncio.Future[None] | None = None
        # Resets of streams past MAX_STREAMS, held back for over_cap_delay seconds.
        self.over_cap_delay = OVER_CAP_RESET_DELAY
        self._held: list[bytes] = []
        self._held_timer: asyncio.TimerHandle | None = None

    async def send(self, data: bytes, more: bytes | memoryview = b"") -> None:
        if self._dead is not None:
            raise ConnectionResetError(f"the agent channel is gone: {self._dead}")
        try:
            await self._send(data, more)
        except Exception as exc:  # AgentError: the channel died
            raise ConnectionResetError(f"the agent channel is gone: {exc}") from None

    def send_soon(self, data: bytes) -> None:
        """Send without waiting (from synchronous code); failures are moot. The frames
        sent so within one turn of the event loop go out in order in one write: the resets
        of many connections past the cap cost one write, not a task and a write each."""
        self._soon.append(data)
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush_soon())
            self._track(self._flushing)

    async def _flush_soon(self) -> None:
        try:
            while self._soon:
                batch = b"".join(self._soon)
                self._soon.clear()
                with contextlib.suppress(Exception):
                    await self.send(batch)
        finally:
            self._flushing = None

    def _track(self, task: asyncio.Future[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def listen(self, request_id: int, address: str, port: int, timeout: float) -> int:
        """Ask the agent to listen on address:port in the sandbox; the port it listens on.
        ConnectionError if it cannot (OSError subclass, message from the agent)."""
        packed = ipaddress.IPv4Address(address).packed
        payload = packed + struct.pack(">HHII", port, 0, self.send_window, self.window)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._listening[request_id] = waiter
        try:
            await self.send(frame(T_LISTEN, request_id, payload))
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise ConnectionError("the agent did not answer LISTEN") from None
        finally:
            self._listening.pop(request_id, None)

    def pass_fd(self, stream_id: int, fd: int) -> bool:
        """Send descriptor `fd` to the agent for stream `stream_id` (before its SPLICE
        frame); False where it cannot go (no pass socket, or the socket is full)."""
        if self.pass_socket is None or self._dead is not None:
            return False
        try:
            tag = struct.pack(">I", stream_id)
            sent = socket.send_fds(self.pass_socket, [tag], [fd], socket.MSG_DONTWAIT)
        except OSError as exc:
            log.debug("cannot pass a descriptor to the agent: %s", exc)
            return False
        return sent == len(tag)

    def error(self, fid: int, message: str) -> bool:
        """An ERROR frame: True if it answers a LISTEN or a SPLICE of ours."""
        stream = self._streams.get(fid)
        if stream is not None:  # an agent without SPLICE (UNSUPPORTED): the stream goes on
            stream._on_spliced(struct.pack(">I", 1) + message.encode())
            return True
        waiter = self._listening.get(fid)
        if waiter is None:
            return False
        if not waiter.done():
            waiter.set_exception(ConnectionError(message))
        return True

    def dispatch(self, ftype: int, fid: int, payload: bytes) -> None:
        """A stream frame from the agent. Frames for streams we no longer know (a RESET
        crossed them) are dropped."""
        if ftype == T_LISTENING:
            waiter = self._listening.get(fid)
            if waiter is not None and not waiter.done() and len(payload) >= 2:
                waiter.set_result(struct.unpack(">H", payload[:2])[0])
            return
        if ftype == T_STREAM_OPEN:
            self._open(fid)
            return
        stream = self._streams.get(fid)
        if stream is None:
            return
        if ftype == T_STREAM_DATA_IN:
            stream._on_data(payload)
        elif ftype == T_STREAM_END_IN:
            stream._on_end()
        elif ftype == T_STREAM_CREDIT_IN and len(payload) == 4:
            stream._on_credit(struct.unpack(">I", payload)[0])
        elif ftype == T_STREAM_RESET_IN:
            stream._on_reset(payload.decode(errors="replace"))
            self.forget(fid)
        elif ftype == T_SPLICED:
            stream._on_spliced(payload)
        elif ftype == T_SPLICE_END:
            stream._on_splice_end(payload)
            self.forget(fid)

    def _open(self, fid: int) -> None:
        if self._handler is None or self._dead is not None or fid in self._streams:
            self.send_soon(frame(T_STREAM_RESET, fid, b"no handler"))
            return
        if len(self._streams) >= MAX_STREAMS:
            self.over_cap.note(
                f"sandbox opened over {MAX_STREAMS} connections at once; resetting",
                f"sandbox opened over {MAX_STREAMS} connections at once: {{n}} more reset "
                "in the last {seconds} s",
                logging.WARNING,
            )
            self._hold_reset(frame(T_STREAM_RESET, fid, b"too many connections"))
            return
        stream = self._streams[fid] = AgentStream(self, fid, self.send_window, self.window)
        handler = self._handler

        async def serve() -> None:
            try:
                await handler(stream)
            except Exception:
                log.exception("stream handler failed")
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()

        self._track(asyncio.ensure_future(serve()))

    def _hold_reset(self, reset: bytes) -> None:
        """Reset a stream past the cap once over_cap_delay is over (OVER_CAP_RESET_DELAY)."""
        self._held.append(reset)
        if self.over_cap_delay <= 0 or len(self._held) >= MAX_HELD_RESETS:
            self._release_held()
        elif self._held_timer is None:
            loop = asyncio.get_running_loop()
            self._held_timer = loop.call_later(self.over_cap_delay, self._release_held)

    def _release_held(self) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self._held = self._held, []
        for reset in held:
            self.send_soon(reset)  # one write for all of them

    def forget(self, fid: int) -> None:
        self._streams.pop(fid, None)

    def fail(self, why: str) -> None:
        """The channel is gone: every stream is reset, every LISTEN fails."""
        if self._dead is None:
            self._dead = why
        if self._held_timer is not None:  # the held resets are moot: the channel is gone
            self._held_timer.cancel()
            self._held_timer = None
        self._held.clear()
        for stream in list(self._streams.values()):
            stream._on_reset(why)
        self._streams.clear()
        for waiter in self._listening.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError(why))

    async def close(self) -> None:
        self.fail("closed")
        if self.pass_socket is not None:
            self.pass_socket.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def open_streams(self) -> int:
        return len(self._streams)
