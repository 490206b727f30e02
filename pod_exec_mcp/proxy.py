"""The HTTP(S) egress proxy of isolated sandboxes, over any byte stream.

Each connection a sandbox opens to its proxy (127.0.0.1:3128 inside it) reaches this module
as a `ByteStream` (an agent stream, or a socket in tests). `serve_connection` reads one
request head and:
- `CONNECT host:port` (HTTPS, and any other TCP): checks the policy, resolves the name on
  this host, checks every address, connects to an allowed one, answers 200 and relays bytes
  both ways (TLS stays end to end);
- `GET http://host/...` (absolute form, plain HTTP): the same checks, then forwards the
  request in origin form with `Host` the URI's authority and `Connection: close`, and
  relays the response.
The head is parsed by h11 (a strict HTTP/1.1 parser), and any framing that two parsers
could read differently is a 400 before anything is resolved (`_strict_lines`,
`_framing`); exactly one request's bytes go on, its declared body and nothing after it.
A refusal is an HTTP 403 whose body (and reason phrase) names the rule, sent before any
connection is made; every other failure is a 4xx/5xx with a message. A request head must
arrive whole within a bound (`head_timeout`, the setting egress_head_timeout): one sent
slowly, a byte at a time, gets 408 and the connection is closed, before anything is
resolved.

Once the request is checked and the connection made, a client that can (`Splicer`: an
agent stream with a pass socket) takes the connection over and copies the exchange itself,
within the same bounds (the request's body length, one request); others, and a chunked
body (framed here, `relay_chunked`), are relayed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import h11

from pod_exec_mcp.egress import Decision, EgressPolicy, HostError, IPAddress, parse_host
from pod_exec_mcp.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
# The default bound on the time a request head may take to arrive (egress_head_timeout).
HEAD_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
CHUNK = 256 * 1024
# A connection past its sandbox's bounds (ConnectionGate) is answered this long after it
# opens, and keeps its place (an agent stream) meanwhile: a sandbox that reconnects as
# fast as it can is then refused a few dozen times a second, not thousands (a measured
# flood: 2,500 refusals a second and a third of a core here; issue 22).
REFUSAL_DELAY = 0.5

# Headers meant for one hop only: never forwarded to the origin.
_HOP_BY_HOP = {
    "connection", "proxy-connection", "keep-alive", "proxy-authorization",
    "proxy-authenticate", "te", "trailer", "upgrade",
}  # fmt: skip


class ByteStream(Protocol):
    """A bidirectional byte stream (TCP-like, with half-close)."""

    async def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at end of stream."""
        ...

    async def write(self, data: bytes) -> None:
        """Send all of data (waits for the peer to take it: flow control)."""
        ...

    async def write_eof(self) -> None:
        """No more data from this side (half-close)."""
        ...

    async def close(self) -> None:
        """Release the stream, after what was written is delivered where possible."""
        ...


class SocketStream:
    """A ByteStream over an asyncio connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, n: int) -> bytes:
        return await self.reader.read(n)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def write_eof(self) -> None:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@runtime_checkable
class Splicer(Protocol):
    """A client stream that can take over the connection to the destination and copy the
    exchange itself (agent_streams.AgentStream.splice has the contract)."""

    async def splice(
        self, upstream: socket.socket, first: bytes, limit: int | None, one_request: bool
    ) -> tuple[int, int] | None: ...


class TcpStream:
    """A ByteStream over a connected TCP socket. Nothing reads the socket before the first
    read or write here, so until then it can still be handed over whole (`unused_socket`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._stream: SocketStream | None = None
        self._opening = asyncio.Lock()

    async def _opened(self) -> SocketStream:
        async with self._opening:
            if self._stream is None:
                reader, writer = await asyncio.open_connection(sock=self.sock, limit=CHUNK * 4)
                self._stream = SocketStream(reader, writer)
        return self._stream

    def unused_socket(self) -> socket.socket | None:
        return self.sock if self._stream is None else None

    async def read(self, n: int) -> bytes:
        return await (await self._opened()).read(n)

    async def write(self, data: bytes) -> None:
        await (await self._opened()).write(data)

    async def write_eof(self) -> None:
        await (await self._opened()).write_eof()

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        else:
            self.sock.close()


Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
Connector = Callable[[IPAddress, int], Awaitable[ByteStream]]


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address of `host`, resolved once, on this machine."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    seen: list[IPAddress] = []
    for _, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in seen:
            seen.append(address)
    return seen


async def connect(address: IPAddress, port: int) -> ByteStream:
    """A TCP connection to exactly this (checked) address."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
    except BaseException:
        sock.close()
        raise
    return TcpStream(sock)


class RefusalLog(RateLimitedLog):
    """One sandbox's proxy refusals, logged at a bounded rate (ratelog.py)."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(log, interval, clock)

    def refused(self, label: str, message: str) -> None:
        self.note(
            f"egress refused{label}: {message.strip()}",
            f"egress refused{label}: {{n}} more refused requests in the last {{seconds}} s",
        )


class ConnectionGate:
    """One sandbox's bounds on its proxy connections: at most `max_open` at once, and new
    ones at `per_second` on average (a token bucket that holds `per_second`, so a burst of
    that many passes). A connection past either gets an answer naming the bound, before
    anything of it is read, after `refusal_delay` seconds (REFUSAL_DELAY)."""

    def __init__(
        self,
        max_open: int,
        per_second: float,
        clock: Callable[[], float] = time.monotonic,
        refusal_delay: float | None = None,
    ) -> None:
        self.max_open, self.per_second, self.clock = max_open, per_second, clock
        self.refusal_delay = REFUSAL_DELAY if refusal_delay is None else refusal_delay
        self.open = 0
        self._tokens = float(per_second)
        self._at = clock()

    def admit(self) -> ProxyError | None:
        """None: admitted (call `release` when it is over); else the refusal to send."""
        now = self.clock()
        self._tokens = min(self.per_second, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self.open >= self.max_open:
            return ProxyError(
                503,
                "Service Unavailable: too many connections",
                f"pod_exec_mcp egress proxy: this sandbox has {self.max_open} connections at "
                "once, its bound (egress_max_connections); close one and retry\n",
            )
        if self._tokens < 1:
            return ProxyError(
                429,
                "Too Many Requests",
                f"pod_exec_mcp egress proxy: this sandbox opened over {self.per_second:g} new "
                "connections per second, its bound (egress_connections_per_second); retry "
                "in a moment\n",
            )
        self._tokens -= 1
        self.open += 1
        return None

    def release(self) -> None:
        self.open -= 1


class ProxyError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def response(status: int, reason: str, body: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    reason = "".join(c if c.isascii() and c.isprintable() else "?" for c in reason)[:300]
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n"
        "Proxy-Agent: pod_exec_mcp\r\n\r\n"
    )
    return head.encode() + data


def refusal(decision: Decision, what: str) -> ProxyError:
    return ProxyError(
        403,
        f"Forbidden by egress policy: {decision.rule}",
        f"pod_exec_mcp egress policy refused {what}: {decision.rule}.\n",
    )


async def read_head(client: ByteStream) -> tuple[bytes, bytes]:
    """The request head (up to and without the blank line) and the bytes after it that came
    with it. Never holds more than MAX_HEAD (+ the blank line), and scans each byte for the
    blank line once: the work is linear in the head, and bounded whatever the client sends."""
    buf = bytearray()
    searched = 0
    while (end := buf.find(b"\r\n\r\n", max(0, searched - 3))) < 0:
        searched = len(buf)
        room = MAX_HEAD + 4 - len(buf)
        if room <= 0:
            raise ProxyError(431, "Request Header Fields Too Large", "request head over 64 KiB\n")
        chunk = await client.read(min(CHUNK, room))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf[:end]), bytes(buf[end + 4 :])


def _split_host_port(authority: str, default_port: int | None) -> tuple[str, int]:
    if authority.startswith("["):
        host, _, tail = authority[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif authority.count(":") == 1:
        host, _, port_text = authority.partition(":")
    else:
        host, port_text = authority, ""
    if not port_text:
        if default_port is None:
            raise ValueError("no port")
        return host, default_port
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError("port out of range")
    return host, port


def _bad(message: str) -> ProxyError:
    return ProxyError(400, "Bad Request", message + "\n")


def _strict_lines(head: bytes) -> list[bytes]:
    """The head's lines, refusing what parsers disagree on (so what h11 frames is what any
    origin frames): a CR or LF that is not part of CRLF, and obsolete line folding."""
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise _bad("a bare CR or LF in the request head: lines end with CRLF")
    if any(line[:1] in (b" ", b"\t") for line in lines[1:]):
        raise _bad("obsolete line folding (a header line starting with a space or tab)")
    return lines


def _framing(request: h11.Request, lines: list[bytes]) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of a request, refusing every ambiguous framing: more than
    one Content-Length (even equal ones, or a list), Content-Length with Transfer-Encoding,
    Transfer-Encoding other than one `chunked`, or in HTTP/1.0."""
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif name == b"transfer-encoding":
            encodings.append(value.strip(b" \t"))
    if len(lengths) > 1:
        raise _bad("more than one Content-Length header")
    if lengths and encodings:
        raise _bad("both Content-Length and Transfer-Encoding")
    if encodings:
        if len(encodings) > 1 or encodings[0].lower() != b"chunked":
            raise _bad("Transfer-Encoding other than one final `chunked`")
        if request.http_version != b"1.1":
            raise _bad("Transfer-Encoding in an HTTP/1.0 request")
        return None, True
    if lengths:
        text = lengths[0]
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise _bad("Content-Length is not one decimal number")
        return int(text), False
    return 0, False


class Request:
    """One proxy request, as a strict HTTP/1.1 parser (h11) reads its head, with the
    framing of its body checked to be unambiguous (`_framing`)."""

    def __init__(self, head: bytes, rest: bytes = b"") -> None:
        lines = _strict_lines(head)
        # Fed the head and what followed it: for a chunked body, the parser frames it.
        self.parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD + 4)
        # h11 refuses an HTTP/1.1 request without Host (RFC 9112 3.2). A proxy replaces it
        # anyway (origin_form), and some clients send none with CONNECT: one is supplied to
        # the parser only. Two Host headers stay a 400.
        if not any(line[:5].lower() == b"host:" for line in lines[1:]):
            head += b"\r\nHost: -"
        self.parser.receive_data(head + b"\r\n\r\n" + rest)
        try:
            event = self.parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise _bad(f"malformed request: {str(exc)[:200]}") from None
        if not isinstance(event, h11.Request):
            raise _bad("not an HTTP/1.x request")
        self.length, self.chunked = _framing(event, lines)
        self.method = event.method.decode("ascii")
        self.target = event.target.decode("ascii")
        self.version = "HTTP/" + event.http_version.decode("ascii")
        self.headers: list[tuple[bytes, bytes]] = list(event.headers.raw_items())
        self.path = ""
        self.explicit_port = False
        if self.method == "CONNECT":
            if self.chunked or self.length:
                raise _bad("CONNECT takes no body")
            try:
                self.host, self.port = _split_host_port(self.target, None)
            except ValueError:
                raise _bad("CONNECT needs host:port, e.g. CONNECT example.org:443") from None
        else:
            url = urlsplit(self.target)
            if url.scheme == "https":
                raise _bad("send https:// URLs with CONNECT (as curl, pip, git and apt do)")
            if url.scheme != "http" or not url.hostname:
                raise _bad(
                    "this is an HTTP proxy: it takes CONNECT host:port, or an absolute "
                    "http:// URL (GET http://example.org/ HTTP/1.1)"
                )
            try:
                port = url.port or 80
            except ValueError:
                raise _bad("bad port in the URL") from None
            self.host, self.port = url.hostname, port
            self.path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        try:
            self.host = parse_host(self.host)
        except HostError as exc:
            raise _bad(f"bad host: {exc}") from None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.encode():
                return value.decode("latin-1")
        return None

    def authority(self) -> str:
        """The request-target's authority: what `Host` must say (RFC 9112 3.2.2)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host + (f":{self.port}" if self.port != 80 else "")

    def origin_form(self) -> bytes:
        """The request head as the origin server gets it: origin-form, `Host` the URI's
        authority (whatever the client said), no hop-by-hop headers, the body framing
        checked above, and `Connection: close` (one request per connection)."""
        named = {
            t.strip().lower() for t in (self.header("connection") or "").split(",") if t.strip()
        }
        lines = [
            f"{self.method} {self.path} HTTP/1.1".encode(),
            b"Host: " + self.authority().encode(),
        ]
        for name, value in self.headers:
            low = name.lower().decode("ascii")
            if low in _HOP_BY_HOP or low in named or low == "host":
                continue
            lines.append(name + b": " + value)
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"


async def open_upstream(
    request: Request, policy: EgressPolicy, resolver: Resolver, connector: Connector
) -> ByteStream:
    """Check, resolve, check every address, connect to an allowed one."""
    what = f"{request.method} {request.host}:{request.port}"
    decision = policy.check_name(request.host)
    if not decision.allowed:
        raise refusal(decision, what)
    try:
        addresses = await asyncio.wait_for(resolver(request.host, request.port), RESOLVE_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        # ValueError: getaddrinfo's UnicodeError for a name IDNA cannot encode.
        why = str(exc)[:200] or "timed out"
        raise ProxyError(502, "Bad Gateway", f"cannot resolve {request.host}: {why}\n") from None
    allowed: list[tuple[IPAddress, Decision]] = []
    refused: list[tuple[IPAddress, Decision]] = []
    for address in addresses:
        decision = policy.check_address(request.host, address)
        (allowed if decision.allowed else refused).append((address, decision))
    if not allowed:
        if refused:
            raise refusal(refused[0][1], what)
        raise ProxyError(502, "Bad Gateway", f"{request.host} has no address\n")
    errors = []
    for address, _ in allowed:
        try:
            return await asyncio.wait_for(connector(address, request.port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            errors.append(f"{address}: {exc or 'timed out'}")
    raise ProxyError(
        502,
        "Bad Gateway",
        f"cannot connect to {request.host}:{request.port}: {'; '.join(errors)}\n",
    )


async def _pump(src: ByteStream, dst: ByteStream, limit: int | None = None) -> None:
    """Copy src to dst until src ends (or `limit` bytes), then half-close dst."""
    left = limit
    while left is None or left > 0:
        data = await src.read(CHUNK if left is None else min(CHUNK, left))
        if not data:
            break
        if left is not None:
            left -= len(data)
        await dst.write(data)
    if limit is None:
        await dst.write_eof()


async def relay(
    a: ByteStream,
    b: ByteStream,
    first: bytes = b"",
    limit: int | None = None,
    one_request: bool = False,
) -> None:
    """Copy both ways until both directions end, or either side fails. `first` goes to b
    before anything else; with `limit`, at most that many more bytes of a go to b. With
    `one_request`, the end of b's answer ends the exchange."""
    if first:
        await b.write(first)
    to_b = asyncio.ensure_future(_pump(a, b, limit))
    to_a = asyncio.ensure_future(_pump(b, a))
    try:
        if one_request:
            await to_a
            to_b.cancel()
        else:
            await asyncio.gather(to_b, to_a)
    finally:
        for task in (to_b, to_a):
            task.cancel()
        await asyncio.gather(to_b, to_a, return_exceptions=True)


async def exchange(
    client: ByteStream,
    upstream: ByteStream,
    first: bytes,
    limit: int | None,
    one_request: bool,
    label: str = "",
) -> None:
    """`relay`'s exchange, copied by the client's side itself where it can take the
    connection over (no byte then passes through this process), else relayed here."""
    sock = upstream.unused_socket() if isinstance(upstream, TcpStream) else None
    if sock is not None and isinstance(client, Splicer):
        counts = await client.splice(sock, first, limit, one_request)
        if counts is not None:
            log.info("egress spliced%s: %d bytes up, %d down", label, *counts)
            return
    await relay(client, upstream, first, limit, one_request)


async def relay_chunked(
    client: ByteStream, upstream: ByteStream, head: bytes, parser: h11.Connection
) -> None:
    """One request with a chunked body, relayed here: `head`, then the body as `parser`
    frames it (re-chunked, trailers dropped), then nothing more from the client; the
    origin's answer goes back whole. Over when the answer is; a malformed body ends it."""

    async def body() -> None:
        await upstream.write(head)
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise ConnectionError(f"malformed chunked body: {exc}") from None
            if event is h11.NEED_DATA:
                parser.receive_data(await client.read(CHUNK))
            elif isinstance(event, h11.Data):
                if event.data:
                    await upstream.write(b"%x\r\n" % len(event.data) + event.data + b"\r\n")
            elif isinstance(event, h11.EndOfMessage):
                await upstream.write(b"0\r\n\r\n")
                return
            else:
                raise ConnectionError("the client went away inside a chunked body")

    up = asyncio.ensure_future(body())
    down = asyncio.ensure_future(_pump(upstream, client))
    try:
        while not down.done():
            await asyncio.wait(
                [t for t in (up, down) if not t.done()], return_when="FIRST_COMPLETED"
            )
            if up.done() and up.exception() is not None:
                up.result()
        down.result()
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


async def serve_connection(
    client: ByteStream,
    policy: EgressPolicy,
    *,
    resolver: Resolver = resolve,
    connector: Connector = connect,
    label: str = "",
    refusals: RefusalLog | None = None,
    gate: ConnectionGate | None = None,
    head_timeout: float = HEAD_TIMEOUT,
) -> None:
    """Serve one proxy connection from a sandbox, then close it. Never raises (except
    CancelledError). Refusals (every 4xx/5xx) are logged through `refusals`, the sandbox's
    rate-limited log (one of this connection's own when None). With `gate` (the
    sandbox's connection bounds), a connection past them is answered unread, after the
    gate's refusal_delay. A
    request head not complete within `head_timeout` seconds (however slowly it trickles
    in) is answered 408 and the connection closed: nothing more of it is read."""
    upstream: ByteStream | None = None
    refused = gate.admit() if gate is not None else None
    try:
        if refused is not None:
            assert gate is not None
            await asyncio.sleep(gate.refusal_delay)
            raise refused
        try:
            head, rest = await asyncio.wait_for(read_head(client), head_timeout)
        except TimeoutError:
            raise ProxyError(
                408,
                "Request Timeout",
                f"pod_exec_mcp egress proxy: no complete request head in {head_timeout:g} s, "
                "its bound (egress_head_timeout); send the request head at once\n",
            ) from None
        request = Request(head, rest)
        upstream = await open_upstream(request, policy, resolver, connector)
        log.info("egress %s %s:%d%s", request.method, request.host, request.port, label)
        if request.method == "CONNECT":
            await client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await exchange(client, upstream, rest, None, one_request=False, label=label)
        elif request.chunked:
            # A chunked body is framed here, chunk by chunk (the agent cannot count it):
            # exactly that body goes on, nothing the client sends after it.
            await relay_chunked(client, upstream, request.origin_form(), request.parser)
        else:
            assert request.length is not None
            body = rest[: request.length]
            await exchange(
                client,
                upstream,
                request.origin_form() + body,
                request.length - len(body),
                one_request=True,
                label=label,
            )
    except ProxyError as exc:
        (refusals or RefusalLog()).refused(label, f"{exc.status} {exc.message}")
        with contextlib.suppress(Exception):
            await client.write(response(exc.status, exc.reason, exc.message))
    except EOFError:
        pass  # the client went away before sending a request
    except (OSError, ConnectionError) as exc:
        log.debug("egress connection ended%s: %s", label, exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("egress proxy failed%s", label)
    finally:
        if gate is not None and refused is None:
            gate.release()
        if upstream is not None:
            with contextlib.suppress(Exception):
                await upstream.close()
        with contextlib.suppress(Exception):
            await client.close()
