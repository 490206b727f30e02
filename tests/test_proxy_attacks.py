"""Attacks on the egress proxy and its policy (issue 22), without podman.

Every test here attacks one defence: address spellings and special ranges, malformed hosts,
request smuggling, log injection and floods, fairness between sandboxes. No test connects
anywhere but this machine's loopback: outside addresses are policy inputs only, and the
proxy's resolver and connector are recorded, so a refusal is proven to happen before any
lookup or connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pod_exec_mcp.egress import EgressPolicy
from pod_exec_mcp.proxy import SocketStream, connect, serve_connection

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


class Recorder:
    """The proxy behind a loopback listener, recording every lookup and connection."""

    def __init__(self, policy: EgressPolicy, names: dict[str, list[str]] | None = None) -> None:
        self.policy = policy
        self.names = names or {}
        self.resolved: list[str] = []
        self.connects: list[tuple[str, int]] = []
        self.port = 0

    async def resolver(self, host: str, port: int) -> list[Any]:
        self.resolved.append(host)
        try:
            return [ip(host)]
        except ValueError:
            return [ip(a) for a in self.names.get(host, [])]

    async def connector(self, address: Any, port: int) -> Any:
        self.connects.append((str(address), port))
        return await connect(address, port)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(
            SocketStream(reader, writer),
            self.policy,
            resolver=self.resolver,
            connector=self.connector,
        )

    async def ask(self, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return data


@pytest.fixture
async def proxy_of() -> AsyncIterator[Any]:
    servers: list[asyncio.Server] = []

    async def start(policy: EgressPolicy, names: dict[str, list[str]] | None = None) -> Recorder:
        proxy = Recorder(policy, names)
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        servers.append(server)
        proxy.port = server.sockets[0].getsockname()[1]
        return proxy

    yield start
    for server in servers:
        server.close()


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
