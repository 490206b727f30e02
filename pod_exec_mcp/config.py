"""Every setting of the server, in one model.

Each field's docstring is its documentation: `--help`, the README's settings table and the
error messages all read it from here. A field is set, in rising priority, by its default,
its environment variable (`env_var()`), and its command-line flag (`--field-name`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "POD_EXEC_MCP_"

# The two settings the MCP world already has names for keep those names.
_ENV_OVERRIDES = {"host": "MCP_HOST", "port": "MCP_PORT"}

# What podman accepts for --memory (go-units' RAMInBytes): a number, an optional unit, an
# optional "i" and "b", e.g. 512m, 2g, 1.5GiB, 2 g.
_PODMAN_SIZE = re.compile(r"^\d+(\.\d+)* ?[kmgtp]?i?b?$", re.IGNORECASE)
# What the kernel accepts for a tmpfs size= option (memparse, or a share of RAM): 512m, 50%.
_TMPFS_SIZE = re.compile(r"^(\d+[kmgtpe]?|\d+%)$", re.IGNORECASE)


class Settings(BaseModel):
    """Configuration of one pod_exec_mcp server."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", frozen=True)

    # --- HTTP -----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address to listen on. Anything but loopback requires an auth token."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to listen on; MCP is served at /mcp."""

    allowed_hosts: list[str] = Field(default_factory=list)
    """Extra Host header values to accept (comma-separated), besides loopback names and the
    bound address. Host/Origin protection against DNS rebinding is always on."""

    allowed_origins: list[str] = Field(default_factory=list)
    """Extra browser Origins to accept (comma-separated), e.g. https://app.example.com."""

    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=65536)
    """Largest HTTP request body accepted; larger ones get 413 before they are parsed."""

    header_timeout: float = Field(default=10.0, gt=0)
    """Seconds a client may take to send a request's headers (on a new or kept-alive
    connection) before the connection is closed: slow or half-open clients cannot hold
    sockets for ever."""

    max_pending_connections: int = Field(default=256, ge=1)
    """Most connections that have not yet finished their request headers. Past it the
    oldest such connection is closed, so half-open sockets cannot exhaust file descriptors
    while real clients, which send their headers at once, still get in."""

    max_legacy_sessions: int = Field(default=1000, ge=1)
    """Most live legacy (2025-11-25, Mcp-Session-Id) MCP sessions. Past it, a new
    `initialize` closes the oldest session that never made a call; only when every one is
    in use does it get HTTP 503 with an explanation."""

    max_legacy_sessions_per_client: int = Field(default=0, ge=0)
    """Most live legacy MCP sessions of one principal (token), and of one client address
    (not loopback, where every client of the host is one address), with the same rule
    within that share. 0: half of max_legacy_sessions (at least 1)."""

    legacy_unused_timeout: float = Field(default=60.0, gt=0)
    """Seconds a legacy MCP session may stay open without making a call (any request but
    initialize and ping) before it is closed: initializes that are never used cannot hold
    places that working clients need. Its client gets 404 and must initialize again."""

    auth_token: str | None = None
    """Bearer token clients must send. If unset, the token file is read when it exists.
    Several tokens may be given, comma-separated; each is its own principal."""

    auth_token_file: str | None = None
    """File holding the bearer token(s), one per line. Default: auth_token in the user
    config dir (see `pod_exec_mcp --generate-token`)."""

    # --- Sandboxes ------------------------------------------------------------------------
    image: str = "pod_exec_mcp_base"
    """Image every sandbox is started from. Build the default with `pod_exec_mcp_build`."""

    podman: str = "podman"
    """The podman executable (a name looked up on PATH, or a path)."""

    exec_channel: Literal["agent", "podman-exec"] = "agent"
    """How commands reach a sandbox: `agent`, one long-lived exec agent per sandbox
    (milliseconds per command, kills that cannot be escaped; falls back to podman exec
    where the agent cannot start), or `podman-exec`, one `podman exec` per command."""

    agent_image: str = "pod_exec_mcp_agent"
    """Image holding the static exec agent, mounted read-only into every sandbox (built by
    `pod_exec_mcp_build` with the sandbox image). Unused with exec_channel podman-exec."""

    max_sandboxes: int = Field(default=50, ge=1)
    """Most sandboxes alive at once. Past it, new sessions get an error; none is evicted."""

    warm_pool: int = Field(default=0, ge=0, le=16)
    """Sandboxes kept started ahead of need, so that a new session's first command skips
    `podman run`. They come on top of max_sandboxes, and carry the session label `pool`
    (labels cannot change once started). 0 turns the pool off."""

    idle_timeout: float = Field(default=1800.0, gt=0)
    """Seconds a sandbox may go unused before it is removed (its session then ends)."""

    legacy_idle_timeout: float = Field(default=300.0, gt=0)
    """Seconds the implicit sandbox of a legacy MCP session may go unused before it is
    removed: one-shot clients (the Inspector CLI, an SDK's close() without terminating the
    session) never end their MCP session. A returning client is told and gets a new one."""

    sandbox_lifetime: float = Field(default=86400.0, ge=0)
    """Seconds after which a sandbox's own init exits even if this server died without
    cleaning up: the last line of defence against leaks. 0 means no bound."""

    memory: str = "2g"
    """Memory limit of each sandbox (podman --memory); tmpfs mounts count against it."""

    cpus: float = Field(default=1.0, gt=0)
    """CPU limit of each sandbox (podman --cpus)."""

    pids_limit: int = Field(default=1024, ge=16)
    """Most processes in one sandbox (podman --pids-limit); contains fork bombs."""

    nofile: int = Field(default=4096, ge=64)
    """Open-file limit in each sandbox (soft = hard). Set explicitly because Podman fills
    unset rlimits with values many hosts refuse."""

    nproc: int = Field(default=4096, ge=16)
    """Process rlimit in each sandbox (soft = hard), set for the same reason as nofile."""

    network: Literal["isolated", "bridge", "none"] = "isolated"
    """Sandbox networking. `isolated`: no network device but loopback; HTTP(S) leaves only
    through the server's egress proxy (HTTP_PROXY in the sandbox), checked against
    egress_allow/egress_deny; nothing reaches other sandboxes, this host or private
    ranges; no ping, ssh, UDP or raw DNS. `bridge`: Podman's default network, raw TCP/UDP,
    NOT isolated from other sandboxes or this host. `none`: no network at all.
    `--no-network` means none."""

    egress_allow: list[str] = Field(default_factory=lambda: ["public"])
    """Destinations the egress proxy may connect to (comma-separated): `public` (any
    globally routable address, not of this host or its networks; IPv4 inside IPv6 is
    judged too), domains (`example.org`), wildcards (`*.example.org`: names under it),
    CIDRs or IPs. Only a CIDR/IP rule opens a non-public address (e.g. a package mirror
    in a documentation range). Network mode isolated only."""

    egress_deny: list[str] = Field(default_factory=list)
    """Destinations the egress proxy refuses even if egress_allow lets them through
    (comma-separated domains, wildcards, CIDRs or IPs)."""

    egress_max_connections: int = Field(default=24, ge=1, le=32)
    """Most egress proxy connections one sandbox may have open at once; past it a new one
    gets 503 naming this bound, so one sandbox cannot take the proxy from the others (at
    most 32: the agent channel's own stream cap)."""

    egress_connections_per_second: float = Field(default=50.0, gt=0)
    """New egress proxy connections one sandbox may open per second, on average (bursts
    of as many pass); past it a new one gets 429 naming this bound."""

    egress_head_timeout: float = Field(default=10.0, gt=0)
    """Seconds the whole head of one egress proxy request may take to arrive; past it
    the request gets 408 naming this bound and its connection is closed, so a sandbox that
    sends its requests a byte at a time (slowloris) holds nothing for long."""

    strict: bool = False
    """Strict profile: --cap-drop=ALL, read-only root with tmpfs /workspace and /tmp, and
    network none, whatever `network` says."""

    tmpfs_size: str = "512m"
    """Size of each tmpfs in the strict profile (a number with an optional k, m or g; or a
    percentage of RAM, e.g. 50%)."""

    extra_run_args: list[str] = Field(default_factory=list)
    """Extra `podman run` arguments for what we did not foresee, shell-quoted in one
    string, e.g. "--cap-add=NET_RAW --env FOO=bar"."""

    # --- Containment (what a sandbox may take from the host) ------------------------------
    runtime: str | None = None
    """OCI runtime for sandboxes (podman --runtime): a name Podman knows or a path.
    `runsc` runs every sandbox under gVisor, a user-space kernel. Default: Podman's own."""

    userns: Literal["auto", "host"] = "auto"
    """User namespace of each sandbox. `auto`: sandbox root is an unprivileged host id
    (podman --userns=auto); the host needs sub-id ranges for the `containers` user (the
    server says how at start-up). `host`: sandbox root is host root (not recommended).
    gVisor (`runtime` runsc) always uses `host`: its own kernel is the boundary there."""

    disk_limit: str = "10g"
    """Disk each sandbox may fill (its root file system, so /workspace, /tmp and all that
    apt-get installs, and its /etc/hosts and the like; bytes and inodes), enforced by the
    kernel: Podman's storage quota (overlay on XFS with pquota), else a root disk per
    sandbox (a loop disk the server makes in `disk_dir`; local Podman, server as root).
    The server refuses to start where neither works: then set 0 (no limit) or use
    `strict` (everything writable is a tmpfs, bounded by memory). 0 turns the limit off."""

    disk_dir: str | None = None
    """Directory where the server keeps sandboxes' root disks and the image files they
    share (root_disk.py). Default: `disks` in the server's state dir. Its file system
    holds the disks' sparse files, so admission control checks its free space."""

    headroom_memory: str = "256m"
    """Memory (MemAvailable) the host must still have after a new sandbox took its whole
    `memory`; otherwise the sandbox is refused. Admission control, like the next two."""

    headroom_pids: int = Field(default=512, ge=0)
    """Free pids (below kernel.pid_max) the host must still have after a new sandbox took
    its whole `pids_limit`; otherwise the sandbox is refused."""

    headroom_disk: str = "1g"
    """Free disk where Podman stores containers that must remain after a new sandbox
    filled its `disk_limit`; otherwise the sandbox is refused."""

    sweep_interval: float = Field(default=60.0, ge=0)
    """Seconds between sweeps, by a running server, of the containers of dead servers of
    its owner (besides the sweep at start-up). 0 turns the periodic sweep off."""

    # --- Commands -------------------------------------------------------------------------
    default_timeout: float = Field(default=30.0, gt=0)
    """Seconds a command may run when the call gives no timeout. Below the ~60 s after
    which common MCP clients give up on a call."""

    max_timeout: float = Field(default=600.0, gt=0)
    """Largest timeout a call may ask for, in seconds."""

    background_after: float = Field(default=40.0, ge=0)
    """Seconds after which a shell_exec still running returns at once and goes on as a
    background job (read_job), so that clients that give up at 60 s lose nothing. A call
    may set its own. 0: never."""

    kill_grace: float = Field(default=3.0, ge=0)
    """Seconds between SIGTERM and SIGKILL when a command is stopped."""

    max_output_bytes: int = Field(default=65536, ge=1024, le=262144)
    """Output kept per call; past it the head and tail are kept and the middle is cut.
    Capped well below the 1 MiB SSE event size that fastmcp clients accept."""

    max_spill_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    """Most bytes the sandbox keeps in the file of one cut call's or one job's whole
    output: past it the file holds the first and the last half, with a line between saying
    how much was cut. 0: every byte (one `yes` can then fill the sandbox's disk)."""

    max_spill_total_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Most bytes the output files and finished jobs' logs of one sandbox hold together;
    past it the oldest are deleted first. 0: no bound on the total."""

    max_command_bytes: int = Field(default=100_000, ge=1, le=120_000)
    """Longest command accepted, in UTF-8 bytes (Linux caps one argument at 128 KiB)."""

    max_concurrent_execs: int = Field(default=16, ge=1)
    """Commands running at once across the whole server; more calls wait their turn."""

    max_execs_per_session: int = Field(default=4, ge=1)
    """Commands of one session running at once; more wait their turn, so that one session
    cannot take every slot of max_concurrent_execs."""

    max_sandboxes_per_principal: int = Field(default=0, ge=0)
    """Most sandboxes one authenticated principal (token) may hold, so that one token
    cannot take all of max_sandboxes. 0: half of max_sandboxes (at least 1). Without auth
    there is a single principal and only max_sandboxes applies."""

    max_snapshots_per_principal: int = Field(default=10, ge=0)
    """Most file-system snapshots (snapshot_session) one principal may keep; past it
    snapshot_session says so until one is deleted (delete_snapshot). Snapshots are images
    in Podman's storage and survive server restarts. 0 turns snapshots off (forks still
    work: their passing copy is removed once they started)."""

    max_snapshot_bytes: str = "20g"
    """Most bytes all snapshots of this server's state dir may take together (each counts
    what it takes of its own: a whole root file system where sandboxes have root disks,
    the changed files where Podman commits them). A snapshot that would pass it is refused
    (and not kept)."""

    progress_interval: float = Field(default=5.0, gt=0)
    """Seconds between progress notifications while a command runs."""

    persistent_shell: bool = True
    """Consecutive shell_exec calls of a session behave like one terminal: the working
    directory and exported variables carry over (each call is still a fresh /bin/sh -lc)."""

    max_jobs_per_session: int = Field(default=8, ge=1)
    """Background jobs (start_job) one session may have running at once."""

    max_kept_jobs_per_session: int = Field(default=100, ge=1)
    """Finished background jobs per session whose unread output and exit status are kept
    for read_job (each holds up to max_output_bytes). Past it the oldest finished job is
    dropped; read_job then says so, with its exit status and its log file in the sandbox."""

    idempotency_keys_per_session: int = Field(default=100, ge=1)
    """Results of calls with an idempotency_key that one session (or, for create_session,
    one principal) keeps, so that a re-sent call returns the first one's result instead of
    running again; past it the oldest are forgotten. All sessions together keep at most
    64 MiB of such results."""

    idempotency_key_ttl: float = Field(default=900.0, gt=0)
    """Seconds an idempotency_key's result is kept; a repeat after that runs again."""

    max_file_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest file read_file reads or write_file writes, in bytes."""

    # --- Operating ------------------------------------------------------------------------
    log_format: Literal["auto", "text", "json"] = "auto"
    """Log format of everything the server logs (ours, uvicorn's, fastmcp's): text (one
    line per event) or json (one object per line). auto: text on a terminal, else json."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe log level written. The audit trail is logged at info."""

    audit_command_chars: int = Field(default=1000, ge=0)
    """Most characters of a command the audit trail records (longer ones are cut, their
    length kept; the log cuts every field at 4,096 anyway). 0 leaves command text out of
    the logs altogether."""

    @field_validator("network", mode="before")
    @classmethod
    def _network_from_bool(cls, value: Any) -> Any:
        # The setting was a boolean before the isolated mode existed: on meant a network
        # (now the isolated one), off meant none.
        if isinstance(value, bool):
            return "isolated" if value else "none"
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return "isolated"
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return "none"
        return value

    @field_validator("egress_allow", "egress_deny", mode="after")
    @classmethod
    def _check_egress_rules(cls, value: list[str]) -> list[str]:
        from pod_exec_mcp.egress import parse_rules

        parse_rules(value)  # a RuleError (ValueError) names the bad rule
        return value

    @field_validator(
        "allowed_hosts", "allowed_origins", "egress_allow", "egress_deny", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("memory")
    @classmethod
    def _podman_size(cls, value: str) -> str:
        if not _PODMAN_SIZE.match(value.strip()):
            raise ValueError(
                f"{value!r} is not a size podman accepts: a number with an optional unit "
                "b, k, m or g (e.g. 512m, 2g)"
            )
        return value.strip()

    @field_validator("tmpfs_size")
    @classmethod
    def _tmpfs_size(cls, value: str) -> str:
        if not _TMPFS_SIZE.match(value.strip()):
            raise ValueError(
                f"{value!r} is not a tmpfs size: a whole number with an optional unit "
                "k, m or g (e.g. 512m), or a percentage of RAM (e.g. 50%)"
            )
        return value.strip()

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator(
        "memory", "disk_limit", "headroom_memory", "headroom_disk", "max_snapshot_bytes"
    )
    @classmethod
    def _size_in_bytes(cls, value: str) -> str:
        parse_size(value)  # admission control computes with these
        return value.strip()

    @field_validator("extra_run_args", mode="before")
    @classmethod
    def _split_shell_words(cls, value: Any) -> Any:
        if isinstance(value, str):
            return shlex.split(value)
        return value

    @property
    def binds_loopback(self) -> bool:
        """Whether `host` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


# What _PODMAN_SIZE accepts, as a number (k, m, g... with an optional i and b: binary).
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtp]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a Podman-style size such as `512m` or `10g` (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 512m or 10g")
    number, unit = match.groups()
    return int(float(number) * 1024 ** "bkmgtp".index(unit.lower() or "b"))


def env_var(field_name: str) -> str:
    """The environment variable that sets a field."""
    return _ENV_OVERRIDES.get(field_name, ENV_PREFIX + field_name.upper())


def cli_flag(field_name: str) -> str:
    """The command-line flag that sets a field."""
    return "--" + field_name.replace("_", "-")


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the variable or flag at fault."""


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the environment, with `overrides` (from flags) taking precedence."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = environ.get(env_var(name))
        if raw is not None and raw != "":
            values[name] = raw
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            where = (
                f"{cli_flag(field)} / {env_var(field)}" if field in Settings.model_fields else field
            )
            problems.append(f"{where}: {error['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def settings_table() -> str:
    """The Markdown table of every setting, as the README shows it (a test keeps it in sync)."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default) or "(none)"
        elif default is None:
            default = "(none)"
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{cli_flag(name)}` | `{env_var(name)}` | `{default}` | {meaning} |")
    return "\n".join(rows)
