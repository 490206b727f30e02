"""Pure logic, tested without containers: settings, output bounding, tokens, run arguments."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from pathlib import Path

import pytest

from pod_exec_mcp.auth import AuthConfigError, StaticBearerTokens, auth_provider, principal_of
from pod_exec_mcp.config import Settings, SettingsError, load_settings
from pod_exec_mcp.engine import sandbox_spec
from pod_exec_mcp.instances import instance_alive, owner_key
from pod_exec_mcp.output import BoundedOutput
from pod_exec_mcp.podman_engine import run_arguments
from pod_exec_mcp.preflight import bind_socket
from pod_exec_mcp.sessions import session_key


def test_settings_precedence_env_then_flags() -> None:
    env = {"MCP_HOST": "127.0.0.2", "MCP_PORT": "9000", "POD_EXEC_MCP_IMAGE": "img"}
    assert load_settings({}, env).port == 9000
    settings = load_settings({"port": "9001"}, env)
    assert (settings.host, settings.port, settings.image) == ("127.0.0.2", 9001, "img")
    assert load_settings({}, {}).host == "127.0.0.1"


def test_settings_lists_and_bools_from_strings() -> None:
    env = {
        "POD_EXEC_MCP_ALLOWED_HOSTS": "a.example, b.example",
        "POD_EXEC_MCP_EXTRA_RUN_ARGS": "--env 'X=a b' --cap-add=NET_RAW",
        "POD_EXEC_MCP_NETWORK": "false",
    }
    settings = load_settings({}, env)
    assert settings.allowed_hosts == ["a.example", "b.example"]
    assert settings.extra_run_args == ["--env", "X=a b", "--cap-add=NET_RAW"]
    # The setting was a boolean: false still means no network.
    assert settings.network == "none"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"POD_EXEC_MCP_MAX_OUTPUT_BYTES": "10"}, "POD_EXEC_MCP_MAX_OUTPUT_BYTES"),
        ({"POD_EXEC_MCP_CPUS": "lots"}, "--cpus"),
        ({"MCP_PORT": "70000"}, "MCP_PORT"),
    ],
)
def test_bad_settings_name_their_source(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings({}, env)


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.5.5.5"):
        assert Settings(host=host).binds_loopback
    for host in ("0.0.0.0", "::", "192.168.1.2", "example.com"):
        assert not Settings(host=host).binds_loopback


def test_bounded_output_small_is_untouched() -> None:
    out = BoundedOutput(1024)
    for chunk in (b"hello ", b"world\n"):
        out.feed(chunk)
    assert (out.text(), out.truncated, out.total) == ("hello world\n", False, 12)


def test_bounded_output_keeps_head_and_tail_exactly() -> None:
    out = BoundedOutput(1000)
    data = b"".join(b"%06d\n" % i for i in range(10_000))
    for i in range(0, len(data), 777):
        out.feed(data[i : i + 777])
    text = out.text()
    assert out.truncated and out.total == len(data)
    head, marker, tail = text.partition("\n[pod_exec_mcp: ")
    assert head.encode() == data[:500]
    assert marker and f"{len(data) - 1000} bytes of output omitted" in tail
    assert tail.split("]\n", 1)[1].encode() == data[-500:]


def test_bounded_output_invalid_utf8_is_replaced() -> None:
    out = BoundedOutput(1024)
    out.feed(b"ok \xff\xfe \xe2\x82")
    assert out.text() == "ok \ufffd\ufffd \ufffd"


async def test_token_verifier_accepts_only_known_tokens() -> None:
    verifier = StaticBearerTokens(["a" * 20, "b" * 20])
    ok = await verifier.verify_token("b" * 20)
    assert ok is not None and ok.client_id == principal_of("b" * 20)
    assert await verifier.verify_token("c" * 20) is None
    assert await verifier.verify_token("") is None
    assert principal_of("a" * 20) != principal_of("b" * 20)
    assert "a" * 20 not in principal_of("a" * 20)


def test_auth_is_required_off_loopback_and_tokens_must_be_long(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no default token file there
    assert auth_provider(Settings(host="127.0.0.1")) is None
    with pytest.raises(AuthConfigError, match="without authentication"):
        auth_provider(Settings(host="0.0.0.0"))
    with pytest.raises(AuthConfigError, match="does not exist"):
        auth_provider(Settings(auth_token_file=str(tmp_path / "missing")))
    with pytest.raises(AuthConfigError, match="at least 16"):
        auth_provider(Settings(auth_token="short"))
    assert auth_provider(Settings(host="0.0.0.0", auth_token="x" * 16)) is not None
    (tmp_path / "tokens").write_text("# comment\n" + "t" * 16 + "\n")
    assert auth_provider(Settings(host="::", auth_token_file=str(tmp_path / "tokens")))


def test_session_keys_hash_ids_and_separate_principals() -> None:
    key = session_key(None, "explicit", "abc")
    assert "abc" not in key and len(key) == 32
    assert key != session_key("someone", "explicit", "abc")
    assert key != session_key(None, "legacy", "abc")


def test_run_arguments_default_and_strict() -> None:
    args = run_arguments(sandbox_spec(Settings(), "name", {"k": "v"}), "agentvol")
    assert args[:4] == ["run", "--detach", "--rm", "--name"]
    assert "--label" in args and "k=v" in args
    assert args[args.index("nofile=4096:4096") - 1 :][:2] == ["--ulimit", "nofile=4096:4096"]
    assert "nproc=4096:4096" in args and "no-new-privileges" in args
    # The agent, mounted read-only from its volume, is the sandbox's init (no --init).
    mount = "agentvol:/.pod_exec_mcp:ro"
    assert args[args.index(mount) - 1] == "--volume" and "--init" not in args
    assert args[-4:] == ["pod_exec_mcp_base", "/.pod_exec_mcp/agent", "init", "86400"]
    # Default: isolated, i.e. no network device, and the proxy in the environment.
    assert "--network=none" in args
    assert args[args.index("HTTPS_PROXY=http://127.0.0.1:3128") - 1] == "--env"
    assert "http_proxy=http://127.0.0.1:3128" in args and "no_proxy=localhost,127.0.0.1,::1" in args
    bridge = run_arguments(sandbox_spec(Settings(network="bridge"), "n", {}))
    assert not any(a.startswith("--network") or "PROXY" in a.upper() for a in bridge)
    strict = run_arguments(sandbox_spec(Settings(strict=True, sandbox_lifetime=0), "n", {}), "v")
    assert {"--cap-drop=ALL", "--read-only", "--network=none"} <= set(strict)
    assert strict[-1] == "0"
    # network=False: the boolean form of earlier releases, still accepted.
    for off in (Settings(network=False), Settings(network="none")):  # type: ignore[arg-type]
        none = run_arguments(sandbox_spec(off, "n", {}))
        assert "--network=none" in none and not any("PROXY" in a for a in none)
    assert not any("PROXY" in a for a in strict)
    plain = run_arguments(sandbox_spec(Settings(exec_channel="podman-exec"), "n", {}))
    # Without the agent: podman's own init, and no agent volume (not even a stray one).
    assert plain[:4] == ["run", "--detach", "--rm", "--init"]
    assert not any(".pod_exec_mcp" in a for a in plain), plain
    assert plain[-3:] == ["pod_exec_mcp_base", "sleep", "86400"]


def test_owner_id_is_minted_once_per_lock_dir(tmp_path: Path) -> None:
    first = owner_key(tmp_path / "a")
    assert first == owner_key(tmp_path / "a") and first.isalnum()
    assert first != owner_key(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["owner"]


def test_instance_liveness_follows_its_lock(tmp_path: Path) -> None:
    from pod_exec_mcp.instances import Instance

    instance = Instance.acquire(tmp_path)
    assert instance_alive(tmp_path, instance.id)
    assert not instance_alive(tmp_path, "0123456789abcdef")
    assert not instance_alive(tmp_path, "../../etc/passwd")
    instance.release()
    assert not instance_alive(tmp_path, instance.id)


def test_a_dead_instance_stays_dead_while_another_prober_checks_it(tmp_path: Path) -> None:
    # A dead server's lock file, mid-check by another prober (a live server's periodic
    # sweep holds it while it cleans up): that prober is not the owner.
    lock = tmp_path / "0123456789abcdef.lock"
    lock.write_text("4242\n")
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert not instance_alive(tmp_path, "0123456789abcdef")
    finally:
        os.close(fd)


async def test_the_listening_socket_turns_nagle_off_for_each_connection() -> None:
    # The server binds its own socket and hands it to uvicorn, which serves it with
    # loop.create_server(sock=...), as here. With Nagle on, a response's body waited for the
    # client's delayed ACK (+40 ms per tool call, measured over the loopback).
    listening = bind_socket("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=listening)
    async with server:
        _, writer = await asyncio.open_connection(*listening.getsockname())
        assert await asyncio.wait_for(accepted, 10) != 0
        writer.close()


def test_label_filters_are_all_checked() -> None:
    from pod_exec_mcp.podman import has_labels

    labels = {"a": "1", "b": "2"}
    assert has_labels(labels, ("a=1", "b=2")) and has_labels(labels, ("a",))
    # Podman 4.3 ORs several label filters of `images`: every one must hold here.
    assert not has_labels(labels, ("a=1", "b=3")) and not has_labels(labels, ("c",))
    assert not has_labels(labels, ("a=",)) and has_labels({"a": ""}, ("a=",))


def test_snapshot_principal_label_hides_the_principal() -> None:
    from pod_exec_mcp.sessions import principal_label

    assert principal_label("token-a") != principal_label("token-b") != principal_label(None)
    assert "token-a" not in principal_label("token-a") and len(principal_label(None)) == 32


def test_image_creation_times_of_both_podman_formats() -> None:
    from pod_exec_mcp.podman_engine import _wall_clock

    assert _wall_clock(1796413102) == 1796413102.0
    assert _wall_clock("2026-12-04T19:38:22.752562369Z") == pytest.approx(1796413102.752562)
    assert _wall_clock("soon") == 0.0 and _wall_clock(None) == 0.0


def test_start_up_says_what_snapshots_this_host_can_take() -> None:
    from pod_exec_mcp.cli import snapshot_support

    assert "tar of each root disk" in snapshot_support(Settings(), True)
    assert "ids shifted back" in snapshot_support(Settings(disk_limit="0"), False)
    assert "podman commit" in snapshot_support(Settings(userns="host"), False)
    assert "podman commit" in snapshot_support(Settings(runtime="runsc"), False)
    assert "file-system only" in snapshot_support(Settings(), True)
    assert "turned off" in snapshot_support(Settings(max_snapshots_per_principal=0), True)
    assert snapshot_support(Settings(strict=True), False).startswith("none")
