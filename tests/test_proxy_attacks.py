"""Attacks on the egress proxy and its policy (issue 22), without podman.

Every test here attacks one defence: address spellings and special ranges, malformed hosts,
request smuggling, log injection and floods, fairness between sandboxes. No test connects
anywhere but this machine's loopback: outside addresses are policy inputs only, and the
proxy's resolver and connector are recorded, so a refusal is proven to happen before any
lookup or connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pod_exec_mcp.egress import EgressPolicy
from pod_exec_mcp.proxy import serve_connection

ip = ipaddress.ip_address
DEFAULT = EgressPolicy.from_rules()


# --- 1. one address policy, after every normalization ----------------------------------

# IPv4 10.0.0.5, private, in every IPv6 form that carries it, and the special-purpose
# ranges Python's ipaddress (3.11) calls global or that a list of "private" ranges misses.
PRIVATE_IN_DISGUISE = [
    ("::ffff:10.0.0.5", "10.0.0.5"),  # IPv4-mapped
    ("::ffff:0:a00:5", "10.0.0.5"),  # IPv4-translated (SIIT), the spelling that got through
    ("::a00:5", "10.0.0.5"),  # IPv4-compatible
    ("64:ff9b::a00:5", "10.0.0.5"),  # NAT64 well-known prefix
    ("64:ff9b:1::a00:5", "10.0.0.5"),  # NAT64 local-use prefix, /96 position
    ("64:ff9b:1:0:a:0:500:0", "10.0.0.5"),  # NAT64 local-use prefix, /64 position
    ("64:ff9b:1:a:0:5::", "10.0.0.5"),  # NAT64 local-use prefix, /56 position
    ("64:ff9b:1:a00:0:500::", "10.0.0.5"),  # NAT64 local-use prefix, /48 position
    ("2002:a00:5::5", "10.0.0.5"),  # 6to4
    ("2001:0:a00:5::5", "10.0.0.5"),  # Teredo: server 10.0.0.5
    ("2001:0:4136:e378:8000:63bf:f5ff:fffa", "10.0.0.5"),  # Teredo: client ~0xf5fffffa
]
SPECIAL = [
    "198.18.0.2",  # benchmarking
    "192.0.2.1",  # TEST-NET-1 (this VM's own network here)
    "198.51.100.7",  # TEST-NET-2
    "203.0.113.5",  # TEST-NET-3
    "192.0.0.5",  # IETF protocol assignments
    "192.0.0.9",  # ... including the one Python calls global
    "192.88.99.1",  # 6to4 relay anycast (deprecated)
    "239.1.1.1",  # multicast (global in Python 3.11)
    "255.255.255.255",
    "fec0::1",  # site-local (deprecated)
    "100::1",  # discard-only
    "2001:db8::1",  # documentation
    "3fff::1",  # documentation (RFC 9637)
    "5f00::1",  # SRv6 SIDs
    "ff0e::1",  # global-scope multicast
]


@pytest.mark.parametrize("address, carried", PRIVATE_IN_DISGUISE)
def test_ipv4_embedded_in_ipv6_is_judged(address: str, carried: str) -> None:
    refused = DEFAULT.check_address("x.example", ip(address), host_own=False)
    assert not refused.allowed, address
    assert carried in refused.rule or "denied by default" in refused.rule
    # Even where an operator opened the IPv6 range itself, the IPv4 inside is judged.
    wide = EgressPolicy.from_rules(["public", "2002::/16", "2001::/32", "64:ff9b::/32", "::/8"])
    refused = wide.check_address("x.example", ip(address), host_own=False)
    assert not refused.allowed and carried in refused.rule, (address, refused.rule)
    if not address.startswith("64:ff9b:1:"):  # there another position may be named first
        assert "10.0.0.0/8" in refused.rule


def test_embedded_public_ipv4_passes_where_its_range_is_opened() -> None:
    # 93.184.215.14 is public: NAT64 of it is public, 6to4 of it once 2002::/16 is opened.
    assert DEFAULT.check_address("x", ip("64:ff9b::5db8:d70e"), host_own=False).allowed
    assert not DEFAULT.check_address("x", ip("2002:5db8:d70e::1"), host_own=False).allowed
    opened = EgressPolicy.from_rules(["public", "2002::/16"])
    assert opened.check_address("x", ip("2002:5db8:d70e::1"), host_own=False).allowed
    # A CIDR rule for the private IPv4 opens its mapped spelling: the same destination.
    lan = EgressPolicy.from_rules(["public", "10.0.0.5/32"])
    assert lan.check_address("x", ip("::ffff:10.0.0.5"), host_own=False).allowed


@pytest.mark.parametrize("address", SPECIAL)
def test_special_purpose_ranges_are_denied_by_default(address: str) -> None:
    refused = DEFAULT.check_address("x.example", ip(address), host_own=False)
    assert not refused.allowed, address
    assert "denied by default" in refused.rule and "egress_allow" in refused.rule
    # The rule is named: the range, so an operator knows what to open.
    assert "/" in refused.rule
    opened = EgressPolicy.from_rules(["public", f"{address}/128" if ":" in address else address])
    assert opened.check_address("x.example", ip(address), host_own=False).allowed


def test_this_hosts_networks_are_not_public() -> None:
    from pod_exec_mcp.egress import host_networks

    networks = host_networks()
    for network in networks:
        # A neighbour's address (never connected to: a policy input only).
        neighbour = network.network_address + (1 if network.num_addresses > 1 else 0)
        refused = DEFAULT.check_address("x", neighbour)
        assert not refused.allowed, (network, refused)
    own = DEFAULT.check_address("x.example", ip("93.184.215.14"), host_own=True)
    assert not own.allowed and "this host's own" in own.rule


# --- 2. hosts: the name matcher and malformed hosts -------------------------------------


def test_the_name_matcher_never_matches_an_ip_literal() -> None:
    policy = EgressPolicy.from_rules(["*.allowed.test", "allowed.test"])
    for host in ("2001:db8::5%.allowed.test", "10.0.0.5%.allowed.test", "[::1%.allowed.test]"):
        assert not policy.check_name(host).allowed, host
    assert not policy.check_address("10.0.0.5", ip("10.0.0.5"), host_own=False).allowed


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.5%.allowed.test",  # what a lax IP parser (inet_aton and friends) cuts short
        "2001:db8::5%.allowed.test",
        "[2001:db8::5%.allowed.test]",
        "127.1.allowed.test.",
        "x..allowed.test",
        "x.allowed.test/",
        "a" * 300 + ".allowed.test",
    ],
)
def test_a_name_rule_matches_only_a_well_formed_host_name(host: str) -> None:
    """The matcher itself (not only the parser before it) never matches anything but a
    valid host name: a scoped literal, a malformed or oversized name never passes it."""
    from pod_exec_mcp.egress import parse_rule

    assert not parse_rule("*.allowed.test").matches_name(host)
    assert parse_rule("*.allowed.test").matches_name("x.allowed.test")


@pytest.mark.parametrize(
    "host",
    [
        b"[2001:db8::5%.allowed.test]",  # a scoped IP literal passed *.allowed.test
        b"[fe80::1%eth0]",
        b"\xc3\xa4.allowed.test",  # non-ASCII (UTF-8 "a umlaut")
        b"\x80.allowed.test",  # non-ASCII that IDNA cannot encode: UnicodeError
        b"\xef\xbc\x91\xef\xbc\x92\xef\xbc\x97.0.0.1",  # fullwidth digits
        b"a" * 60_000 + b".allowed.test",  # 60 KB
        b"x." * 200 + b"allowed.test",  # over 253 characters
        b"",  # empty
        b"0x7f.1",  # IPv4 in spellings getaddrinfo takes: hex, short, decimal, octal
        b"2130706433",
        b"017.0.0.1",
        b"127.1",
    ],
)
@pytest.mark.parametrize("method", ["CONNECT", "GET"])
async def test_malformed_hosts_get_a_clean_400(
    proxy_of: Any, method: str, host: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await proxy_of(EgressPolicy.from_rules(["*.allowed.test", "public"]))
    if method == "CONNECT":
        raw = b"CONNECT " + host + b":80 HTTP/1.1\r\nHost: x.allowed.test:80\r\n\r\n"
    else:
        raw = b"GET http://" + host + b"/ HTTP/1.1\r\nHost: x.allowed.test\r\n\r\n"
    with caplog.at_level(logging.DEBUG):
        reply = await proxy.ask(raw)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert len(reply) < 2000, "the answer does not echo the host whole"
    assert proxy.resolved == [] and proxy.connects == []
    assert not any(r.exc_info for r in caplog.records), "no traceback"
    assert all(len(r.getMessage()) < 2000 for r in caplog.records)


# --- 3. request smuggling: one checked request, exactly its bytes ------------------------


class Origin:
    """A loopback HTTP origin that records every byte it receives. It reads one request as
    a strict parser (h11) frames it, answers it, half-closes, and then keeps reading until
    the proxy closes, so whatever the proxy forwarded after that request is recorded too."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.port = 0

    async def next_received(self) -> bytes:
        """The bytes of the next connection, once the proxy has closed it."""
        return await asyncio.wait_for(self.received.get(), 10)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h11

        raw = bytearray()
        parser = h11.Connection(h11.SERVER)
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    raw += data
                    parser.receive_data(data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.write_eof()
            while data := await reader.read(65536):
                raw += data
        except (h11.RemoteProtocolError, ConnectionError):
            pass
        finally:
            self.received.put_nowait(bytes(raw))
            writer.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server_origin = Origin()
    server = await asyncio.start_server(server_origin.handle, "127.0.0.1", 0)
    server_origin.port = server.sockets[0].getsockname()[1]
    yield server_origin
    server.close()


LOOPBACK = EgressPolicy.from_rules(["allowed.test", "127.0.0.1/32"])
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: internal.admin\r\n\r\n"


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 48\r\nContent-Length: 0\r\n",  # conflicting (the attack run's)
        b"Content-Length: 5\r\nContent-Length: 5\r\n",  # duplicate, even if equal
        b"Content-Length: 5, 5\r\n",  # a list
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # both
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: gzip\r\n",  # not chunked at all
        b"Transfer-Encoding: chunked, gzip\r\n",  # chunked not final
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: identity\r\n",
        b"Transfer-Encoding : chunked\r\n",  # space before the colon
        b"Content-Length: +5\r\n",
        b"Content-Length: 0x5\r\n",
        b"X-A: 1\r\n Content-Length: 5\r\n",  # obs-fold
        b"Content-Length: 5\nX-A: 1\r\n",  # bare LF
        b"Host: allowed.test\r\n",  # a second Host
    ],
)
async def test_ambiguous_framing_is_refused_without_connecting(
    proxy_of: Any, origin: Origin, headers: bytes
) -> None:
    proxy = await proxy_of(LOOPBACK, {"allowed.test": ["127.0.0.1"]})
    raw = (
        f"POST http://allowed.test:{origin.port}/ HTTP/1.1\r\nHost: allowed.test\r\n".encode()
        + headers
        + b"\r\nhello"
        + SMUGGLED
    )
    reply = await proxy.ask(raw)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert proxy.resolved == [] and proxy.connects == []
    assert origin.received.empty()


async def test_transfer_encoding_in_http_1_0_and_bodies_on_connect_are_refused(
    proxy_of: Any,
) -> None:
    proxy = await proxy_of(LOOPBACK, {"allowed.test": ["127.0.0.1"]})
    for raw in (
        b"POST http://allowed.test/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"CONNECT allowed.test:80 HTTP/1.1\r\nHost: allowed.test:80\r\nContent-Length: 5\r\n\r\n",
        b"CONNECT allowed.test:80 HTTP/1.1\r\nHost: allowed.test:80\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    ):
        reply = await proxy.ask(raw)
        assert reply.startswith(b"HTTP/1.1 400 "), (raw, reply[:300])
    assert proxy.resolved == [] and proxy.connects == []


def _one_request(raw: bytes) -> tuple[Any, bytes, bytes]:
    """The request h11 frames at the start of `raw`, its body, and what follows it."""
    import h11

    parser = h11.Connection(h11.SERVER)
    parser.receive_data(raw)
    parser.receive_data(b"")
    request, body = parser.next_event(), b""
    while not isinstance(event := parser.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data), event
        body += event.data
    return request, body, parser.trailing_data[0]


@pytest.mark.parametrize(
    "framing, body",
    [
        (b"Content-Length: 11\r\n", b"hello world"),
        (
            b"Transfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nT: 1\r\n\r\n",
        ),
        (b"", b""),  # no body: everything after the head is another request
    ],
)
async def test_only_the_declared_body_reaches_the_origin(
    proxy_of: Any, origin: Origin, framing: bytes, body: bytes
) -> None:
    """A pipelined (smuggled) request after the body never reaches the destination: the
    origin gets one request, its declared body, and nothing after it."""
    proxy = await proxy_of(LOOPBACK, {"allowed.test": ["127.0.0.1"]})
    raw = (
        f"POST http://allowed.test:{origin.port}/up HTTP/1.1\r\nHost: allowed.test\r\n".encode()
        + framing
        + b"\r\n"
        + body
        + SMUGGLED
    )
    reply = await proxy.ask(raw)
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"ok"), reply[:300]
    received = await origin.next_received()
    request, got, after = _one_request(received)
    assert request.method == b"POST" and request.target == b"/up"
    assert got == (b"hello world" if body else b"")
    assert after == b"", after
    assert b"internal.admin" not in received
    assert origin.received.empty()


async def test_the_origin_sees_the_uris_authority_as_host(proxy_of: Any, origin: Origin) -> None:
    """RFC 9112 3.2.2: a proxy replaces the Host of an absolute-form request with the URI's
    authority, so a name-based virtual host behind an allowed address stays unreachable."""
    proxy = await proxy_of(LOOPBACK, {"allowed.test": ["127.0.0.1"]})
    reply = await proxy.ask(
        f"GET http://allowed.test:{origin.port}/ HTTP/1.1\r\nHost: internal.admin\r\n"
        "User-Agent: t\r\n\r\n".encode()
    )
    assert reply.startswith(b"HTTP/1.1 200 OK"), reply[:300]
    request, _, _ = _one_request(await origin.next_received())
    hosts = [v for k, v in request.headers if k == b"host"]
    assert hosts == [f"allowed.test:{origin.port}".encode()]
    assert (b"user-agent", b"t") in list(request.headers)


@pytest.mark.parametrize(
    "error", [UnicodeError("label empty or too long"), ValueError("bad"), OSError("no name")]
)
async def test_a_failing_lookup_is_a_clean_502(
    proxy_of: Any, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """getaddrinfo raises UnicodeError (a ValueError) for names IDNA cannot encode: a host
    that got past the parser that way is a 502 with a message, not a traceback."""
    proxy = await proxy_of(EgressPolicy.from_rules(["*.allowed.test", "public"]))

    async def resolver(host: str, port: int) -> list[Any]:
        raise error

    proxy.resolver = resolver
    with caplog.at_level(logging.DEBUG):
        reply = await proxy.ask(b"CONNECT x.allowed.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 502 "), reply[:300]
    assert b"cannot resolve x.allowed.test" in reply
    assert proxy.connects == []
    assert not any(r.exc_info for r in caplog.records), "no traceback"


# --- 4. the log: control characters and sizes that a sandbox or a client controls -------

HOSTILE = "\x1b]0;PWNED\x07GET\x1b[31m red \x9b2J\x7f\x00\x08 \u0085end"
# What may appear in a text log line: no C0 (a line ends with the handler's \n only), no
# DEL, no C1.
_RAW_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"} | {chr(c) for c in range(0x80, 0xA0)}


def _render(fmt: str, record: logging.LogRecord) -> str:
    from pod_exec_mcp.logs import _formatter

    return _formatter(fmt).format(record)  # type: ignore[arg-type]


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("pod_exec_mcp.proxy", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize(
    "record",
    [
        _record("egress %s %s:%d", HOSTILE, HOSTILE, 80),  # in the message (the attack run's)
        _record("egress", host=HOSTILE),  # in a field
        _record("egress", host="\x1b[31mnospace"),  # in a field that would go unquoted
        _record("egress", path=[HOSTILE]),  # inside a structured field
    ],
)
def test_no_raw_control_character_reaches_a_text_log_line(record: logging.LogRecord) -> None:
    line = _render("text", record)
    assert not _RAW_CONTROL & set(line), repr(line)
    assert "\\x1b]0;PWNED\\x07" in line or "\\x1b[31m" in line or "\\u001b" in line, line


def test_json_logs_keep_the_value_as_it_was() -> None:
    import json

    line = _render("json", _record("egress %s", HOSTILE, host=HOSTILE))
    event = json.loads(line)
    assert event["host"] == HOSTILE and event["event"] == f"egress {HOSTILE}"


def test_a_traceback_in_a_text_line_is_escaped() -> None:
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        import sys

        record = _record("egress proxy failed")
        record.exc_info = sys.exc_info()
    line = _render("text", record)
    assert not _RAW_CONTROL & set(line), repr(line)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_logged_field_is_cut_to_a_fixed_length(fmt: str) -> None:
    """A 60 KB host name (or message, or field) gives a log line of bounded size."""
    from pod_exec_mcp.logs import MAX_FIELD_CHARS, MAX_MESSAGE_CHARS

    huge = "a" * 60_000
    line = _render(fmt, _record("egress refused: %s", huge, host=huge, path=huge))
    assert len(line) < MAX_MESSAGE_CHARS + 2 * MAX_FIELD_CHARS + 500, len(line)
    assert "60000 characters" in line  # what was cut is said


# --- 5. floods: refusals logged at a bounded rate, O(1) work beyond a fixed cap ----------


class MemoryStream:
    """A client ByteStream over bytes held here, counting what the proxy read of it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.taken, self.written = data, 0, bytearray()

    async def read(self, n: int) -> bytes:
        chunk = self.data[self.taken : self.taken + n]
        self.taken += len(chunk)
        return chunk

    async def write(self, data: bytes) -> None:
        self.written += data

    async def write_eof(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "raw, status",
    [
        # Refused by policy, with a 10 MB body the proxy must not read.
        (b"POST http://10.0.0.5/ HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n", b"403"),
        # Ambiguous framing, 10 MB after it.
        (
            b"POST http://x.test/ HTTP/1.1\r\nHost: a\r\n"
            b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"400",
        ),
        # A head that never ends.
        (b"GET http://x.test/ HTTP/1.1\r\nA: ", b"431"),
    ],
)
async def test_a_refused_request_costs_no_more_than_the_head_cap(raw: bytes, status: bytes) -> None:
    from pod_exec_mcp.proxy import MAX_HEAD

    client = MemoryStream(raw + b"a" * 10_000_000)
    await serve_connection(client, DEFAULT)  # type: ignore[arg-type]
    assert client.written.split(b" ")[1] == status, bytes(client.written[:200])
    assert client.taken <= MAX_HEAD + 4, client.taken


async def test_refusals_are_logged_as_a_count_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1,000 refused requests from one sandbox within an interval give one line with the
    first refusal and, once the interval is over, one line with the count: the log grows by
    a bounded amount per sandbox and interval, whatever the sandbox sends."""
    from pod_exec_mcp.proxy import RefusalLog

    now = [1000.0]
    refusals = RefusalLog(interval=10.0, clock=lambda: now[0])
    raw = b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: " + b"h" * 50_000 + b"\r\n\r\n"
    with caplog.at_level(logging.DEBUG, logger="pod_exec_mcp"):
        for i in range(1000):
            now[0] += 0.005
            client = MemoryStream(raw)
            await serve_connection(client, DEFAULT, label=" (sandbox s1)", refusals=refusals)  # type: ignore[arg-type]
            assert client.written.startswith(b"HTTP/1.1 403 "), i
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1, lines[:5]
        assert "10.0.0.5" in lines[0] and "sandbox s1" in lines[0]
        now[0] += 10.0
        await serve_connection(MemoryStream(raw), DEFAULT, label=" (sandbox s1)", refusals=refusals)  # type: ignore[arg-type]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 3, lines
        assert "999 more refused" in lines[1] and "sandbox s1" in lines[1]
        refusals.close()
        assert len(caplog.records) == 3  # nothing left to count
    assert all(len(line) < 2000 for line in lines)


async def test_streams_over_the_cap_are_logged_as_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """A sandbox that opens thousands of connections past the per-sandbox stream cap gets
    each reset, and the log one line per interval, not one per connection."""
    from pod_exec_mcp import agent_streams as st

    sent: list[int] = []

    async def send(data: bytes, more: bytes | memoryview = b"") -> None:
        sent.append(st.HEADER.unpack(data[:12])[0])

    async def handler(stream: st.AgentStream) -> None:
        await asyncio.Event().wait()

    now = [0.0]
    mux = st.StreamMux(send, handler)
    mux.over_cap.clock = lambda: now[0]
    with caplog.at_level(logging.DEBUG, logger="pod_exec_mcp"):
        for i in range(st.MAX_STREAMS + 2000):
            mux.dispatch(st.T_STREAM_OPEN, 0x80000001 + i, b"")
        await asyncio.sleep(0)
        assert len([r for r in caplog.records if "connections at once" in r.getMessage()]) == 1
        now[0] += 60
        mux.dispatch(st.T_STREAM_OPEN, 0x90000000, b"")
        await asyncio.sleep(0)
    over = [r.getMessage() for r in caplog.records if "connections at once" in r.getMessage()]
    assert len(over) == 3 and "1999 more" in over[1], over
    await mux.close()


async def test_resets_past_the_cap_are_held_back_then_go_out_together() -> None:
    """2,000 connections past the stream cap: none is reset at once (each then keeps its
    place in the agent's own table, which stops the agent accepting more once it is full,
    so a sandbox that reconnects as fast as it can opens one table per interval here, not
    thousands a second); after the delay, all are reset in one write, in order."""
    from pod_exec_mcp import agent_streams as st

    writes: list[bytes] = []

    async def send(data: bytes, more: bytes | memoryview = b"") -> None:
        writes.append(bytes(data) + bytes(more))

    async def handler(stream: st.AgentStream) -> None:
        await asyncio.Event().wait()

    mux = st.StreamMux(send, handler)
    assert mux.over_cap_delay == st.OVER_CAP_RESET_DELAY > 0
    mux.over_cap_delay = 3600.0  # the test releases them itself, when the timer would
    ids = [0x80000001 + i for i in range(st.MAX_STREAMS + 200)]
    for fid in ids:
        mux.dispatch(st.T_STREAM_OPEN, fid, b"")
    for _ in range(5):
        await asyncio.sleep(0)
    assert writes == [], "none reset at once"
    assert mux._held_timer is not None
    mux._held_timer._run()  # the timer's callback, as the loop runs it once it is due
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(writes) == 1, len(writes)
    data, reset = writes[0], []
    while data:
        ftype, _, _, fid, length = st.HEADER.unpack(data[: st.HEADER.size])
        assert ftype == st.T_STREAM_RESET
        reset.append(fid)
        data = data[st.HEADER.size + length :]
    assert reset == ids[st.MAX_STREAMS :]
    await mux.close()


async def test_held_resets_are_bounded() -> None:
    """A forged agent's endless opens past the cap: held resets never pile up past
    MAX_HELD_RESETS; past it they go out at once, in one write per turn."""
    from pod_exec_mcp import agent_streams as st

    writes: list[bytes] = []

    async def send(data: bytes, more: bytes | memoryview = b"") -> None:
        writes.append(bytes(data) + bytes(more))

    async def handler(stream: st.AgentStream) -> None:
        await asyncio.Event().wait()

    mux = st.StreamMux(send, handler)
    mux.over_cap_delay = 3600.0  # only the bound can release them
    for i in range(st.MAX_STREAMS + 10 * st.MAX_HELD_RESETS):
        mux.dispatch(st.T_STREAM_OPEN, 0x80000001 + i, b"")
        assert len(mux._held) < st.MAX_HELD_RESETS
    for _ in range(3):
        await asyncio.sleep(0)
    frames = sum(len(w) for w in writes) // (st.HEADER.size + len(b"too many connections"))
    assert frames == 10 * st.MAX_HELD_RESETS and len(writes) == 1, (frames, len(writes))
    await mux.close()


# --- 6. fairness: per-sandbox bounds on connections --------------------------------------


async def test_connections_past_the_concurrent_bound_get_a_503_naming_it() -> None:
    from pod_exec_mcp.proxy import ConnectionGate

    gate = ConnectionGate(max_open=2, per_second=1000, clock=lambda: 0.0)
    assert gate.admit() is None and gate.admit() is None  # two connections held open
    client = MemoryStream(b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    await serve_connection(client, DEFAULT, gate=gate)  # type: ignore[arg-type]
    assert client.written.startswith(b"HTTP/1.1 503 "), bytes(client.written)
    assert (
        b"2 connections at once" in client.written and b"egress_max_connections" in client.written
    )
    assert client.taken == 0, "refused before reading anything"
    gate.release()
    client = MemoryStream(b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    await serve_connection(client, DEFAULT, gate=gate)  # type: ignore[arg-type]
    assert client.written.startswith(b"HTTP/1.1 403 "), "admitted, then judged by the policy"
    assert gate.open == 1, "the served connection gave its place back"


async def test_a_refusal_past_the_bounds_waits_and_keeps_its_place() -> None:
    """A connection past its sandbox's bounds is answered only after the gate's
    refusal_delay (REFUSAL_DELAY), holding its agent stream meanwhile, so a sandbox that
    reconnects at once is refused a few dozen times a second, not thousands; unread."""
    from pod_exec_mcp.proxy import REFUSAL_DELAY, ConnectionGate

    assert ConnectionGate(1, 1.0).refusal_delay == REFUSAL_DELAY > 0
    gate = ConnectionGate(max_open=1, per_second=1000, clock=lambda: 0.0, refusal_delay=3600)
    assert gate.admit() is None  # the one place, held
    client = MemoryStream(b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    serving = asyncio.ensure_future(serve_connection(client, DEFAULT, gate=gate))  # type: ignore[arg-type]
    for _ in range(5):
        await asyncio.sleep(0)
    assert not serving.done() and client.written == b"" and client.taken == 0
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    gate.refusal_delay = 0
    await serve_connection(client, DEFAULT, gate=gate)  # type: ignore[arg-type]
    assert client.written.startswith(b"HTTP/1.1 503 ") and client.taken == 0
    assert gate.open == 1, "a refused connection never took a place"


async def test_new_connections_past_the_rate_get_a_429_naming_it() -> None:
    from pod_exec_mcp.proxy import ConnectionGate

    now = [0.0]
    gate = ConnectionGate(max_open=1000, per_second=5, clock=lambda: now[0])
    answers = []
    for _ in range(8):
        client = MemoryStream(b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        await serve_connection(client, DEFAULT, gate=gate)  # type: ignore[arg-type]
        answers.append(bytes(client.written.split(b" ")[1]))
    assert answers == [b"403"] * 5 + [b"429"] * 3  # a burst of 5, then the rate
    assert b"5 new connections per second" in client.written
    assert b"egress_connections_per_second" in client.written
    now[0] += 1.0  # a second later, 5 more
    client = MemoryStream(b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    await serve_connection(client, DEFAULT, gate=gate)  # type: ignore[arg-type]
    assert client.written.startswith(b"HTTP/1.1 403 ")


class HeldStream(MemoryStream):
    """A client that sends nothing until released: it holds its proxy connection open."""

    def __init__(self) -> None:
        super().__init__(b"")
        self.go = asyncio.Event()

    async def read(self, n: int) -> bytes:
        await self.go.wait()
        return b""


async def test_the_engine_gives_each_sandbox_its_own_bounds() -> None:
    """PodmanEngine serves each sandbox's connections through that sandbox's gate, from
    the settings: a sandbox at its bound is refused, another one is not."""
    from types import SimpleNamespace

    from pod_exec_mcp.config import Settings
    from pod_exec_mcp.podman_engine import PodmanEngine

    settings = Settings(egress_max_connections=1)
    engine = PodmanEngine(
        SimpleNamespace(path="/usr/bin/podman"),  # type: ignore[arg-type]
        egress_limits=(settings.egress_max_connections, settings.egress_connections_per_second),
    )
    held = HeldStream()
    holding = asyncio.ensure_future(engine._serve_egress("s1", held))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    second = MemoryStream(b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    await engine._serve_egress("s1", second)  # type: ignore[arg-type]
    assert second.written.startswith(b"HTTP/1.1 503 "), bytes(second.written)
    other = MemoryStream(b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    await engine._serve_egress("s2", other)  # type: ignore[arg-type]
    assert other.written.startswith(b"HTTP/1.1 403 "), "s2 has bounds of its own"
    held.go.set()
    await asyncio.wait_for(holding, 10)
    third = MemoryStream(b"CONNECT 10.0.0.5:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    await engine._serve_egress("s1", third)  # type: ignore[arg-type]
    assert third.written.startswith(b"HTTP/1.1 403 "), "the held place was given back"


# --- 7. fairness: a bound on the time one request may take to arrive ---------------------


async def _trickle(port: int, data: bytes, every: float = 0.05) -> bytes:
    """Send `data` to the proxy at `port` one byte at a time, `every` seconds apart (a
    slowloris), stopping once the proxy answers; then all it answered, up to its close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = bytearray()

    async def read_all() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                answer.extend(chunk)

    reading = asyncio.ensure_future(read_all())
    try:
        for byte in data:
            if reading.done() or answer:
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.sleep(every)
        await asyncio.wait_for(reading, 10)
    finally:
        writer.close()
    return bytes(answer)


async def test_a_trickled_request_head_gets_a_408_and_reaches_nothing(
    proxy_of: Any, origin: Origin
) -> None:
    """A whole, allowed request sent one byte at a time, more slowly than the head bound
    lets it arrive: 408, the connection closed, and no lookup, connection or byte at the
    origin (on a proxy without the bound, the origin answers it)."""
    proxy = await proxy_of(LOOPBACK, {"allowed.test": ["127.0.0.1"]})
    proxy.head_timeout = 0.5
    head = f"GET http://allowed.test:{origin.port}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
    # 20 bytes per second: the head needs 3 s or more, six times its bound.
    reply = await _trickle(proxy.port, head.encode(), every=0.05)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:300]
    assert b"egress_head_timeout" in reply, "the answer names the bound"
    assert reply.endswith(b"\n") and b"Connection: close" in reply
    assert proxy.resolved == [] and proxy.connects == []
    assert origin.received.empty()


async def test_a_head_that_never_ends_gets_a_408_and_a_close(proxy_of: Any) -> None:
    """The classic slowloris: header lines, one byte at a time, for ever. The proxy answers
    408 once the bound is over and closes the connection (the trickle then stops, so the
    reply ends at the proxy's close, not at the end of the trickle)."""
    proxy = await proxy_of(LOOPBACK, {"allowed.test": ["127.0.0.1"]})
    proxy.head_timeout = 0.3
    endless = b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n" + b"X-A: b\r\n" * 5000
    reply = await _trickle(proxy.port, endless, every=0.01)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:300]
    assert proxy.resolved == [] and proxy.connects == []


class TrickleStream(MemoryStream):
    """A client that sends its bytes one per read, `every` seconds apart, and records
    whether the proxy read from it after it answered."""

    def __init__(self, data: bytes, every: float) -> None:
        super().__init__(data)
        self.every = every
        self.read_after_answer = False
        self.closed = False

    async def read(self, n: int) -> bytes:
        if self.written:
            self.read_after_answer = True
        await asyncio.sleep(self.every)
        return await super().read(1)

    async def close(self) -> None:
        self.closed = True


async def test_the_engine_bounds_each_request_head_from_the_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through PodmanEngine with `egress_head_timeout` from the settings: 30 trickled
    requests from one sandbox each get a 408 and a close, each cost at most its head, the
    proxy reads nothing of them after answering, and the log gets one line for all 30 (the
    sandbox's rate-limited refusal log), not one each."""
    from types import SimpleNamespace

    from pod_exec_mcp.config import Settings
    from pod_exec_mcp.podman_engine import PodmanEngine
    from pod_exec_mcp.proxy import MAX_HEAD

    settings = Settings(egress_head_timeout=0.2)
    engine = PodmanEngine(
        SimpleNamespace(path="/usr/bin/podman"),  # type: ignore[arg-type]
        egress_limits=(32, 1000.0),
        egress_head_timeout=settings.egress_head_timeout,
    )
    head = b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
    clients = [TrickleStream(head, every=0.02) for _ in range(30)]
    with caplog.at_level(logging.DEBUG, logger="pod_exec_mcp"):
        await asyncio.gather(*(engine._serve_egress("s1", c) for c in clients))  # type: ignore[arg-type]
    for client in clients:
        assert client.written.startswith(b"HTTP/1.1 408 "), bytes(client.written[:200])
        assert client.closed and not client.read_after_answer
        assert client.taken <= MAX_HEAD + 4
    refused = [r.getMessage() for r in caplog.records if "egress refused" in r.getMessage()]
    assert len(refused) == 1 and "408" in refused[0] and "sandbox s1" in refused[0], refused


def test_the_head_bound_is_a_setting_with_a_flag_and_an_environment_variable() -> None:
    from pod_exec_mcp.cli import build_parser
    from pod_exec_mcp.config import Settings, SettingsError, load_settings
    from pod_exec_mcp.proxy import HEAD_TIMEOUT

    assert Settings().egress_head_timeout == HEAD_TIMEOUT
    args = build_parser().parse_args(["--egress-head-timeout", "2.5"])
    assert (
        load_settings({"egress_head_timeout": args.egress_head_timeout}, {}).egress_head_timeout
        == 2.5
    )
    environ = {"POD_EXEC_MCP_EGRESS_HEAD_TIMEOUT": "4"}
    assert load_settings({}, environ).egress_head_timeout == 4.0
    with pytest.raises(SettingsError, match="egress-head-timeout"):
        load_settings({"egress_head_timeout": "0"}, {})
