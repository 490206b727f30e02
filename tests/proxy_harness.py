"""The egress proxy's logic behind a loopback listener, for tests without Podman: every
lookup and connection it makes is recorded (the proof that a refusal came first)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from pod_exec_mcp.egress import EgressPolicy
from pod_exec_mcp.proxy import HEAD_TIMEOUT, SocketStream, connect, serve_connection

ip = ipaddress.ip_address


class Recorder:
    """The proxy behind a loopback listener, recording every lookup and connection."""

    def __init__(self, policy: EgressPolicy, names: dict[str, list[str]] | None = None) -> None:
        self.policy = policy
        self.names = names or {}
        self.resolved: list[str] = []
        self.connects: list[tuple[str, int]] = []
        self.port = 0
        self.head_timeout = HEAD_TIMEOUT

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
            head_timeout=self.head_timeout,
        )

    async def ask(self, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return data
