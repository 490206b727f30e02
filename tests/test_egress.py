"""The egress policy and the proxy logic, without podman (pure logic and loopback sockets).

No test here connects anywhere but this machine's loopback: outside addresses
(169.254.169.254, 10.255.255.1, ...) are only policy inputs, and the proxy tests count the
connections the proxy attempts to prove that a refusal happens before any connect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pod_exec_mcp import agent_streams as st
from pod_exec_mcp.config import Settings, SettingsError, load_settings
from pod_exec_mcp.egress import DENY_ALL, EgressPolicy, RuleError, parse_rule

DEFAULT = EgressPolicy.from_rules()
ip = ipaddress.ip_address


@pytest.mark.parametrize(
    "address, why",
    [
        ("10.255.255.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd00::1", "unique local"),
        ("ff02::1", "multicast"),
        # IPv6 spellings of IPv4 addresses reach the IPv4 address.
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
    ],
)
def test_default_policy_denies_special_addresses(address: str, why: str) -> None:
    decision = DEFAULT.check_address("somewhere.example", ip(address), host_own=False)
    assert not decision.allowed
    assert why in decision.rule and "egress_allow" in decision.rule


def test_default_policy_allows_public_and_denies_the_hosts_own() -> None:
    for address in ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "8.8.8.8"):
        assert DEFAULT.check_address("x.example", ip(address), host_own=False).allowed
    own = DEFAULT.check_address("x.example", ip("93.184.215.14"), host_own=True)
    assert not own.allowed and "this host's own" in own.rule
    # Probed for real: this machine's loopback is its own and loopback anyway.
    assert not DEFAULT.check_address("localhost", ip("127.0.0.1")).allowed
    assert DEFAULT.check_name("anything.example").allowed


def test_only_a_cidr_rule_opens_a_special_address() -> None:
    policy = EgressPolicy.from_rules(["public", "127.0.0.2/32", "internal.example"])
    assert policy.check_address("x", ip("127.0.0.2"), host_own=True).allowed
    assert not policy.check_address("x", ip("127.0.0.1"), host_own=True).allowed
    # A name rule never opens a private address: DNS rebinding gains nothing.
    rebound = policy.check_address("internal.example", ip("10.0.0.5"), host_own=False)
    assert not rebound.allowed and "private" in rebound.rule


def test_domain_allow_list_with_wildcards() -> None:
    policy = EgressPolicy.from_rules(["deb.debian.org", "*.example.org"])
    assert policy.check_name("deb.debian.org").allowed
    assert policy.check_name("DEB.debian.org.").allowed
    assert (
        policy.check_name("a.example.org").allowed and policy.check_name("b.a.example.org").allowed
    )
    for name in ("example.org", "badexample.org", "example.org.evil.net", "pypi.org"):
        refused = policy.check_name(name)
        assert not refused.allowed
        assert f"{name} is not in the operator's egress_allow" in refused.rule
        assert "deb.debian.org, *.example.org" in refused.rule
    # An address without a CIDR rule is not allowed by a name-only list.
    assert not policy.check_address("1.2.3.4", ip("1.2.3.4"), host_own=False).allowed
    assert policy.check_address("a.example.org", ip("1.2.3.4"), host_own=False).allowed


def test_deny_list_wins_over_allow() -> None:
    policy = EgressPolicy.from_rules(["public"], ["*.evil.example", "198.51.100.0/24"])
    refused = policy.check_name("x.evil.example")
    assert not refused.allowed and "egress_deny rule *.evil.example" in refused.rule
    by_range = policy.check_address("ok.example", ip("198.51.100.9"), host_own=False)
    assert not by_range.allowed and "198.51.100.0/24" in by_range.rule
    assert policy.check_address("ok.example", ip("198.51.101.9"), host_own=False).allowed


def test_a_session_narrows_and_never_widens() -> None:
    operator = EgressPolicy.from_rules(["public"], ["blocked.example"])
    session = operator.narrowed(["pypi.org", "10.0.0.0/8", "blocked.example"], None)
    assert session.check_name("pypi.org").allowed
    # A CIDR rule lets any name through to the address check, which refuses it.
    narrowed = session.check_address("github.com", ip("140.82.121.4"), host_own=False)
    assert not narrowed.allowed and "this session's egress_allow" in narrowed.rule
    by_name = operator.narrowed(["pypi.org"], None).check_name("github.com")
    assert not by_name.allowed and "this session's egress_allow (allowed: pypi.org)" in by_name.rule
    # The session's CIDR and name do not open what the operator refuses.
    assert not session.check_address("x", ip("10.1.2.3"), host_own=False).allowed
    assert not session.check_name("blocked.example").allowed
    assert operator.narrowed(None, None) is operator
    deny_only = operator.narrowed(None, ["*.github.com"])
    assert not deny_only.check_name("api.github.com").allowed
    assert deny_only.check_name("pypi.org").allowed


def test_bad_rules_are_refused_with_a_usable_message() -> None:
    for bad in ("", "*", "exa mple.org", "a.*.org", "http://x.org/", "-bad.org"):
        with pytest.raises(RuleError, match=r"not a domain|empty"):
            parse_rule(bad)
    with pytest.raises(SettingsError, match=r"egress-allow.*not a domain"):
        load_settings({"egress_allow": "ok.org,bad rule"}, {})
    # A comma-separated string, as from the environment, is parsed into the list.
    parsed = Settings(egress_allow="public, *.x.org")  # type: ignore[arg-type]
    assert parsed.egress_allow == ["public", "*.x.org"]
    assert not DENY_ALL.check_name("anything.example").allowed


def test_network_setting_modes_and_old_booleans() -> None:
    assert Settings().network == "isolated"
    assert load_settings({}, {"POD_EXEC_MCP_NETWORK": "true"}).network == "isolated"
    assert load_settings({}, {"POD_EXEC_MCP_NETWORK": "bridge"}).network == "bridge"
    with pytest.raises(SettingsError, match="network"):
        load_settings({"network": "host"}, {})
    from pod_exec_mcp.cli import build_parser

    assert build_parser().parse_args(["--no-network"]).network == "none"
    assert build_parser().parse_args(["--network", "bridge"]).network == "bridge"


# --- the proxy over real loopback sockets ----------------------------------------------


@pytest.fixture
async def origin() -> AsyncIterator[Any]:
    """A loopback HTTP origin that records the request head it got."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.2", 0)
    server.seen = seen  # type: ignore[attr-defined]
    server.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    yield server
    server.close()


async def test_private_and_link_local_refused_before_any_connect(proxy_of: Any) -> None:
    proxy = await proxy_of(DEFAULT)
    reply = await proxy.ask(b"CONNECT 10.255.255.1:443 HTTP/1.1\r\nHost: 10.255.255.1:443\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403 Forbidden by egress policy: 10.255.255.1 is a private")
    assert b"pod_exec_mcp egress policy refused CONNECT 10.255.255.1:443" in reply
    assert b"10.0.0.0/8" in reply
    reply = await proxy.ask(
        b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 403") and b"link-local address" in reply
    assert b"169.254.0.0/16" in reply
    assert proxy.connects == []


async def test_dns_rebinding_to_a_private_address_is_refused(proxy_of: Any) -> None:
    proxy = await proxy_of(
        DEFAULT, {"rebind.example": ["127.0.0.2"], "mixed.example": ["10.0.0.1", "169.254.1.1"]}
    )
    for name in ("rebind.example", "mixed.example"):
        reply = await proxy.ask(f"CONNECT {name}:443 HTTP/1.1\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 403"), reply
    assert proxy.connects == []


async def test_refused_domain_is_not_even_resolved(proxy_of: Any) -> None:
    proxy = await proxy_of(EgressPolicy.from_rules(["allowed.example"]), {})
    reply = await proxy.ask(b"GET http://other.example/ HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403")
    assert (
        b"other.example is not in the operator's egress_allow (allowed: allowed.example)" in reply
    )
    assert proxy.resolved == [] and proxy.connects == []


async def test_plain_http_is_forwarded_in_origin_form(proxy_of: Any, origin: Any) -> None:
    proxy = await proxy_of(EgressPolicy.from_rules(["origin.test", "127.0.0.2/32"]),
                           {"origin.test": ["127.0.0.2"]})  # fmt: skip
    reply = await proxy.ask(
        f"GET http://origin.test:{origin.port}/a/b?c=d HTTP/1.1\r\nHost: origin.test:{origin.port}"
        "\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        "User-Agent: t\r\n\r\n".encode()
    )
    assert reply.endswith(b"\r\n\r\nhello") and reply.startswith(b"HTTP/1.1 200 OK")
    head = origin.seen[0].decode()
    assert head.startswith("GET /a/b?c=d HTTP/1.1\r\n")
    assert f"Host: origin.test:{origin.port}" in head and "User-Agent: t" in head
    assert "Connection: close" in head
    assert "keep-alive" not in head.lower() and "X-Hop" not in head
    assert proxy.connects == [("127.0.0.2", origin.port)]


async def test_connect_tunnels_bytes_both_ways(proxy_of: Any) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await proxy_of(EgressPolicy.from_rules(["127.0.0.2/32"]))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"CONNECT 127.0.0.2:{port} HTTP/1.1\r\n\r\nearly ".encode())
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
    writer.write(b"bytes" * 100_000)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    assert data == b"EARLY " + b"BYTES" * 100_000
    writer.close()
    server.close()


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET https://x.example/ HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT x.example HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT x.example:99999 HTTP/1.1\r\n\r\n", b"400"),
        (b"\x16\x03\x01garbage\r\n\r\n", b"400"),
        (b"GET http://x.example/ HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
        (b"GET http://unresolvable.invalid/ HTTP/1.1\r\n\r\n", b"502"),
        (b"GET http://x/ HTTP/1.1\r\nA: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    ],
)
async def test_bad_requests_get_an_answer_not_a_hang(
    proxy_of: Any, raw: bytes, status: bytes
) -> None:
    proxy = await proxy_of(EgressPolicy.from_rules(["public"]), {})

    async def resolver(host: str, port: int) -> list[Any]:
        raise OSError("Name or service not known")

    proxy.resolver = resolver
    reply = await proxy.ask(raw)
    assert reply.split(b" ")[1] == status, reply[:200]
    assert proxy.connects == []


# --- agent streams: flow control, without an agent ---------------------------------------


async def test_stream_flow_control_and_window_violation() -> None:
    sent: list[tuple[int, int, bytes]] = []

    async def send(data: bytes, more: bytes | memoryview = b"") -> None:
        frame = data + bytes(more)
        ftype, _, _, fid, length = st.HEADER.unpack(frame[:12])
        assert length == len(frame) - 12
        sent.append((ftype, fid, frame[12:]))

    got: asyncio.Queue[Any] = asyncio.Queue()

    async def handler(stream: st.AgentStream) -> None:
        await got.put(stream)
        await asyncio.sleep(3600)

    mux = st.StreamMux(send, handler, window=1000, send_window=1000)
    sid = 0x80000001
    mux.dispatch(st.T_STREAM_OPEN, sid, b"")
    stream = await got.get()
    # Writing more than the window waits for credit.
    writing = asyncio.ensure_future(stream.write(b"x" * 2500))
    await asyncio.sleep(0.05)
    assert sum(len(p) for t, _, p in sent if t == st.T_STREAM_DATA) == 1000
    assert not writing.done()
    mux.dispatch(st.T_STREAM_CREDIT_IN, sid, struct.pack(">I", 2000))
    await asyncio.wait_for(writing, 5)
    assert sum(len(p) for t, _, p in sent if t == st.T_STREAM_DATA) == 2500
    # Reading credits the agent back.
    mux.dispatch(st.T_STREAM_DATA_IN, sid, b"y" * 600)
    assert await stream.read(1000) == b"y" * 600
    assert (st.T_STREAM_CREDIT, sid, struct.pack(">I", 600)) in sent
    # An agent that ignores the window gets the stream reset, and nothing is buffered.
    mux.dispatch(st.T_STREAM_DATA_IN, sid, b"z" * 1001)
    await asyncio.sleep(0)
    with pytest.raises(ConnectionResetError, match="window"):
        await stream.read(10)
    await asyncio.sleep(0.05)
    assert any(t == st.T_STREAM_RESET and f == sid for t, f, _ in sent)
    # Frames for unknown streams are dropped, not fatal.
    mux.dispatch(st.T_STREAM_DATA_IN, 0x80000999, b"?")
    await mux.close()


async def test_splice_hands_over_the_socket_with_what_the_exchange_owes() -> None:
    """The host side of SPLICE, with the agent played here: the descriptor goes down the
    pass socket before the frame; a refusal leaves everything to the relay; once the agent
    took it, the host writes the request and the client bytes it holds (within the body's
    length) to the destination, and GO carries what is left of that length."""
    sent: list[tuple[int, int, bytes]] = []

    async def send(data: bytes, more: bytes | memoryview = b"") -> None:
        frame = data + bytes(more)
        ftype, _, _, fid, _ = st.HEADER.unpack(frame[:12])
        sent.append((ftype, fid, frame[12:]))

    got: asyncio.Queue[st.AgentStream] = asyncio.Queue()

    async def handler(stream: st.AgentStream) -> None:
        await got.put(stream)
        await asyncio.sleep(3600)

    host_pass, agent_pass = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mux = st.StreamMux(send, handler, pass_socket=host_pass)
    sid = 0x80000001
    mux.dispatch(st.T_STREAM_OPEN, sid, b"")
    stream = await got.get()
    upstream, origin = socket.socketpair()
    upstream.setblocking(False)

    # Refused: nothing reaches the destination, and the caller relays.
    splicing = asyncio.ensure_future(stream.splice(upstream, b"HEAD", 10, one_request=True))
    await asyncio.sleep(0.05)
    tag, fds, _, _ = socket.recv_fds(agent_pass, 16, 1)
    assert tag == struct.pack(">I", sid) and len(fds) == 1
    os.close(fds[0])
    assert sent[-1] == (st.T_SPLICE, sid, struct.pack(">I", st.SPLICE_ONE_REQUEST))
    mux.dispatch(st.T_SPLICED, sid, struct.pack(">I", 1) + b"no descriptor")
    assert await asyncio.wait_for(splicing, 5) is None
    origin.setblocking(False)
    with pytest.raises(BlockingIOError):
        origin.recv(100)

    # Taken: the head, then held client bytes up to the body's length (10), then GO with
    # the rest of it; the exchange is over at SPLICE_END.
    mux.dispatch(st.T_STREAM_DATA_IN, sid, b"0123456")
    splicing = asyncio.ensure_future(stream.splice(upstream, b"HEAD|", 10, one_request=True))
    await asyncio.sleep(0.05)
    os.close(socket.recv_fds(agent_pass, 16, 1)[1][0])
    mux.dispatch(st.T_STREAM_DATA_IN, sid, b"789abc")  # sent by the agent before SPLICED
    mux.dispatch(st.T_SPLICED, sid, struct.pack(">I", 0))
    await asyncio.sleep(0.05)
    assert origin.recv(100) == b"HEAD|0123456789"
    assert sent[-1] == (st.T_SPLICE_GO, sid, struct.pack(">Q", 0))
    assert not splicing.done()
    mux.dispatch(st.T_SPLICE_END, sid, struct.pack(">QQ", 15, 99))
    assert await asyncio.wait_for(splicing, 5) == (15, 99)
    await stream.close()  # the agent freed the stream: no RESET from here
    assert not any(t == st.T_STREAM_RESET for t, _, _ in sent)
    for s in (upstream, origin, agent_pass):
        s.close()
    await mux.close()


# --- the sessions layer: which policy each sandbox gets -------------------------------------


async def test_sessions_set_each_sandbox_its_policy(tmp_path: Any) -> None:
    from fake_engine import FakeEngine

    from pod_exec_mcp.instances import Instance
    from pod_exec_mcp.sessions import SessionError, Sessions

    instance = Instance.acquire(tmp_path)
    try:
        engine = FakeEngine()
        sessions = Sessions(engine, Settings(egress_allow=["public"], warm_pool=0), instance)
        plain = sessions.explicit(None, await sessions.create_explicit(None))
        narrow = sessions.explicit(None, await sessions.create_explicit(None, ["pypi.org"], None))
        assert plain.sandbox is not None and narrow.sandbox is not None
        assert engine.egress[plain.sandbox.name].check_name("github.com").allowed
        refused = engine.egress[narrow.sandbox.name].check_name("github.com")
        assert not refused.allowed and "this session's egress_allow" in refused.rule
        with pytest.raises(SessionError, match="not a domain"):
            await sessions.create_explicit(None, ["bad rule"], None)
        bridge = Sessions(FakeEngine(), Settings(network="bridge"), instance)
        with pytest.raises(SessionError, match="need the isolated network mode"):
            await bridge.create_explicit(None, ["pypi.org"], None)
        await sessions.close()
        await bridge.close()
    finally:
        instance.release()
