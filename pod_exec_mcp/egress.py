"""The egress policy of isolated sandboxes: which destinations their proxy may connect to.

Pure logic, no I/O except `is_local` (a bind probe and /proc's interface tables). The
proxy (proxy.py) asks twice: `check_name` before resolving (so a refused name is never
even looked up), then `check_address` for every address the name resolved to, and
connects only to an address that passed. A decision is made on the address actually
connected to, so a name that resolves to a private address (DNS rebinding) gains nothing.

Rules (one syntax for the operator's settings and a session's narrowing):
- `public`: any globally routable address (below) that is not of this host or its networks;
- `example.org`: that name exactly; `*.example.org`: any name under it (not itself);
- `203.0.113.0/24` or `203.0.113.7`: addresses in that range.

A destination passes a rule list when some rule matches. Every address that is not
globally routable (SPECIAL_RANGES, the IANA special-purpose registries; anything Python's
`ipaddress` does not call global; IPv6 outside global unicast 2000::/3), and every address
of this host or of a network it is attached to, passes ONLY through an explicit CIDR/IP
rule: a name rule or `public` never opens it.

An IPv6 address can carry an IPv4 address that the connection ends up at (mapped,
translated, compatible, NAT64, 6to4, Teredo: `carried_ipv4`). Such an address passes only
when it passes itself AND every IPv4 address it carries passes, so no spelling of a
private address gets through; an IPv4-mapped address is simply its IPv4 address.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PUBLIC = "public"
# RFC 1035: a name of at most 253 characters (255 octets on the wire).
MAX_HOST = 253

# Denied unless an explicit CIDR rule allows them; named in the refusal. The IANA IPv4 and
# IPv6 special-purpose address registries, the ranges not globally reachable.
SPECIAL_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a carrier-grade NAT (shared) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address (cloud metadata lives here)"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a deprecated 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved or broadcast address"),
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("::/8", "a reserved IPv6 address (where IPv4-compatible and -translated ones are)"),
    ("100::/64", "a discard-only address"),
    ("2001::/32", "a Teredo address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001:db8::/32", "a documentation address"),
    ("2002::/16", "a 6to4 address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "an SRv6 segment identifier"),
    ("fc00::/7", "a private (unique local) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a deprecated site-local address"),
    ("ff00::/8", "a multicast address"),
)
_SPECIAL = tuple((ipaddress.ip_network(net), why) for net, why in SPECIAL_RANGES)
# Where IANA allocates global unicast IPv6; nothing outside it is routed on the Internet.
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
# IPv6 forms that carry an IPv4 address a connection may end up at.
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class RuleError(ValueError):
    """A rule that cannot be parsed; the message says what a valid one looks like."""


class HostError(ValueError):
    """A destination host that is neither a host name nor an IP address literal."""


@dataclass(frozen=True)
class Rule:
    text: str
    kind: str  # "public", "name", "suffix", "cidr"
    network: IPNetwork | None = None

    def matches_name(self, host: str) -> bool:
        """Whether a name rule matches `host` (a parsed host). Never for an IP literal
        (only a CIDR rule speaks about addresses, and Python's parser takes scoped IPv6
        ones), nor for anything that is not a well-formed host name (a `%zone`, an empty
        label, over 253 characters), whatever checked it before."""
        if _is_ip(host) or not _valid_hostname(host):
            return False
        if self.kind == "name":
            return host == self.text
        if self.kind == "suffix":
            return host.endswith(self.text[1:])  # "*.example.org" -> ".example.org"
        return False


def parse_rule(text: str) -> Rule:
    """One rule; RuleError with an actionable message if it is not one."""
    raw = text.strip().lower().rstrip(".")
    if raw == PUBLIC:
        return Rule(PUBLIC, "public")
    if not raw:
        raise RuleError("an empty egress rule; give a domain, *.domain, a CIDR or `public`")
    try:
        network = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        pass
    else:
        return Rule(str(network), "cidr", network)
    wildcard = raw.startswith("*.")
    name = raw[2:] if wildcard else raw
    if "*" in name or not _valid_hostname(name):
        raise RuleError(
            f"egress rule {text!r} is not a domain (example.org), a wildcard (*.example.org: "
            "names under it), a CIDR (203.0.113.0/24), an IP address, or `public`"
        )
    return Rule(raw, "suffix" if wildcard else "name")


def parse_rules(texts: Iterable[str]) -> tuple[Rule, ...]:
    return tuple(parse_rule(t) for t in texts)


def _valid_hostname(name: str) -> bool:
    if not 0 < len(name) <= MAX_HOST:
        return False
    for label in name.split("."):
        if not 0 < len(label) <= 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            return False
    return True


def parse_host(text: str) -> str:
    """A destination host as the policy judges it and the proxy resolves it: a host name
    (lower case, no trailing dot) or an IP literal in its canonical spelling (an IPv6 one
    without brackets). HostError, with a message a client can act on, for anything else:
    empty, too long, not ASCII (no IDNA guessing here: Python's codec maps fullwidth
    digits to ASCII ones), scoped (`%zone`), or a number that resolvers would read as an
    IPv4 address in another spelling (`127.1`, `0x7f.1`, `2130706433`, `017.0.0.1`)."""
    if not text:
        raise HostError("empty host")
    if len(text) > MAX_HOST + 2:
        raise HostError(f"host longer than {MAX_HOST} characters")
    if not text.isascii() or not text.isprintable():
        raise HostError(
            "host is not printable ASCII: give an international name in its IDNA form (xn--...)"
        )
    if "%" in text:
        raise HostError("a scoped address (with a %zone) is not a destination")
    host = text.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise HostError("brackets hold an IPv6 address only")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise HostError("not an IPv6 address (and a name has no colon)") from None
    if host.endswith("."):
        host = host[:-1]
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    last = host.rpartition(".")[2]
    if last.isdigit() or (last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:])):
        # What the WHATWG URL standard and inet_aton(3) read as an IPv4 address.
        raise HostError("write an IPv4 address as four decimal numbers (a.b.c.d)")
    if not _valid_hostname(host):
        raise HostError("not a host name (letters, digits, '-' and '_' in labels of 1-63)")
    return host


def canonical(address: IPAddress) -> IPAddress:
    """The address a socket really connects to: an IPv4-mapped IPv6 address is its IPv4
    address (the kernel sends IPv4 packets), anything else itself."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def carried_ipv4(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses a connection to IPv6 `address` may end up at, through a
    translator, a tunnel or a relay: IPv4-translated (::ffff:0:0:0/96), IPv4-compatible
    (::/96), NAT64 (64:ff9b::/96, and 64:ff9b:1::/48 where every RFC 6052 position counts:
    the prefix length in use is not known here), 6to4 (2002::/16) and Teredo (2001::/32:
    its server and its de-obfuscated client)."""
    if isinstance(address, ipaddress.IPv4Address):
        return ()
    n = int(address)
    if address in _TRANSLATED or address in _NAT64 or (address in _COMPATIBLE and n > 1):
        return (ipaddress.IPv4Address(n & 0xFFFFFFFF),)
    if address in _NAT64_LOCAL:
        return tuple(ipaddress.IPv4Address(v) for v in _rfc6052_candidates(n))
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    return ()


def _rfc6052_candidates(n: int) -> tuple[int, ...]:
    """The IPv4 address at each RFC 6052 position a /48 NAT64 prefix allows (/48, /56,
    /64, /96; bits 64-71 are the reserved u-octet)."""
    return (
        ((n >> 64) & 0xFFFF) << 16 | (n >> 40) & 0xFFFF,  # /48
        ((n >> 64) & 0xFF) << 24 | (n >> 32) & 0xFFFFFF,  # /56
        (n >> 24) & 0xFFFFFFFF,  # /64
        n & 0xFFFFFFFF,  # /96
    )


def special_reason(address: IPAddress) -> str | None:
    """Why `address` is not globally routable and so denied by default (naming the range),
    or None for a global one."""
    if isinstance(address, ipaddress.IPv6Address) and address in _NAT64:
        return None  # globally reachable (IANA); the IPv4 address it carries is judged
    for network, why in _SPECIAL:
        if address.version == network.version and address in network:
            return f"{why} ({network})"
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST:
        return f"not a global unicast address (outside {_GLOBAL_UNICAST})"
    if not address.is_global:
        return "not a globally routable address (IANA special-purpose registry)"
    return None


def is_host_address(address: IPAddress) -> bool:
    """Whether `address` is one of this machine's own: binding to it succeeds only then.
    (With net.ipv4.ip_nonlocal_bind set every bind succeeds, so every address counts as
    the host's: the policy then fails closed.)"""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def host_networks(proc: Path = Path("/proc/net")) -> tuple[IPNetwork, ...]:
    """The networks this host is attached to: its directly connected IPv4 routes (no
    gateway) and the prefixes of its IPv6 addresses, read from /proc now (interfaces
    come and go: Podman creates bridges). Empty where /proc has no such tables."""
    found: list[IPNetwork] = []
    try:
        routes = (proc / "route").read_text().splitlines()[1:]
    except OSError:
        routes = []
    for line in routes:
        fields = line.split()
        if len(fields) < 8 or int(fields[2], 16) != 0 or int(fields[7], 16) == 0:
            continue  # via a gateway, or the default route
        dest, mask = (
            ipaddress.IPv4Address(struct.pack("<I", int(f, 16))) for f in (fields[1], fields[7])
        )
        found.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    try:
        addresses = (proc / "if_inet6").read_text().splitlines()
    except OSError:
        addresses = []
    for line in addresses:
        fields = line.split()
        if len(fields) >= 3:
            packed = ipaddress.IPv6Address(int(fields[0], 16))
            found.append(ipaddress.IPv6Network((packed, int(fields[2], 16)), strict=False))
    return tuple(found)


def is_local(address: IPAddress) -> bool:
    """Whether `address` is this host's own or on a network this host is attached to (its
    neighbours: on a VM, the gateway and the other machines of its subnet)."""
    if is_host_address(address):
        return True
    return any(address.version == net.version and address in net for net in host_networks())


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # The rule that decided, in words an agent can act on (named in a 403's body).
    rule: str


_ALLOWED = Decision(True, "allowed")


@dataclass(frozen=True)
class RuleSet:
    """One layer of policy: an allow list and a deny list, and who set it."""

    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    # "the operator's" / "this session's": for the messages.
    owner: str
    # Setting names, for the messages (e.g. "egress_allow (POD_EXEC_MCP_EGRESS_ALLOW)").
    allow_name: str
    deny_name: str

    def check_name(self, host: str) -> Decision | None:
        """A refusal decided by the (parsed) name alone, or None to go on to the addresses."""
        for rule in self.deny:
            if rule.matches_name(host):
                return Decision(
                    False, f"{host} matches {self.owner} {self.deny_name} rule {rule.text}"
                )
        if _is_ip(host):
            return None
        if any(r.kind in ("public", "cidr") or r.matches_name(host) for r in self.allow):
            return None
        return Decision(
            False, f"{host} is not in {self.owner} {self.allow_name} ({self._allowed()})"
        )

    def check_address(
        self, host: str, judged: Sequence[tuple[IPAddress, bool]], shown: str
    ) -> Decision:
        """The destination passes only if every judged address does (the address itself
        and each IPv4 address it carries, with whether it is local)."""
        for address, local in judged:
            decision = self._check_one(host, address, local, shown)
            if not decision.allowed:
                return decision
        return _ALLOWED

    def _check_one(self, host: str, address: IPAddress, local: bool, shown: str) -> Decision:
        for rule in self.deny:
            if rule.kind == "cidr" and _in(rule, address):
                return Decision(
                    False, f"{shown} matches {self.owner} {self.deny_name} rule {rule.text}"
                )
            if rule.kind == "public" and special_reason(address) is None and not local:
                return Decision(
                    False, f"{shown} is public, denied by {self.owner} {self.deny_name}"
                )
        if any(r.kind == "cidr" and _in(r, address) for r in self.allow):
            return _ALLOWED  # an explicit range opens even special addresses
        why = special_reason(address) or (
            "an address of this host's own or of its networks" if local else None
        )
        if why is not None:
            subject = shown if shown.startswith(str(address)) else f"{shown}: {address}"
            return Decision(
                False,
                f"{subject} is {why}, denied by default; only a CIDR rule in {self.owner} "
                f"{self.allow_name} can allow it",
            )
        if any(r.kind == "public" for r in self.allow):
            return _ALLOWED
        if any(r.matches_name(host) for r in self.allow):
            return _ALLOWED
        return Decision(
            False, f"{shown} ({host}) is not in {self.owner} {self.allow_name} ({self._allowed()})"
        )

    def _allowed(self) -> str:
        return "allowed: " + (", ".join(r.text for r in self.allow) or "nothing")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _in(rule: Rule, address: IPAddress) -> bool:
    net = rule.network
    assert net is not None
    return address.version == net.version and address in net


@dataclass(frozen=True)
class EgressPolicy:
    """The operator's rules, narrowed by any number of session layers: a destination must
    pass every layer."""

    layers: tuple[RuleSet, ...]

    @classmethod
    def from_rules(
        cls,
        allow: Sequence[str] = (PUBLIC,),
        deny: Sequence[str] = (),
        *,
        allow_name: str = "egress_allow",
        deny_name: str = "egress_deny",
    ) -> EgressPolicy:
        """The operator's policy; RuleError if a rule is malformed."""
        layer = RuleSet(
            parse_rules(allow), parse_rules(deny), "the operator's", allow_name, deny_name
        )
        return cls((layer,))

    def narrowed(self, allow: Sequence[str] | None, deny: Sequence[str] | None) -> EgressPolicy:
        """This policy with a session's own allow and deny lists on top: it can only
        refuse more (a destination must pass both). RuleError if a rule is malformed."""
        if allow is None and deny is None:
            return self
        layer = RuleSet(
            parse_rules(allow if allow is not None else (PUBLIC,)),
            parse_rules(deny or ()),
            "this session's",
            "egress_allow",
            "egress_deny",
        )
        return EgressPolicy((*self.layers, layer))

    def check_name(self, host: str) -> Decision:
        """The decision on a destination host before it is resolved; a malformed host is
        refused (the proxy answers it with 400 before it gets here)."""
        try:
            host = parse_host(host)
        except HostError as exc:
            return Decision(False, f"malformed host: {exc}")
        for layer in self.layers:
            refused = layer.check_name(host)
            if refused is not None:
                return refused
        return _ALLOWED

    def check_address(
        self, host: str, address: IPAddress, host_own: bool | None = None
    ) -> Decision:
        """The decision for connecting to `address` (which `host` resolved to), judged on
        the address itself and on every IPv4 address it carries. `host_own`: whether those
        are this machine's own or on its networks (probed for each when None)."""
        try:
            host = parse_host(host)
        except HostError as exc:
            return Decision(False, f"malformed host: {exc}")
        address = canonical(address)
        carried = carried_ipv4(address)
        shown = str(address)
        if carried:
            shown += f" (carrying IPv4 {', '.join(map(str, carried))})"
        local: Callable[[IPAddress], bool] = is_local if host_own is None else (lambda _: host_own)
        judged = [(a, local(a)) for a in (address, *carried)]
        for layer in self.layers:
            decision = layer.check_address(host, judged, shown)
            if not decision.allowed:
                return decision
        return _ALLOWED


DENY_ALL = EgressPolicy((RuleSet((), (), "the default", "egress_allow", "egress_deny"),))
