"""The egress policy of isolated sandboxes: which destinations their proxy may connect to.

Pure logic, no I/O except `is_host_address` (a bind probe). The proxy (proxy.py) asks twice:
`check_name` before resolving (so a refused name is never even looked up), then
`check_address` for every address the name resolved to, and connects only to an address
that passed. A decision is made on the address actually connected to, so a name that
resolves to a private address (DNS rebinding) gains nothing.

Rules (one syntax for the operator's settings and a session's narrowing):
- `public`: any address outside the special ranges below and not of this host;
- `example.org`: that name exactly; `*.example.org`: any name under it (not itself);
- `203.0.113.0/24` or `203.0.113.7`: addresses in that range.

A destination passes a rule list when some rule matches. Special addresses (loopback,
link-local, private, CGNAT, multicast, unspecified, reserved, this host's own) pass ONLY
through an explicit CIDR/IP rule: a name rule or `public` never opens them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PUBLIC = "public"

# Denied unless an explicit CIDR rule allows them; named in the refusal.
SPECIAL_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a carrier-grade NAT (shared) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address (cloud metadata lives here)"),
    ("172.16.0.0/12", "a private address"),
    ("192.168.0.0/16", "a private address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved or broadcast address"),
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("fe80::/10", "a link-local address"),
    ("fc00::/7", "a private (unique local) address"),
    ("ff00::/8", "a multicast address"),
)
_SPECIAL = tuple((ipaddress.ip_network(net), why) for net, why in SPECIAL_RANGES)
# IPv6 forms that carry an IPv4 address a connection may end up at.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPAT = ipaddress.ip_network("::/96")


class RuleError(ValueError):
    """A rule that cannot be parsed; the message says what a valid one looks like."""


@dataclass(frozen=True)
class Rule:
    text: str
    kind: str  # "public", "name", "suffix", "cidr"
    network: IPNetwork | None = None

    def matches_name(self, host: str) -> bool:
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
    if not 0 < len(name) <= 253:
        return False
    for label in name.split("."):
        if not 0 < len(label) <= 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            return False
    return True


def normalize_host(host: str) -> str:
    """A destination host as rules compare it: lower case, no trailing dot, IDNA for
    non-ASCII names, no brackets around an IPv6 literal."""
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host.isascii():
        with contextlib.suppress(UnicodeError):
            host = host.encode("idna").decode("ascii")
    return host


def embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address a connection to `address` really reaches, if it carries one
    (IPv4-mapped, NAT64, IPv4-compatible); else `address` itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64 or (address in _COMPAT and int(address) > 1):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def special_reason(address: IPAddress) -> str | None:
    """Why `address` is denied by default, or None for a public address."""
    for network, why in _SPECIAL:
        if address.version == network.version and address in network:
            return f"{why} ({network})"
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
        """A refusal decided by the name alone, or None to go on to the addresses."""
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

    def check_address(self, host: str, address: IPAddress, host_own: bool) -> Decision:
        real = embedded_ipv4(address)
        shown = str(address) if real == address else f"{address} (= {real})"
        for rule in self.deny:
            if rule.kind == "cidr" and _in(rule, address, real):
                return Decision(
                    False, f"{shown} matches {self.owner} {self.deny_name} rule {rule.text}"
                )
            if rule.kind == "public" and special_reason(real) is None and not host_own:
                return Decision(
                    False, f"{shown} is public, denied by {self.owner} {self.deny_name}"
                )
        if any(r.kind == "cidr" and _in(r, address, real) for r in self.allow):
            return _ALLOWED  # an explicit range opens even special addresses
        why = special_reason(real) or (
            "an address of the pod_exec_mcp server's own host" if host_own else None
        )
        if why is not None:
            return Decision(
                False,
                f"{shown} is {why}, denied by default; only a CIDR rule in {self.owner} "
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


def _in(rule: Rule, address: IPAddress, real: IPAddress) -> bool:
    net = rule.network
    assert net is not None
    return any(a.version == net.version and a in net for a in (address, real))


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
        host = normalize_host(host)
        for layer in self.layers:
            refused = layer.check_name(host)
            if refused is not None:
                return refused
        return _ALLOWED

    def check_address(
        self, host: str, address: IPAddress, host_own: bool | None = None
    ) -> Decision:
        """The decision for connecting to `address` (which `host` resolved to).
        `host_own`: whether it is this machine's own (probed when None)."""
        host = normalize_host(host)
        if host_own is None:
            host_own = is_host_address(embedded_ipv4(address))
        for layer in self.layers:
            decision = layer.check_address(host, address, host_own)
            if not decision.allowed:
                return decision
        return _ALLOWED


DENY_ALL = EgressPolicy((RuleSet((), (), "the default", "egress_allow", "egress_deny"),))
