"""`pod_exec_mcp`: serve MCP over streamable HTTP, or manage our containers and tokens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import uvicorn

from pod_exec_mcp import __version__, logs
from pod_exec_mcp.admission import (
    Headroom,
    capacity_warnings,
    host_state,
    unenforced_limits_warning,
)
from pod_exec_mcp.app import create_app
from pod_exec_mcp.auth import AuthConfigError, auth_provider, generate_token_file, token_file
from pod_exec_mcp.config import Settings, SettingsError, cli_flag, env_var, load_settings
from pod_exec_mcp.engine import is_gvisor, sandbox_spec
from pod_exec_mcp.http import MCP_PATH
from pod_exec_mcp.http_guard import http_protocol, rate_limit_accept_errors
from pod_exec_mcp.instances import (
    Instance,
    default_lock_dir,
    format_listing,
    survey,
    sweep_forever,
    sweep_orphans,
    write_usage,
)
from pod_exec_mcp.podman import Podman, PodmanError
from pod_exec_mcp.podman_engine import PodmanEngine, PodmanFacts, gets_root_disk, podman_facts
from pod_exec_mcp.preflight import bind_socket, check_sandbox_settings
from pod_exec_mcp.root_disk import IdRange, RootDisks, existing_names
from pod_exec_mcp.sessions import Sessions
from pod_exec_mcp.stale_mounts import repair_stale_mounts

log = logging.getLogger("pod_exec_mcp")

# How long open HTTP streams get to close at shutdown before the sandboxes are removed.
_GRACEFUL_SHUTDOWN_SECONDS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pod_exec_mcp",
        description=(
            "MCP server (streamable HTTP at /mcp) that gives every client session its own "
            "Podman sandbox and a shell_exec tool. Every setting can also be given by the "
            "environment variable shown in its help."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    actions = parser.add_argument_group("actions (instead of serving)")
    actions.add_argument(
        "--list-containers",
        action="store_true",
        help="list every container of ours on this Podman, with its owner's state, and exit",
    )
    actions.add_argument(
        "--cleanup",
        action="store_true",
        help="remove every container of ours whose server is no longer running, and exit",
    )
    actions.add_argument(
        "--cleanup-all",
        action="store_true",
        help="remove every container of the servers that share this state dir, running or "
        "not, and exit",
    )
    actions.add_argument(
        "--generate-token",
        action="store_true",
        help="write a new random bearer token to the token file, print it, and exit",
    )
    settings = parser.add_argument_group("settings")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = (
            f"{' '.join((field.description or '').split())} [env {env_var(name)}; default: {shown}]"
        ).replace("%", "%%")  # argparse formats help text with %
        if field.annotation is bool:
            settings.add_argument(
                cli_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                default=None, help=help_text,
            )  # fmt: skip
        else:
            settings.add_argument(cli_flag(name), dest=name, default=None, help=help_text)
    # The flag of the boolean `network` setting of earlier versions.
    settings.add_argument(
        "--no-network", dest="network", action="store_const", const="none",
        help="same as --network none",
    )  # fmt: skip
    return parser


def die(message: str, code: int = 1) -> NoReturn:
    logs.fatal(message)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: getattr(args, name) for name in Settings.model_fields}
    try:
        settings = load_settings(overrides)
    except SettingsError as exc:
        die(str(exc), 2)
    logs.configure_logging(settings.log_format, settings.log_level)

    if args.generate_token:
        try:
            token = generate_token_file(token_file(settings))
        except (AuthConfigError, OSError) as exc:
            die(str(exc))
        print(token)
        print(
            f"written to {token_file(settings)}; clients send it as 'Authorization: Bearer "
            "<token>'",
            file=sys.stderr,
        )
        return 0

    try:
        podman = Podman(settings.podman)
    except PodmanError as exc:
        die(str(exc))

    if args.list_containers or args.cleanup or args.cleanup_all:
        return asyncio.run(_manage_containers(podman, args, settings))

    try:
        auth = auth_provider(settings)
    except (AuthConfigError, OSError) as exc:
        die(str(exc))
    return asyncio.run(serve(settings, podman, auth))


async def _sweep_disks(podman: Podman, settings: Settings) -> list[str]:
    directory = disk_dir(settings)
    if not directory.is_dir() or (await podman_facts(podman)).remote:
        return []
    root_disks = RootDisks(directory, podman)
    try:
        return await sweep_root_disks(root_disks, podman)
    finally:
        root_disks.close()


async def _manage_containers(podman: Podman, args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.cleanup_all:
            # Servers of other owners (another state dir) are not ours to judge; their
            # containers are listed, not removed.
            found = [c for c in await survey(podman) if c.owner_alive is not None]
            await podman.remove(*[c.id for c in found])
            print(f"removed {len(found)} container(s)")
            swept = await _sweep_disks(podman, settings)
            print(f"unmounted {len(swept)} root disk(s) of sandboxes gone with their server")
        elif args.cleanup:
            # First: an earlier version's mounts may leave Podman failing the commands
            # the sweeps below need.
            repaired = await repair_stale_mounts(podman)
            removed = await sweep_orphans(podman)
            print(f"removed {len(removed)} orphaned container(s)")
            swept = await _sweep_disks(podman, settings)
            print(f"unmounted {len(swept)} root disk(s) of sandboxes gone with their server")
            for line in repaired:
                print(line)
        else:
            print(format_listing(await survey(podman)))
    except (PodmanError, OSError) as exc:
        die(str(exc))
    return 0


class _Server(uvicorn.Server):
    """uvicorn, minus its habit of re-raising SIGTERM/SIGINT after shutdown: that would kill
    the process before our own cleanup ran. We stop on either signal and exit normally.
    `on_listening` runs once the socket accepts connections (our "serving" line)."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_listening()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _raise_nofile() -> None:
    """Soft open-file limit up to the hard one: each client connection takes a descriptor,
    and the common soft default of 1024 runs out long before the hard limit would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _root_disks(settings: Settings, podman: Podman, facts: PodmanFacts) -> RootDisks | None:
    """Where sandboxes' root disks go, if this host gives them and the settings ask for a
    disk limit (strict sandboxes write only to tmpfs)."""
    if not facts.disk_limit_by_root_disk() or sandbox_spec(settings, "", {}).disk_limit is None:
        return None
    return RootDisks(disk_dir(settings), podman, IdRange.read())


def snapshot_support(settings: Settings, root_disks: bool) -> str:
    """What snapshot_session and fork_session can do on this host, in one line."""
    if settings.strict:
        return "none: strict sandboxes keep /workspace and /tmp in tmpfs"
    how = (
        "a tar of each root disk into podman import (whole root); forks copy the changes"
        if root_disks
        else "podman export with ids shifted back into podman import (whole root)"
        if settings.userns == "auto" and not is_gvisor(settings.runtime)
        else "podman commit (changes only)"
    )
    cap = settings.max_snapshots_per_principal
    kept = f"{cap} per principal, {settings.max_snapshot_bytes} in all" if cap else "turned off"
    return (
        f"file-system only, no memory or processes (CRIU is not used); by {how}; "
        f"kept snapshots: {kept}"
    )


def disk_dir(settings: Settings) -> Path:
    return Path(settings.disk_dir) if settings.disk_dir else default_lock_dir().parent / "disks"


async def sweep_root_disks(root_disks: RootDisks, podman: Podman) -> list[str]:
    """Unmount the root disks of sandboxes gone with their server; their names."""
    swept = root_disks.sweep(existing_names(await podman.list_containers()))
    if swept:
        log.info("unmounted %d root disk(s) of sandboxes gone with their server", len(swept))
    return swept


async def serve(settings: Settings, podman: Podman, auth: Any) -> int:
    """Check the prerequisites and the settings, then serve until SIGINT or SIGTERM; always
    clean up. Nothing listens, and nothing says "serving", until every check passed."""
    try:
        if not await podman.image_exists(settings.image):
            build = "pod_exec_mcp_build" + (
                f" --tag {settings.image}" if settings.image != "pod_exec_mcp_base" else ""
            )
            die(
                f"image {settings.image!r} is not present in local Podman storage. "
                f"Build it with `{build}`, or set {env_var('image')}."
            )
        if settings.exec_channel == "agent" and not await podman.image_exists(settings.agent_image):
            die(
                f"the exec agent's image {settings.agent_image!r} is not present in local "
                "Podman storage. Build it (with the sandbox image) with `pod_exec_mcp_build`, "
                f"set {env_var('agent_image')}, or set {env_var('exec_channel')}=podman-exec."
            )
        # Bound now, listening only once uvicorn starts: a taken port fails here, and no
        # other process can take the port between this check and serving.
        sock = bind_socket(settings.host, settings.port)
    except (PodmanError, SettingsError) as exc:
        die(str(exc))
    try:
        removed = await sweep_orphans(podman)
    except PodmanError as exc:
        sock.close()
        die(str(exc))
    if removed:
        log.info("removed %d orphaned container(s) of dead servers", len(removed))

    if settings.network == "isolated" and not settings.strict and settings.exec_channel != "agent":
        log.warning(
            "network isolated needs the exec agent (it runs the egress proxy); with "
            "exec_channel podman-exec sandboxes have no network access at all"
        )
    _raise_nofile()
    rate_limit_accept_errors(asyncio.get_running_loop())

    instance = Instance.acquire()
    root_disks: RootDisks | None = None
    try:
        # Where Podman keeps sandboxes: for the disk headroom, and the disk-limit advice.
        facts = await podman_facts(podman)
        root_disks = _root_disks(settings, podman, facts)
        if root_disks is not None:
            await sweep_root_disks(root_disks, podman)
        await check_sandbox_settings(podman, settings, instance, facts, root_disks)
    except (PodmanError, SettingsError, OSError) as exc:
        sock.close()
        instance.release()
        if root_disks is not None:
            root_disks.close()
        die(str(exc))
    if (unenforced := unenforced_limits_warning(facts.cgroup_controllers)) is not None:
        log.warning("limits: %s", unenforced)
    if warnings := capacity_warnings(settings, host_state(facts.graph_root)):
        log.warning("capacity: %s", "; ".join(warnings))  # one line, however many
    if gets_root_disk(sandbox_spec(settings, "", {}), root_disks):
        assert root_disks is not None
        log.info(
            "disk limit: each sandbox gets a root disk of %s in %s",
            settings.disk_limit, root_disks.directory,
        )  # fmt: skip
    log.info("snapshots: %s", snapshot_support(settings, root_disks is not None))
    # The disk headroom is checked where sandboxes' disks take their space.
    disk_home = str(root_disks.directory) if root_disks is not None else facts.graph_root
    engine = PodmanEngine(
        podman,
        Headroom.of(settings, disk_home),
        root_disks,
        (settings.egress_max_connections, settings.egress_connections_per_second),
        settings.egress_head_timeout,
    )
    app = create_app(settings, engine, instance, auth, podman)
    sessions, metrics = app.sessions, app.metrics
    config = uvicorn.Config(
        app.asgi,
        lifespan="on",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
        # Our logging (logs.py) formats uvicorn's loggers; uvicorn must not set its own.
        log_config=None,
        log_level=None,
        http=http_protocol(settings),
    )
    port = sock.getsockname()[1]

    def serving() -> None:
        log.info(
            "serving MCP at http://%s:%d%s (instance %s, image %s, auth %s)",
            settings.host, port, MCP_PATH, instance.id, settings.image,
            "on" if auth else "off",
            extra={"instance": instance.id, "port": port, "image": settings.image},
        )  # fmt: skip

    server = _Server(config, serving)
    usage_writer = asyncio.create_task(_record_usage_forever(sessions, instance))
    then = None if root_disks is None else (lambda: sweep_root_disks(root_disks, podman))
    sweeper = (
        asyncio.create_task(sweep_forever(podman, settings.sweep_interval, then=then))
        if settings.sweep_interval > 0
        else None
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        usage_writer.cancel()
        metrics.close()
        if sweeper is not None:
            sweeper.cancel()
        # The lifespan's shutdown removed every sandbox (uvicorn runs it on a failed bind
        # too); releasing the lock lets a later sweep judge anything left by a crash.
        instance.release()
        if root_disks is not None:
            root_disks.close()
        sock.close()
        log.info("stopped; every sandbox of this server was removed")
    return 0 if server.started else 1


# How often a server records its sandboxes' kind and last use for `--list-containers`.
_USAGE_PERIOD = 5.0


async def _record_usage_forever(sessions: Sessions, instance: Instance) -> None:
    while True:
        try:
            write_usage(instance, *sessions.census())
        except OSError as exc:
            log.warning("could not record sandbox usage for --list-containers: %s", exc)
        await asyncio.sleep(_USAGE_PERIOD)


if __name__ == "__main__":
    sys.exit(main())
