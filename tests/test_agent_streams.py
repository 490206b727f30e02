"""The agent's multiplexed streams (the egress proxy's transport), against the real agent in a
real sandbox: relay integrity, per-stream flow control (a stalled stream blocks neither the
channel nor the others, and holds bounded memory), and bad stream frames."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
from collections.abc import Callable

from test_agent import agent_vol, attach_argv, channel, new_sandbox, parse_frames, run, sandbox

from pod_exec_mcp.agent_channel import HEADER, T_BYE, T_ERROR, T_HELLO_OK, T_PONG, fd_serve_argv
from pod_exec_mcp.agent_streams import T_LISTENING, T_STREAM_OPEN, AgentStream

__all__ = ["agent_vol", "new_sandbox", "sandbox"]  # fixtures, re-exported for pytest

CLIENT = """
import socket, sys, hashlib
s = socket.create_connection(("127.0.0.1", 3128))
data = bytes(range(256)) * (int(sys.argv[1]) // 256)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
got = bytearray()
while chunk := s.recv(1 << 16):
    got += chunk
print(len(got), hashlib.sha256(got).hexdigest() == hashlib.sha256(data[::-1]).hexdigest())
"""


async def test_streams_relay_and_flow_control(sandbox: str) -> None:
    stalled: list[AgentStream] = []
    release = asyncio.Event()

    async def handler(stream: AgentStream) -> None:
        first = await stream.read(1)
        if first == b"S":  # a client this handler never reads from again, until released
            stalled.append(stream)
            await release.wait()
            return
        data = bytearray(first)
        while chunk := await stream.read(1 << 16):
            data += chunk
        await stream.write(bytes(data[::-1]))
        await stream.write_eof()

    async with channel(sandbox, on_stream=handler) as chan:  # type: ignore[arg-type]
        assert await chan.listen("127.0.0.1", 3128) == 3128
        # A stalled stream: its client keeps writing 64 MiB that nobody reads.
        stall = asyncio.ensure_future(
            run(
                chan,
                'python3 -c \'import socket; s=socket.create_connection(("127.0.0.1",3128)); '
                's.sendall(b"S" + bytes(64 << 20))\' & sleep 3; '
                "grep VmRSS /proc/$(pgrep -f 'agent serve' | head -1)/status",
                timeout=60,
            )
        )
        # Meanwhile another connection relays 8 MiB both ways, intact.
        _, out = await run(chan, f"python3 -c '{CLIENT}' {8 << 20}", timeout=60)
        assert out.split() == [str(8 << 20).encode(), b"True"], out
        ran, rss = await stall
        assert stalled and ran.status == 0
        # The agent holds at most a window per stream, not the 64 MiB the client pushed.
        assert int(rss.split()[1]) < 32 * 1024, rss
        release.set()


# Asks, waits (the host splices meanwhile), sends a 5-byte body and more, prints the answer.
SPLICE_CLIENT = """
import socket, time
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"ASK 5 ")
time.sleep(1)
s.sendall(b"helloEXTRA")
print(s.makefile("rb").read().decode())
"""


async def test_spliced_stream_over_the_pass_socket(sandbox: str) -> None:
    """The real agent takes a connection over its pass socket and copies it itself: the
    client's request (after what the host wrote first) reaches the destination, the
    destination's answer reaches the client. A stale descriptor queued before it (for a
    stream whose SPLICE never came) is skipped, not taken for this one."""
    results: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
    destination, agent_side = socket.socketpair()
    destination.setblocking(False)
    agent_side.setblocking(False)

    async def handler(stream: AgentStream) -> None:
        head = await stream.read(6)  # "ASK 5 "
        stale_a, stale_b = socket.socketpair()
        assert stream._mux.pass_fd(0x80000999, stale_a.fileno())
        stale_a.close()
        stale_b.close()
        results.put_nowait(await stream.splice(agent_side, b"FIRST:" + head, 5, one_request=True))

    host_end, child_end = socket.socketpair()
    host_pass, child_pass = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = fd_serve_argv(["podman"], sandbox, child_end.fileno(), child_pass.fileno())
    kwargs = {"sock": host_end, "child_sock": child_end}
    kwargs |= {"pass_sock": host_pass, "child_pass_sock": child_pass}
    async with channel(sandbox, argv, on_stream=handler, **kwargs) as chan:  # type: ignore[arg-type]
        assert await chan.listen("127.0.0.1", 3128) == 3128
        client = asyncio.ensure_future(
            run(
                chan,
                f"python3 -c '{SPLICE_CLIENT}'",
                timeout=20,
            )
        )
        loop = asyncio.get_running_loop()
        got = b""
        while len(got) < len(b"FIRST:ASK 5 hello"):
            got += await asyncio.wait_for(loop.sock_recv(destination, 100), 10)
        assert got == b"FIRST:ASK 5 hello"  # the budget kept EXTRA out
        await loop.sock_sendall(destination, b"answer")
        destination.close()  # the answer is over: ONE_REQUEST ends the exchange
        assert await asyncio.wait_for(results.get(), 10) == (5, 6)
        _, out = await asyncio.wait_for(client, 20)
    assert out == b"answer\n"
    agent_side.close()


def test_bad_stream_frames_get_errors_or_are_dropped(new_sandbox: Callable[..., str]) -> None:
    name = new_sandbox()
    hello = HEADER.pack(1, 0, 0, 0, 8) + struct.pack(">HHI", 1, 1, 0)

    def listen(fid: int, address: bytes, port: int = 3128, size: int = 16) -> bytes:
        payload = (address + struct.pack(">HHII", port, 0, 65536, 65536))[:size]
        return HEADER.pack(0x10, 0, 0, fid, len(payload)) + payload

    frames = [
        hello,
        listen(5, bytes([10, 0, 0, 1])),  # not loopback: refused
        listen(6, bytes([127, 0, 0, 1]), size=12),  # short: refused
        listen(0x80000001, bytes([127, 0, 0, 1])),  # an agent-side id: refused
        listen(7, bytes([127, 0, 0, 1])),  # listens
        listen(8, bytes([127, 0, 0, 1])),  # twice: refused
        # Frames for streams that do not exist are dropped without a word.
        HEADER.pack(0x11, 0, 0, 0x80000005, 3) + b"abc",
        HEADER.pack(0x12, 0, 0, 0x80000005, 0),
        HEADER.pack(0x13, 0, 0, 0x80000005, 2) + b"xx",
        HEADER.pack(0x14, 0, 0, 3, 0),
        HEADER.pack(6, 0, 0, 77, 0),  # PING
        HEADER.pack(7, 0, 0, 0, 4) + struct.pack(">I", 100),  # SHUTDOWN
    ]
    done = subprocess.run(
        attach_argv(name), input=b"".join(frames), capture_output=True, timeout=60
    )
    got = parse_frames(done.stdout)
    assert [(t, i) for t, i, _ in got] == [
        (T_HELLO_OK, 0), (T_ERROR, 5), (T_ERROR, 6), (T_ERROR, 0), (T_LISTENING, 7),
        (T_ERROR, 8), (T_PONG, 77), (T_BYE, 0),
    ], got  # fmt: skip
    assert b"only on loopback" in got[1][2] and b"already listening" in got[5][2]
    assert got[4][2][:2] == struct.pack(">H", 3128)
    assert done.returncode == 0
    assert T_STREAM_OPEN not in [t for t, _, _ in got]
