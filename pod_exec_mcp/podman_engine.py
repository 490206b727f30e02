"""The Podman engine: sandboxes are long-lived Podman containers.

`run_arguments` turns a SandboxSpec into `podman [global options] run ...` arguments (how
a sandbox starts); `PodmanEngine.run` runs one command in it over its exec agent, or
through `podman exec` (how a command runs). Before each start the engine checks the host's
headroom (admission.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import re
import secrets
import socket
import subprocess
import tarfile
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pod_exec_mcp import host_procs
from pod_exec_mcp.admission import Headroom, check_headroom, check_snapshot_headroom
from pod_exec_mcp.agent_channel import (
    AgentChannel,
    AgentCommandError,
    AgentError,
    AgentRun,
    TakeOver,
    fd_serve_argv,
    init_command,
    mount_arguments,
    serve_argv,
)
from pod_exec_mcp.agent_streams import AgentStream
from pod_exec_mcp.config import parse_size
from pod_exec_mcp.egress import DENY_ALL, EgressPolicy
from pod_exec_mcp.engine import (
    EXEC_ID_ENV,
    TIMEOUT_STATUS,
    EngineError,
    OutputCallback,
    ProgressCallback,
    RunRequest,
    RunResult,
    Sandbox,
    SandboxBroken,
    SandboxInfo,
    SandboxSpec,
    SnapshotInfo,
    is_gvisor,
)
from pod_exec_mcp.output import BoundedOutput, notice
from pod_exec_mcp.podman import (
    LABEL_SESSION,
    LABEL_SNAPSHOT,
    LABEL_SNAPSHOT_BASE,
    Podman,
    PodmanError,
)
from pod_exec_mcp.proxy import HEAD_TIMEOUT, ConnectionGate, RefusalLog, serve_connection
from pod_exec_mcp.root_disk import (
    USERNS_SIZE,
    ImageConfig,
    RootDisk,
    RootDiskError,
    RootDisks,
    root_disk_unavailable,
)

log = logging.getLogger(__name__)

# Network mode isolated: the agent's egress proxy inside every sandbox, and the environment
# that points apt, curl, pip, git and npm at it (curl reads only the lower-case http_proxy;
# others read either case).
PROXY_ADDRESS = "127.0.0.1"
PROXY_PORT = 3128
PROXY_URL = f"http://{PROXY_ADDRESS}:{PROXY_PORT}"
PROXY_ENV = {
    "HTTP_PROXY": PROXY_URL,
    "HTTPS_PROXY": PROXY_URL,
    "http_proxy": PROXY_URL,
    "https_proxy": PROXY_URL,
    "NO_PROXY": "localhost,127.0.0.1,::1",
    "no_proxy": "localhost,127.0.0.1,::1",
}

# Runs inside the container. The first output line is the shell's PID: podman exec makes it
# the leader of its own session and process group, so it names the group to kill. stderr
# joins stdout inside the container, which keeps their true order; then the shell becomes
# `/bin/sh -lc COMMAND` (same PID), so COMMAND runs exactly as a login shell would run it.
_EXEC_WRAPPER = 'echo "$$"; exec 2>&1; exec /bin/sh -lc "$1"'

# Runs inside the container, in one exec: SIGTERM to the command's process group and to
# every process carrying its EXEC_ID_ENV; wait up to the grace period (in tenths of a second)
# for them to go; SIGKILL whatever is left, repeating until nothing is, so that processes
# forked meanwhile are caught too. Exits as soon as nothing is left. Needs only sh, tr, grep.
_KILL_SCRIPT = f"""
pgid=$1 id=$2 ticks=$3
signal_all() {{
  found=1
  if [ -n "$pgid" ]; then kill -s "$1" -- "-$pgid" 2>/dev/null && found=0; fi
  for d in /proc/[0-9]*; do
    p=${{d#/proc/}}
    [ "$p" = "$$" ] && continue
    if tr '\\0' '\\n' < "$d/environ" 2>/dev/null | grep -qxF "{EXEC_ID_ENV}=$id"; then
      kill -s "$1" "$p" 2>/dev/null && found=0
    fi
  done
  return $found
}}
signal_all TERM || exit 0
while [ "$ticks" -gt 0 ]; do
  sleep 0.1
  signal_all 0 || exit 0
  ticks=$((ticks - 1))
done
rounds=0
while signal_all KILL && [ "$rounds" -lt 50 ]; do sleep 0.1; rounds=$((rounds + 1)); done
exit 0
"""

# The names the agent gives itself (prctl PR_SET_NAME in serve.c and supervisor.c): what a
# process must be called before the engine kills it by pid.
AGENT_COMM = "pem-agent"
SUPERVISOR_COMM = "pem-supervisor"

# Runs inside the container: SIGKILL process $1 if it is named $2 (and, with $3 = stopped,
# only while it is stopped). The take-over's fallback where the sandbox's processes are not
# this host's (gVisor, remote Podman).
_KILL_NAMED_SCRIPT = """
[ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || exit 0
if [ "$3" = stopped ]; then
  read -r stat < "/proc/$1/stat" || exit 0
  state=${stat##*") "}
  case "${state%% *}" in T|t) ;; *) exit 0 ;; esac
fi
kill -KILL "$1" 2>/dev/null
exit 0
"""

# How long a stopped command's output may take to drain after the kill before we give up on
# the podman client, and how long the kill exec may take beyond the grace period.
_DRAIN_AFTER_KILL = 5.0
_KILL_EXEC_TIMEOUT = 15.0

# Exit statuses that podman exec also uses for its own failures (container gone, runtime
# error). Only for these do we spend an inspect to tell which it was.
_AMBIGUOUS_STATUSES = frozenset({125, 137, 255})


async def agent_volume(
    podman: Podman,
    agent_image: str,
    rlimits: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
) -> str:
    """A volume holding the agent binary, for sandboxes to mount read-only; one per agent
    image (its name carries the image id, so a rebuilt agent gets a new volume).

    Filled by the agent itself (`agent install`, an atomic rename) in a throw-away
    container of its own image: nothing but `podman run`, so it works through remote
    Podman too, and filling again (each server start does) is harmless. `labels` go on
    that container: a server killed mid-fill leaves it for the orphan sweep to find."""
    done = await podman.run("image", "inspect", "--format", "{{.Id}}", agent_image)
    volume = f"pod_exec_mcp_agent_{done.stdout.decode().strip()[:12]}"
    if (await podman.run("volume", "exists", volume, check=False)).returncode != 0:
        # (No --ignore on Podman 4.3: a server creating it at the same moment wins.)
        created = await podman.run("volume", "create", volume, check=False)
        if created.returncode != 0 and "already exists" not in created.error_text:
            raise PodmanError(f"podman volume create failed: {created.error_text}")
    # Named and removed here, not --rm: through remote Podman 4.3 the attached client may
    # look for a container that --rm already removed ("no such container").
    filler = f"{volume}_fill_{secrets.token_hex(3)}"
    try:
        await podman.run(
            "run", "--name", filler, "--network=none", "--userns=host", *rlimits,
            *_label_arguments(labels or {}), "--volume", f"{volume}:/install", agent_image,
            "/agent", "install", "/install/agent",
        )  # fmt: skip
    finally:
        await podman.remove(filler)
    return volume


def _label_arguments(labels: Mapping[str, str]) -> list[str]:
    return [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]


def _rlimit_arguments(spec: SandboxSpec) -> list[str]:
    # Both rlimits, always: Podman 4.3 fills any unset one with 1048576, which hosts
    # without CAP_SYS_RESOURCE refuse.
    return [
        "--ulimit", f"nofile={spec.nofile}:{spec.nofile}",
        "--ulimit", f"nproc={spec.nproc}:{spec.nproc}",
    ]  # fmt: skip


@dataclass(frozen=True)
class PodmanFacts:
    """What `podman info` says that the start-up checks need."""

    graph_root: str
    driver: str
    backing: str
    # The cgroup controllers Podman can set limits with; None where it does not say.
    cgroup_controllers: tuple[str, ...] | None
    # Whether Podman's storage is on another host (CONTAINER_HOST, --remote).
    remote: bool = False

    def root_disk_unavailable(self) -> str | None:
        """Why sandboxes here cannot have root disks (root_disk.py); None if they can."""
        return root_disk_unavailable(self.driver, not self.remote)

    def disk_limit_by_root_disk(self) -> bool:
        """Whether sandboxes get their disk limit from a root disk of their own rather than
        from `--storage-opt size=`, which only overlay on XFS mounted with pquota enforces."""
        xfs = self.driver == "overlay" and self.backing.lower() == "xfs"
        quota = xfs and (self.remote or has_project_quota(self.graph_root))
        return not quota and self.root_disk_unavailable() is None


def has_project_quota(path: str, mountinfo: str | None = None) -> bool:
    """Whether the file system holding `path` is mounted with (enforced) project quotas,
    by this host's /proc/self/mountinfo or the given text."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as file:
                mountinfo = file.read()
        except OSError:
            return False
    best, options = "", ""
    for line in mountinfo.splitlines():
        fields = line.split()
        # Field 5 is the mount point; the super block's options come last.
        point = fields[4] if len(fields) > 4 else ""
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if point and inside and len(point) >= len(best):
            best, options = point, fields[-1]
    return any(o in ("prjquota", "pquota") for o in options.split(","))


async def podman_facts(podman: Podman) -> PodmanFacts:
    done = await podman.run("info", "--format", "json")
    info = json.loads(done.stdout)
    store = info.get("store", {})
    status = store.get("graphStatus") or {}
    host = info.get("host") or {}
    controllers = host.get("cgroupControllers")
    return PodmanFacts(
        graph_root=store.get("graphRoot", ""),
        driver=store.get("graphDriverName", ""),
        backing=status.get("Backing Filesystem", ""),
        cgroup_controllers=None if controllers is None else tuple(controllers),
        remote=bool(host.get("serviceIsRemote")),
    )


def global_arguments(spec: SandboxSpec) -> list[str]:
    """The `podman` global options (before `run`) a sandbox needs: its OCI runtime."""
    if not spec.runtime:
        return []
    args = ["--runtime", spec.runtime]
    if is_gvisor(spec.runtime):
        # runsc cannot start in the root network namespace that Podman 4 hands it. `host`
        # passes the container's own netns (set up by Podman: the bridge); `none` is
        # gVisor's own netstack with loopback only, which the isolated mode needs (its
        # proxy listens on 127.0.0.1; with `host` over Podman's empty netns loopback is
        # unreachable).
        args += ["--runtime-flag", "network=host" if spec.network == "bridge" else "network=none"]
    return args


def run_arguments(
    spec: SandboxSpec, agent_volume: str | None = None, root: RootDisk | None = None
) -> list[str]:
    """The `podman` arguments that start one sandbox: global options, then `run ...`.
    With `root`, the sandbox runs on that root disk (root_disk.py) instead of a writable
    layer in Podman's storage: the disk limit then needs nothing of the storage."""
    # With the agent, its `init` mode is PID 1 (zombie reaper and lifetime bound, immune
    # to signals from inside); without it, podman's own init runs a plain sleep.
    init = [] if agent_volume else ["--init"]
    args = [*global_arguments(spec), "run", "--detach", "--rm", *init, "--name", spec.name]
    args += _label_arguments(spec.labels)
    args += [
        "--memory", spec.memory,
        "--cpus", f"{spec.cpus:g}",
        "--pids-limit", str(spec.pids_limit),
        *_rlimit_arguments(spec),
        "--security-opt", "no-new-privileges",
        # Nothing the sandbox writes to its stdout/stderr (e.g. /proc/1/fd/1) reaches a log
        # file on the host: an unbounded k8s-file log filled the host's disk.
        "--log-driver", "none",
    ]  # fmt: skip
    if root is not None:
        # Its own id range (--uidmap), host name and run-directory files.
        args += root.podman_arguments()
    elif spec.userns and not is_gvisor(spec.runtime):
        # Sandbox root becomes an unprivileged host id; the image's ids are shifted with it.
        # (runsc of 2022 cannot start id-mapped containers; gVisor's kernel is its boundary.)
        args.append(f"--userns=auto:size={USERNS_SIZE}")
    if spec.disk_limit and root is None:
        # Enforced by the storage driver (XFS project quota) on the writable layer, which
        # holds /workspace and /tmp too; preflight.py checks at start-up that it can here.
        args += ["--storage-opt", f"size={spec.disk_limit}"]
    if spec.strict:
        args += [
            "--cap-drop=ALL",
            "--read-only",
            "--tmpfs", f"/workspace:rw,size={spec.tmpfs_size},mode=1777",
            "--tmpfs", f"/tmp:rw,size={spec.tmpfs_size},mode=1777",
        ]  # fmt: skip
    if spec.network in ("none", "isolated"):
        # isolated: only loopback in the sandbox; its one way out is the agent's proxy,
        # whose connections the server makes (and checks) on the host.
        args.append("--network=none")
    if spec.network == "isolated":
        for name, value in PROXY_ENV.items():
            args += ["--env", f"{name}={value}"]
    if agent_volume:
        # Read-only, out of reach of the sandbox's root, and in the engine's own storage,
        # so it works for any sandbox image and through remote Podman too.
        args += mount_arguments(agent_volume)
    args += spec.extra_run_args
    source = ["--rootfs", str(root.path)] if root is not None else [spec.image]
    # The init's own lifetime bound: if this server dies without cleaning up, the
    # container still exits (and --rm removes it) after `lifetime` seconds.
    if agent_volume:
        args += [*source, *init_command(spec.lifetime)]
    else:
        lifetime = f"{spec.lifetime:.0f}" if spec.lifetime else "infinity"
        args += [*source, "sleep", lifetime]
    return args


def gets_root_disk(spec: SandboxSpec, root_disks: RootDisks | None) -> bool:
    """Whether a sandbox of `spec` runs on a root disk of its own: where the host gives
    them (PodmanFacts.disk_limit_by_root_disk), and only with a disk limit."""
    return root_disks is not None and spec.disk_limit is not None


async def build_root_disk(
    root_disks: RootDisks,
    spec: SandboxSpec,
    hosts: dict[str, str] | None = None,
    copy_of: RootDisk | None = None,
) -> RootDisk:
    """The root disk of a sandbox of `spec`, its /etc/hosts naming `hosts` (name ->
    address) besides localhost; with `copy_of`, over that root's image with a copy of its
    changes (a fork). RootDiskError if it cannot be made."""
    assert spec.disk_limit is not None
    # gVisor's kernel is its boundary (no user namespace: see run_arguments).
    userns = spec.userns and not is_gvisor(spec.runtime)
    image = copy_of.source if copy_of is not None else spec.image
    return await root_disks.build(
        spec.name, image, parse_size(spec.disk_limit), userns, dict(spec.labels), hosts,
        copy_of,
    )  # fmt: skip


# Podman's default network, which `--network bridge` sandboxes join (run_arguments).
BRIDGE_NETWORK = "podman"


async def bridge_gateway(podman: Podman) -> str | None:
    """The host's address on the bridge network: what Podman names host.containers.internal
    in a bridge container's /etc/hosts. None if the network has no IPv4 gateway."""
    done = await podman.run("network", "inspect", BRIDGE_NETWORK, "--format", "json", check=False)
    try:
        networks = json.loads(done.stdout) if done.returncode == 0 else []
    except ValueError:
        networks = []
    for network in networks:
        for subnet in network.get("subnets") or []:
            gateway = subnet.get("gateway") or ""
            if gateway and ":" not in gateway:
                return str(gateway)
    return None


def container_pid(root: RootDisk) -> int:
    """The PID of a started sandbox's init (Podman's --pidfile); RootDiskError if none."""
    try:
        return int(root.pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise RootDiskError(f"podman wrote no pid file for {root.name} ({exc})") from None


def verify_root_disk(root: RootDisk, spec: SandboxSpec, probe: bool = False) -> None:
    """RootDiskError unless the started sandbox's disk limit is in force (RootDisk.verify).
    Under gVisor the init's root is runsc's own, not the sandbox's: the disk is checked
    where its gofer serves it from."""
    root.verify(None if is_gvisor(spec.runtime) else container_pid(root), probe)


class PodmanEngine:
    """Sandboxes as Podman containers; commands through each sandbox's exec agent, or
    through one `podman exec` each where there is no agent."""

    def __init__(
        self,
        podman: Podman,
        headroom: Headroom | None = None,
        root_disks: RootDisks | None = None,
        egress_limits: tuple[int, float] = (24, 50.0),
        egress_head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self.podman = podman
        # Each isolated sandbox's proxy connection bounds: (at once, new per second), and
        # the time one request head may take to arrive.
        self.egress_limits = egress_limits
        self.egress_head_timeout = egress_head_timeout
        self._gates: dict[str, ConnectionGate] = {}
        # Disk limits as root disks (PodmanFacts.disk_limit_by_root_disk) rather than as a
        # storage quota; and each sandbox's.
        self.root_disks = root_disks
        self._roots: dict[str, RootDisk] = {}
        # The bridge network's gateway ("" once found to have none), asked for once.
        self._gateway: str | None = None
        # Network mode isolated: the sandboxes whose agent runs the egress proxy, and the
        # policy each one's connections are checked against (none set: refuse all).
        self._isolated: set[str] = set()
        self._egress: dict[str, EgressPolicy] = {}
        # Each isolated sandbox's proxy refusals, logged at a bounded rate (proxy.py).
        self._refusals: dict[str, RefusalLog] = {}
        # Agent channels over a socket passed into the sandbox; not possible with remote
        # Podman (CONTAINER_HOST), whose client cannot pass descriptors.
        self._socket_channel = not os.environ.get("CONTAINER_HOST") and "remote" not in (
            os.path.basename(podman.path)
        )
        # Admission control before each start; None: none (tests, tools).
        self.headroom = headroom
        # Kills started for cancelled commands: they must finish even though whoever
        # started them was cancelled, and shutdown waits for them.
        self._background: set[asyncio.Future[object]] = set()
        # Sandboxes started with the agent mounted, and their live channels.
        self._with_agent: set[str] = set()
        self._channels: dict[str, AgentChannel] = {}
        self._attaching: dict[str, asyncio.Lock] = {}
        # Agent image -> the volume holding its files (made once per image id).
        self._agent_volumes: dict[str, str] = {}
        self._filling = asyncio.Lock()
        # Sandboxes under gVisor. Its kernel (2022) ignores the agent supervisor's
        # PR_SET_CHILD_SUBREAPER (an orphan goes to PID 1): after a stop, a second sweep by
        # EXEC_ID_ENV through `podman exec` (tests/test_hardening.py shows the escape). And
        # their streams are relayed, never spliced: the runsc of 2022 is not known to take
        # in a host TCP socket passed over a unix socket (not tried).
        self._gvisor: set[str] = set()
        # Sandboxes whose egress proxy did not start, and why: said in their next result.
        self._proxy_lost: dict[str, str] = {}
        # Ids of deleted snapshot images that a container still used (only untagged): each
        # removal tries them again.
        self._dangling: set[str] = set()
        # Passing copies (forks) of sandboxes on root disks: name -> the source's root.
        self._passing: dict[str, RootDisk] = {}

    async def start(self, spec: SandboxSpec) -> Sandbox:
        if self.headroom is not None:
            # Here rather than in the sessions layer: the engine knows which host its
            # sandboxes land on, and pool refills pass here too. AdmissionRefused is an
            # EngineError, which the agent reads as "could not start a sandbox: ...".
            check_headroom(spec, self.headroom)
        return await self._start(spec)

    async def _hosts(self, spec: SandboxSpec) -> dict[str, str]:
        """The names a root disk's /etc/hosts gives besides localhost: as Podman would,
        host.containers.internal for a bridge sandbox (the others cannot reach the host)."""
        if spec.network != "bridge":
            return {}
        if self._gateway is None:
            self._gateway = await bridge_gateway(self.podman) or ""
        return {"host.containers.internal": self._gateway} if self._gateway else {}

    async def _start(self, spec: SandboxSpec) -> Sandbox:
        sandbox = Sandbox(spec.name, spec.labels)
        try:
            volume = await self._agent_volume(spec) if spec.agent_image else None
        except PodmanError as exc:
            raise EngineError(f"could not provide the exec agent: {exc}") from None
        root: RootDisk | None = None
        try:
            if self.root_disks is not None and gets_root_disk(spec, self.root_disks):
                source = self._passing.get(spec.image)
                root = await build_root_disk(
                    self.root_disks, spec, await self._hosts(spec), copy_of=source
                )
            await self.podman.run(*run_arguments(spec, volume, root))
            if root is not None:
                # Fail closed: no sandbox whose limit is not in force is handed out.
                verify_root_disk(root, spec)
        except BaseException as exc:
            # A failed or cancelled start may have left a container behind.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.podman.remove(spec.name))
            if root is not None and self.root_disks is not None:
                self.root_disks.release(root)
            if isinstance(exc, PodmanError):
                raise EngineError(str(exc)) from None
            if isinstance(exc, RootDiskError):
                raise EngineError(f"could not give the sandbox its disk: {exc}") from None
            raise
        if root is not None:
            self._roots[spec.name] = root
        if is_gvisor(spec.runtime):
            self._gvisor.add(spec.name)
        if spec.agent_image:
            self._with_agent.add(spec.name)
            if spec.network == "isolated":
                self._isolated.add(spec.name)
            # Attached now, so that the first command (and a pooled sandbox) is fast.
            await self._channel(sandbox)
        return sandbox

    async def _agent_volume(self, spec: SandboxSpec) -> str:
        assert spec.agent_image is not None
        # One fill per agent image, however many sandboxes start at once.
        async with self._filling:
            volume = self._agent_volumes.get(spec.agent_image)
            if volume is None:
                rlimits = _rlimit_arguments(spec)
                # Labelled as this server's, not as the session's: it is nobody's sandbox.
                labels = {**spec.labels, LABEL_SESSION: "agent-fill"}
                volume = await agent_volume(self.podman, spec.agent_image, rlimits, labels)
                self._agent_volumes[spec.agent_image] = volume
        return volume

    async def remove(self, *sandboxes: Sandbox) -> None:
        # The container first: its end ends each agent at once, with no stop grace.
        await self.podman.remove(*[s.name for s in sandboxes])
        for s in sandboxes:
            root = self._roots.pop(s.name, None)
            if root is not None and self.root_disks is not None:
                # The container is gone, or it keeps its own copy of the mount until it is.
                self.root_disks.release(root)
        channels = [self._channels.pop(s.name, None) for s in sandboxes]
        await asyncio.gather(*(c.abort() for c in channels if c is not None))
        for s in sandboxes:
            self._with_agent.discard(s.name)
            self._isolated.discard(s.name)
            self._egress.pop(s.name, None)
            if (refusals := self._refusals.pop(s.name, None)) is not None:
                refusals.close()
            self._gates.pop(s.name, None)
            self._gvisor.discard(s.name)
            self._attaching.pop(s.name, None)
            self._proxy_lost.pop(s.name, None)

        if self._dangling:
            await self._remove_dangling()

    # --- snapshots ------------------------------------------------------------------------

    async def snapshot(
        self, sandbox: Sandbox, name: str, labels: Mapping[str, str], passing: bool = False
    ) -> SnapshotInfo:
        """`podman commit` of the sandbox's writable layer; a sandbox on a root disk of its
        own (which Podman cannot commit: "exploded rootfs") is recorded by a tar of its root
        into `podman import`; a passing copy of it is no image at all: each sandbox started
        from it gets a copy of the source's changes only (_start). None pauses the
        sandbox."""
        root = self._roots.get(sandbox.name)
        changes = [f"LABEL {key}={value}" for key, value in labels.items()]
        if self.headroom is not None and not (passing and root is not None):
            check_snapshot_headroom(await self._snapshot_estimate(root), self.headroom)
        try:
            if passing and root is not None and self.root_disks is not None:
                # Nothing copied yet: each fork's root disk gets a copy of the source's
                # changes (its upper layer) over the same image's files (_start).
                self._passing[name] = root
                return SnapshotInfo(name, dict(labels), 0, time.time())
            if root is not None and self.root_disks is not None:
                # `import` makes a bare image: the base image's run configuration goes with it.
                await self.root_disks.import_root(
                    root, name, [*_config_changes(root.image), *changes]
                )
            elif (shift := await self._id_shift(sandbox)) is not None:
                # Podman 4.3 commits a user-namespaced container's files with their host
                # ids (a new sandbox then sees them owned by nobody): its export instead,
                # ids shifted back, into `podman import` (the whole tree, not a layer).
                base = await self.podman.run(
                    "container", "inspect", "--format", "{{.Image}}", sandbox.name
                )
                config = await self.podman.run(
                    "image", "inspect", "--format", "{{json .Config}}", base.stdout.decode().strip()
                )
                image = ImageConfig.of(json.loads(config.stdout or b"null"))
                await asyncio.to_thread(
                    _export_shifted, self.podman.path, sandbox.name, shift, name,
                    [*_config_changes(image), *changes],
                )  # fmt: skip
            else:
                # Its size is the layer's: the image it was committed on is not counted.
                base = await self.podman.run(
                    "container", "inspect", "--format", "{{.Image}}", sandbox.name
                )
                changes.append(f"LABEL {LABEL_SNAPSHOT_BASE}={base.stdout.decode().strip()}")
                # Podman's own run files and the agent's volume are not part of the layer.
                await self.podman.run(
                    "commit", "--quiet", *[a for c in changes for a in ("--change", c)],
                    sandbox.name, name,
                )  # fmt: skip
            return await self._snapshot_info(name)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.remove_snapshot(name))
            if isinstance(exc, PodmanError | RootDiskError | OSError):
                raise EngineError(f"could not snapshot the sandbox: {exc}") from None
            raise

    async def _snapshot_estimate(self, root: RootDisk | None) -> int:
        """What a snapshot may take, where it can be told cheaply: a root disk's whole
        root (its image's files and the changes on its disk); else 0 (only the headroom
        itself is checked)."""
        if root is None:
            return 0
        try:
            stats = os.statvfs(root.path)
        except OSError:
            return 0
        changed = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
        done = await self.podman.run(
            "image", "inspect", "--format", "{{.Size}}", root.source, check=False
        )
        text = done.stdout.decode().strip()
        return changed + (int(text) if done.returncode == 0 and text.isdigit() else 0)

    async def _id_shift(self, sandbox: Sandbox) -> tuple[int, int] | None:
        """The host uid and gid of the container's root, where it has a user namespace."""
        done = await self.podman.run(
            "container", "inspect", "--format", "{{json .HostConfig.IDMappings}}", sandbox.name
        )
        mappings = json.loads(done.stdout or b"null") or {}
        firsts = [(mappings.get(key) or [""])[0].split(":") for key in ("UidMap", "GidMap")]
        if all(len(f) == 3 and f[0] == "0" and f[1].isdigit() for f in firsts):
            return int(firsts[0][1]), int(firsts[1][1])
        return None

    async def _snapshot_info(self, name: str) -> SnapshotInfo:
        found = await self.podman.run("image", "inspect", "--format", "json", name)
        image = (json.loads(found.stdout) or [{}])[0]
        labels = image.get("Labels") or (image.get("Config") or {}).get("Labels") or {}
        return SnapshotInfo(
            name=name,
            labels=labels,
            size=await self._own_size(int(image.get("Size") or 0), labels),
            created=_wall_clock(image.get("Created")),
        )

    async def _own_size(self, size: int, labels: Mapping[str, str]) -> int:
        base = labels.get(LABEL_SNAPSHOT_BASE)
        if not base:
            return size
        done = await self.podman.run("image", "inspect", "--format", "{{.Size}}", base, check=False)
        text = done.stdout.decode().strip()
        return max(0, size - int(text)) if done.returncode == 0 and text.isdigit() else size

    async def list_snapshots(self, *label_filters: str) -> list[SnapshotInfo]:
        try:
            found = await self.podman.list_images(LABEL_SNAPSHOT, *label_filters)
            listed = []
            for image in found:
                tags = image.get("RepoTags") or image.get("Names") or []
                if not tags:
                    continue  # deleted, but still used by a container (remove_snapshot)
                labels = image.get("Labels") or {}
                size = await self._own_size(int(image.get("Size") or 0), labels)
                created = _wall_clock(image.get("Created"))
                listed.append(SnapshotInfo(tags[0], labels, size, created))
            return listed
        except PodmanError as exc:
            raise EngineError(str(exc)) from None

    async def remove_snapshot(self, name: str) -> None:
        if self._passing.pop(name, None) is not None:
            return
        try:
            done = await self.podman.run(
                "image", "inspect", "--format", "{{.Id}}", name, check=False
            )
            if done.returncode != 0:
                return
            if not await self.podman.remove_image(name):
                self._dangling.add(done.stdout.decode().strip())
        except PodmanError as exc:
            raise EngineError(str(exc)) from None
        finally:
            if self.root_disks is not None:
                self.root_disks.forget(name)

    async def _remove_dangling(self) -> None:
        for image_id in list(self._dangling):
            done = await self.podman.run("rmi", image_id, check=False)
            if done.returncode == 0 or "image not known" in done.error_text:
                self._dangling.discard(image_id)

    async def is_running(self, sandbox: Sandbox) -> bool:
        # A live agent channel answers its heartbeats from inside the container, so it is
        # proof enough, and costs nothing (a podman inspect costs ~100 ms).
        channel = self._channels.get(sandbox.name)
        if channel is not None and channel.alive:
            return True
        return await self.podman.is_running(sandbox.name)

    async def list_ours(self, *label_filters: str) -> list[SandboxInfo]:
        try:
            found = await self.podman.list_containers(*label_filters)
        except PodmanError as exc:
            raise EngineError(str(exc)) from None
        return [
            SandboxInfo(
                id=c["Id"],
                name=(c.get("Names") or [""])[0],
                labels=c.get("Labels") or {},
                state=c.get("State", "?"),
            )
            for c in found
        ]

    def set_egress(self, sandbox: Sandbox, policy: EgressPolicy) -> None:
        self._egress[sandbox.name] = policy

    async def _serve_egress(self, name: str, stream: AgentStream) -> None:
        # The policy in force when the connection is made (a pooled sandbox gets its
        # session's policy when it is handed out).
        policy = self._egress.get(name, DENY_ALL)
        refusals = self._refusals.get(name)
        if refusals is None:  # made once per sandbox, not thrown away per connection
            refusals = self._refusals[name] = RefusalLog()
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = ConnectionGate(*self.egress_limits)
        await serve_connection(
            stream,
            policy,
            label=f" (sandbox {name})",
            refusals=refusals,
            gate=gate,
            head_timeout=self.egress_head_timeout,
        )

    async def close(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.abort() for c in channels))

    async def _channel(self, sandbox: Sandbox) -> AgentChannel | None:
        """The sandbox's agent channel, (re)attached when needed; None where the sandbox
        has no agent or it cannot start (commands then go through podman exec)."""
        if sandbox.name not in self._with_agent:
            return None
        channel = self._channels.get(sandbox.name)
        if channel is not None and channel.alive:
            return channel
        lock = self._attaching.setdefault(sandbox.name, asyncio.Lock())
        async with lock:
            channel = self._channels.get(sandbox.name)
            if channel is not None and channel.alive:
                return channel
            if channel is not None:
                await channel.abort()
                # Its agent may live on, stopped (SIGSTOP) from inside, holding the proxy's
                # port and its commands: end it before a new one starts.
                await self._kill_agent_process(sandbox, channel.agent_pid, only_if_stopped=False)
            name = sandbox.name

            async def on_stream(stream: AgentStream) -> None:
                await self._serve_egress(name, stream)

            handler = on_stream if name in self._isolated else None
            try:
                channel = await self._attach(name, handler)
                if name in self._isolated:
                    await self._start_proxy(name, channel)
            except AgentError as exc:
                log.warning(
                    "exec agent not attached in %s (%s); using podman exec", sandbox.name, exc
                )
                self._channels.pop(sandbox.name, None)
                return None
            self._channels[sandbox.name] = channel
            return channel

    async def _attach(self, name: str, on_stream: Any) -> AgentChannel:
        """Attach the agent: over a socket passed down with --preserve-fds where Podman is
        local (several times the throughput of Podman's stdio relay), else over stdio."""
        if self._socket_channel:
            host_end, child_end = socket.socketpair()
            for end in (host_end, child_end):
                # Room for a whole window of stream data per send (the kernel caps it at
                # net.core.wmem_max): fewer, larger writes, and no copy into asyncio's buffer.
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * 1024 * 1024)
            # The egress proxy's connections are handed to the agent over a second socket
            # (splice); not into gVisor.
            host_pass = child_pass = None
            if on_stream is not None and name not in self._gvisor:
                host_pass, child_pass = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            argv = fd_serve_argv(
                [self.podman.path],
                name,
                child_end.fileno(),
                child_pass.fileno() if child_pass is not None else None,
            )
            try:
                return await AgentChannel.attach(
                    argv,
                    on_stream=on_stream,
                    sock=host_end,
                    child_sock=child_end,
                    pass_sock=host_pass,
                    child_pass_sock=child_pass,
                )
            except AgentError as exc:
                if not await self.is_running(Sandbox(name, {})):
                    raise
                # Remote Podman, or an agent without `serve --fd`: stdio from now on.
                self._socket_channel = False
                log.info("exec agent over a passed socket failed (%s); using stdio", exc)
        argv = serve_argv([self.podman.path], name)
        return await AgentChannel.attach(argv, on_stream=on_stream)

    async def _start_proxy(self, name: str, channel: AgentChannel) -> None:
        """Have the agent listen as the sandbox's proxy. Without it the sandbox simply has
        no egress (it has no network device), so a failure is logged, not fatal."""
        error: ConnectionError | None = None
        for attempt in range(5):
            try:
                await channel.listen(PROXY_ADDRESS, PROXY_PORT)
                self._proxy_lost.pop(name, None)
                return
            except ConnectionError as exc:
                error = exc
            # A re-attach may race the previous agent, which closes its listener as it
            # exits; anything else (an agent without streams) will not change.
            if "in use" not in str(error):
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        self._proxy_lost[name] = str(error)
        log.warning(
            "the egress proxy did not start in %s (%s): the sandbox has no network access "
            "(an old agent image? rebuild it with pod_exec_mcp_build)",
            name, error,
        )  # fmt: skip

    async def _host_process(
        self, sandbox: Sandbox, inner_pid: int, comm: str
    ) -> host_procs.HostProcess | None:
        """This host's view of process `inner_pid` of the sandbox, named `comm`; None where
        the sandbox's processes are not this host's (gVisor, remote Podman) or it is gone."""
        (found,) = await self._host_processes(sandbox, (inner_pid, comm))
        return found

    async def _host_processes(
        self, sandbox: Sandbox, *wanted: tuple[int, str]
    ) -> list[host_procs.HostProcess | None]:
        """_host_process for each (pid, comm), with one podman inspect (~0.1 s) for all."""
        if sandbox.name in self._gvisor or not any(pid for pid, _ in wanted):
            return [None] * len(wanted)
        init_pid = await self.podman.init_pid(sandbox.name)
        if init_pid is None:
            return [None] * len(wanted)
        return [
            await asyncio.to_thread(host_procs.find_in_sandbox, init_pid, pid, comm)
            if pid
            else None
            for pid, comm in wanted
        ]

    async def _kill_named_inside(
        self, sandbox: Sandbox, pid: int, comm: str, only_if_stopped: bool
    ) -> None:
        """SIGKILL a process of ours by its pid from inside the container (a new exec)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.podman.run(
                    "exec", sandbox.name, "/bin/sh", "-c", _KILL_NAMED_SCRIPT, "pod_exec_mcp",
                    str(pid), comm, "stopped" if only_if_stopped else "",
                    check=False,
                ),
                _KILL_EXEC_TIMEOUT,
            )  # fmt: skip

    async def _kill_agent_process(
        self, sandbox: Sandbox, agent_pid: int, only_if_stopped: bool
    ) -> None:
        """End an agent that no longer answers, so that nothing it holds (its commands, the
        proxy's port) outlives its channel; a stopped one cannot end itself."""
        if not agent_pid:
            return
        agent = await self._host_process(sandbox, agent_pid, AGENT_COMM)
        if agent is not None:
            if not only_if_stopped or agent.state in "Tt":
                await asyncio.to_thread(host_procs.kill, agent)
        elif sandbox.name in self._gvisor or not self._socket_channel:
            await self._kill_named_inside(sandbox, agent_pid, AGENT_COMM, only_if_stopped)

    async def _take_over(
        self, sandbox: Sandbox, channel: AgentChannel, exec_id: str, supervisor_pid: int
    ) -> TakeOver:
        """Kill a command's tree whose supervisor did not report its stop: it, or the
        agent, was most likely stopped from inside. From the host's /proc where the
        sandbox's processes are this host's (nothing in the sandbox can stop the server);
        else from inside, by the command's exec id."""
        supervisor = await self._host_process(sandbox, supervisor_pid, SUPERVISOR_COMM)
        if supervisor is not None:
            survivors = await asyncio.to_thread(host_procs.kill_tree, supervisor)
            taken = TakeOver(survivors=survivors, verified=True)
        else:
            await self._kill_tree(sandbox, 0, None, exec_id)
            if supervisor_pid:
                await self._kill_named_inside(sandbox, supervisor_pid, SUPERVISOR_COMM, False)
            taken = TakeOver(survivors=0, verified=False)
        # A stopped agent would answer nothing more: end it, and its channel with it.
        await self._kill_agent_process(sandbox, channel.agent_pid, only_if_stopped=True)
        return taken

    async def _stuck(self, sandbox: Sandbox, channel: AgentChannel, supervisor_pid: int) -> bool:
        """Whether the command's supervisor or the agent is stopped (state T), seen in this
        host's /proc; False where the sandbox's processes are not here (the take-over then
        waits out its patience)."""
        found = await self._host_processes(
            sandbox, (supervisor_pid, SUPERVISOR_COMM), (channel.agent_pid, AGENT_COMM)
        )
        return any(p is not None and p.state in "Tt" for p in found)

    def _keep_running(self, coro: Awaitable[object]) -> asyncio.Future[object]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def run(
        self,
        sandbox: Sandbox,
        request: RunRequest,
        on_progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
        stop: asyncio.Event | None = None,
    ) -> RunResult:
        """Run `/bin/sh -lc COMMAND` and return its merged output and exit status.

        On timeout, stop or cancellation the command's whole process tree is killed inside
        the container before this returns (or re-raises CancelledError).
        """
        channel = await self._channel(sandbox)
        if channel is not None:
            return await self._run_on_agent(sandbox, channel, request, on_progress, on_output, stop)
        return await self._run_podman_exec(sandbox, request, on_progress, on_output, stop)

    async def _run_on_agent(
        self,
        sandbox: Sandbox,
        channel: AgentChannel,
        request: RunRequest,
        on_progress: ProgressCallback | None,
        on_output: OutputCallback | None,
        stop: asyncio.Event | None,
    ) -> RunResult:
        """One command over the agent: its supervisor kills the whole tree on timeout or
        cancel (no new process needed), and says whether the tree is verifiably empty."""
        started = time.monotonic()
        output = BoundedOutput(request.max_output_bytes)
        exec_id = secrets.token_hex(12)

        def feed(chunk: bytes) -> None:
            output.feed(chunk)
            if on_output is not None:
                on_output(chunk)

        task = asyncio.ensure_future(
            channel.run(
                request.command,
                timeout=request.timeout,
                kill_grace=request.kill_grace,
                on_output=feed,
                env={EXEC_ID_ENV: exec_id, **request.env},
                stdin=request.stdin,
                spill_path=request.spill_path,
                spill_after=request.max_output_bytes if request.spill_path else 0,
                spill_max=request.max_spill_bytes,
                stop=stop,
                take_over=_TakeOver(self, sandbox, channel, exec_id),
            )
        )
        try:
            await _progress_until_done(task, started, request.progress_interval, on_progress)
        except asyncio.CancelledError:
            # The channel stops the command's tree (shielded) before its run() re-raises.
            task.cancel()
            while not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            if sandbox.name in self._gvisor:
                sweep = self._kill_tree(sandbox, request.kill_grace, None, exec_id)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(self._keep_running(sweep))
            raise
        try:
            ran = task.result()
        except AgentCommandError as exc:
            raise EngineError(
                f"the sandbox could not start the command ({exc}); if its process limit is "
                "reached, end some background processes"
            ) from None
        except AgentError as exc:
            await self._drop_channel(sandbox)
            if not await self.is_running(sandbox):
                raise SandboxBroken(
                    f"the sandbox container {sandbox.name} stopped while the command ran "
                    "(out of memory, killed or removed from outside)"
                ) from None
            raise EngineError(
                f"the sandbox's exec agent stopped while the command ran ({exc}), so its "
                "output and exit status are lost; a new agent starts with the next call"
            ) from None
        text = output.text(
            whole_output_in=ran.spilled_to,
            whole_output_lost=ran.spill_failed,
            file_keeps=request.max_spill_bytes if ran.spill_cut else None,
        )
        if (lost := self._proxy_lost.pop(sandbox.name, None)) is not None:
            text += notice(
                text,
                f"this sandbox's egress proxy could not start ({lost}), so it has no network "
                "access",
            )
        retval = ran.status
        kill_note = None
        if ran.stopped and sandbox.name in self._gvisor:
            # The supervisor saw its own subtree empty, but processes that left it went to
            # PID 1 instead: kill those too, by the variable every one of them inherited.
            await self._kill_tree(sandbox, request.kill_grace, None, exec_id)
        if ran.stopped:
            # A timeout reads as GNU timeout's 124; a stop on request keeps the real status.
            retval = ran.status if stop is not None and stop.is_set() else TIMEOUT_STATUS
            if ran.taken_over:
                kill_note = _taken_over_note(ran)
            elif ran.all_killed:
                kill_note = "the command and every process it started were killed"
            else:
                kill_note = (
                    f"{ran.survivors} process(es) it started could not be killed and may still run"
                )
            text += notice(text, f"{_why_stopped(request, stop)}; {kill_note}")
        return RunResult(
            output=text,
            retval=retval,
            truncated=output.truncated,
            timed_out=ran.stopped,
            duration=time.monotonic() - started,
            output_file=ran.spilled_to,
            output_file_cut=ran.spill_cut,
            kill_note=kill_note,
        )

    async def _drop_channel(self, sandbox: Sandbox) -> None:
        channel = self._channels.pop(sandbox.name, None)
        if channel is not None:
            await channel.abort()

    async def _run_podman_exec(
        self,
        sandbox: Sandbox,
        request: RunRequest,
        on_progress: ProgressCallback | None,
        on_output: OutputCallback | None,
        stop: asyncio.Event | None,
    ) -> RunResult:
        """One command through its own `podman exec` (no agent in this sandbox)."""
        exec_id = secrets.token_hex(12)
        started = time.monotonic()
        env_args = [f"--env={k}={v}" for k, v in request.env.items()]
        try:
            proc = await self.podman.spawn(
                "exec", *(["--interactive"] if request.stdin is not None else []),
                f"--env={EXEC_ID_ENV}={exec_id}", *env_args, sandbox.name,
                "/bin/sh", "-c", _EXEC_WRAPPER, "pod_exec_mcp", request.command,
                stdin=request.stdin,
            )  # fmt: skip
        except OSError as exc:
            raise EngineError(f"could not start podman: {exc}") from None
        output = BoundedOutput(request.max_output_bytes)
        run = _RunningExec(proc, output, on_output)
        reader = asyncio.create_task(run.read_all())
        try:
            finished = await _wait(reader, started, request, on_progress, stop)
        except BaseException:
            # Cancelled by the client (or anything else): kill inside the container first.
            # The kill runs as its own task, so a repeated cancel cannot interrupt it.
            stopping = self._keep_running(self._stop(sandbox, request, run, reader, exec_id))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(stopping)
            raise
        unkillable = False
        if not finished:
            unkillable = not await self._stop(sandbox, request, run, reader, exec_id)
        duration = time.monotonic() - started
        if run.pid is None and finished:
            # The shell never started: this is podman's failure, not the command's.
            raise await self._failure(sandbox, f"podman exec failed: {run.podman_error()}")
        retval = proc.returncode if proc.returncode is not None else -1
        if finished and retval in _AMBIGUOUS_STATUSES and not await self.is_running(sandbox):
            raise SandboxBroken(
                f"the sandbox container {sandbox.name} stopped while the command ran "
                f"(out of memory, killed or removed from outside; podman said: "
                f"{run.podman_error()})"
            )
        text = output.text()
        kill_note = None
        if not finished:
            if stop is None or not stop.is_set():
                retval = TIMEOUT_STATUS
            # Without the agent's supervisor, the kill finds processes by process group
            # and exec id only: say exactly that, not more.
            kill_note = (
                "the command could not be verifiably killed"
                if unkillable
                else "the command's process group and every process carrying its exec id "
                "were killed"
            )
            text += notice(text, f"{_why_stopped(request, stop)}; {kill_note}")
        return RunResult(
            output=text,
            retval=retval,
            truncated=output.truncated,
            timed_out=not finished,
            duration=duration,
            unkillable=unkillable,
            kill_note=kill_note,
        )

    async def _stop(
        self,
        sandbox: Sandbox,
        request: RunRequest,
        run: _RunningExec,
        reader: asyncio.Task[None],
        exec_id: str,
    ) -> bool:
        """Kill a command's whole tree inside the container. False if that proved impossible."""
        killed = await self._kill_tree(sandbox, request.kill_grace, run.pid, exec_id)
        await asyncio.wait({reader}, timeout=_DRAIN_AFTER_KILL)
        if not reader.done():
            # Nothing left to read for, and the exec cannot be ended from inside: drop the
            # client so that nothing stays blocked on it.
            killed = False
            with contextlib.suppress(ProcessLookupError):
                run.proc.kill()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        return killed

    async def _kill_tree(
        self, sandbox: Sandbox, kill_grace: float, pid: int | None, exec_id: str
    ) -> bool:
        """SIGTERM, grace, SIGKILL: see _KILL_SCRIPT. False if it could not run."""
        grace_ticks = round(kill_grace * 10)
        try:
            done = await asyncio.wait_for(
                self.podman.run(
                    "exec", sandbox.name, "/bin/sh", "-c", _KILL_SCRIPT, "pod_exec_mcp",
                    str(pid) if pid is not None else "", exec_id, str(grace_ticks),
                    check=False,
                ),
                kill_grace + _KILL_EXEC_TIMEOUT,
            )  # fmt: skip
        except TimeoutError:
            return False
        return done.returncode == 0

    async def _failure(self, sandbox: Sandbox, reason: str) -> Exception:
        """SandboxBroken when the container is really gone; EngineError otherwise."""
        if not await self.is_running(sandbox):
            return SandboxBroken(f"the sandbox container {sandbox.name} is gone ({reason})")
        return EngineError(reason)


async def _progress_until_done(
    task: asyncio.Future[Any],
    started: float,
    interval: float,
    on_progress: ProgressCallback | None,
) -> None:
    """Wait for `task`, reporting progress every `interval` seconds meanwhile."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=interval)
        if done:
            return
        if on_progress is not None:
            # Progress is a courtesy: a client that went away must not break the run.
            with contextlib.suppress(Exception):
                await on_progress(time.monotonic() - started)


@dataclass(frozen=True)
class _TakeOver:
    """The engine's side of a stop the agent does not report (AgentChannel.run)."""

    engine: PodmanEngine
    sandbox: Sandbox
    channel: AgentChannel
    exec_id: str

    async def stuck(self, supervisor_pid: int) -> bool:
        return await self.engine._stuck(self.sandbox, self.channel, supervisor_pid)

    async def take_over(self, supervisor_pid: int) -> TakeOver:
        return await self.engine._take_over(
            self.sandbox, self.channel, self.exec_id, supervisor_pid
        )


def _taken_over_note(ran: AgentRun) -> str:
    """What a take-over did, exactly (see PodmanEngine._take_over)."""
    why = (
        "the sandbox's agent or the command's supervisor did not answer (stopped from "
        "inside?), so the server"
    )
    if not ran.all_killed and ran.survivors:
        return (
            f"{why} killed the command's tree; {ran.survivors} process(es) it started could "
            "not be killed and may still run"
        )
    if ran.all_killed:
        return f"{why} killed the command and every process it started"
    return (
        f"{why} killed the command and every process carrying its exec id (one that "
        "cleared its environment may still run)"
    )


def _why_stopped(request: RunRequest, stop: asyncio.Event | None) -> str:
    if stop is not None and stop.is_set():
        return "stopped on request"
    return f"timed out after {request.timeout or 0:g} s"


async def _wait(
    reader: asyncio.Task[None],
    started: float,
    request: RunRequest,
    on_progress: ProgressCallback | None,
    stop: asyncio.Event | None,
) -> bool:
    """Wait for the command to end; False if its timeout ran out (or `stop` was set)
    first."""
    deadline = started + request.timeout if request.timeout is not None else math.inf
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (stop is not None and stop.is_set()):
            return False
        # A stop request is noticed within a tenth of a second.
        step = min(remaining, request.progress_interval, 0.1 if stop is not None else math.inf)
        done, _ = await asyncio.wait({reader}, timeout=step)
        if done:
            reader.result()
            return True
        if on_progress is not None:
            # Progress is a courtesy: a client that went away must not break the run.
            with contextlib.suppress(Exception):
                await on_progress(time.monotonic() - started)


def _config_changes(image: ImageConfig) -> list[str]:
    """`podman import --change` lines that give a bare image `image`'s run configuration."""
    changes = [f"ENV {variable}" for variable in image.env]
    changes += [f"WORKDIR {image.workdir}"] if image.workdir else []
    changes += [f"USER {image.user}"] if image.user else []
    return changes


def _export_shifted(
    podman: str, container: str, shift: tuple[int, int], image: str, changes: list[str]
) -> None:
    """`podman export CONTAINER | podman import - IMAGE`, every owner shifted from the host
    ids of the container's user namespace back to its own (ids outside it: nobody)."""
    exporter = subprocess.Popen(
        [podman, "export", container], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    importer = subprocess.Popen(
        [podman, "import", "--quiet", *[a for c in changes for a in ("--change", c)], "-", image],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert exporter.stdout is not None and importer.stdin is not None

    def back(value: int, base: int) -> int:
        return value - base if base <= value < base + USERNS_SIZE else _NOBODY

    try:
        with (
            tarfile.open(fileobj=exporter.stdout, mode="r|") as source,
            tarfile.open(fileobj=importer.stdin, mode="w|", format=tarfile.PAX_FORMAT) as out,
        ):
            for member in source:
                member.uid, member.gid = back(member.uid, shift[0]), back(member.gid, shift[1])
                member.uname = member.gname = ""
                # A PAX header would carry the old ids on (they were too large for ustar).
                member.pax_headers = {
                    k: v for k, v in member.pax_headers.items() if k not in _OWNER_KEYS
                }
                out.addfile(member, source.extractfile(member) if member.isreg() else None)
    except (tarfile.TarError, OSError) as exc:
        exporter.kill()
        importer.kill()
        raise PodmanError(f"could not copy the container's export: {exc}") from None
    finally:
        # (communicate closes the importer's stdin: the end of its input.)
        _, export_error = exporter.communicate()
        import_out, import_error = importer.communicate()
    if exporter.returncode != 0:
        raise PodmanError(f"podman export failed: {' '.join(export_error.decode().split())}")
    if importer.returncode != 0:
        said = " ".join((import_error or import_out).decode(errors="replace").split())
        raise PodmanError(f"podman import failed: {said}")


# The overflow id a user namespace shows for ids it does not map.
_NOBODY = 65534
_OWNER_KEYS = frozenset({"uid", "gid", "uname", "gname"})


def _wall_clock(created: object) -> float:
    """An image's creation time from `podman images` (seconds) or `inspect` (RFC 3339)."""
    if isinstance(created, int | float):
        return float(created)
    if isinstance(created, str):
        with contextlib.suppress(ValueError):
            # Podman gives nanoseconds; Python's parser takes at most microseconds.
            text = re.sub(r"(\.\d{6})\d+", r"\1", created.replace("Z", "+00:00"))
            return datetime.datetime.fromisoformat(text).timestamp()
    return 0.0


class _RunningExec:
    """The podman exec client of one command, and what it has said so far."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        output: BoundedOutput,
        on_output: OutputCallback | None,
    ) -> None:
        self.proc = proc
        self.output = output
        self.on_output = on_output
        self.pid: int | None = None
        self._stderr = b""

    async def read_all(self) -> None:
        """Read the PID line, then the output until EOF, then podman's own stderr."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        stderr_task = asyncio.create_task(self.proc.stderr.read())
        try:
            first = await self.proc.stdout.readline()
            if first.endswith(b"\n") and first[:-1].isdigit():
                self.pid = int(first)
            else:
                self.feed(first)
            while chunk := await self.proc.stdout.read(65536):
                self.feed(chunk)
            await self.proc.wait()
        finally:
            # podman's stderr closes when it exits; never wait on it for long.
            done, _ = await asyncio.wait({stderr_task}, timeout=1.0)
            if done and not stderr_task.cancelled() and stderr_task.exception() is None:
                self._stderr = stderr_task.result()
            else:
                stderr_task.cancel()

    def feed(self, chunk: bytes) -> None:
        self.output.feed(chunk)
        if self.on_output is not None:
            self.on_output(chunk)

    def podman_error(self) -> str:
        text = " ".join(self._stderr.decode("utf-8", "replace").split())
        return text or f"exit status {self.proc.returncode}"
