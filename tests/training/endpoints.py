"""Small asyncio HTTP endpoints that misbehave on purpose (for the notification tests): they
run in the test's event loop, next to the in-process server, and record what they saw."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

Behaviour = Callable[["Endpoint", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Endpoint:
    behaviour: Behaviour
    port: int = 0
    connections: int = 0
    requests: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (monotonic time, JSON body)
    bytes_sent: int = 0
    closed_after: list[float] = field(default_factory=list)  # seconds each exchange lasted
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    def url(self, path: str = "/hook/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def kinds(self) -> list[str]:
        return [body.get("notification_type", "") for _, body in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        started = time.monotonic()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            self.requests.append((time.monotonic(), json.loads(body) if body else {}))
            await self.behaviour(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the test is over (serving() cancels what still runs); end quietly
        finally:
            self.handlers.discard(task)
            self.closed_after.append(time.monotonic() - started)
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()


@asynccontextmanager
async def serving(behaviour: Behaviour, hosts: tuple[str, ...] = ("127.0.0.1",)) -> AsyncIterator[Endpoint]:
    endpoint = Endpoint(behaviour)
    server = await asyncio.start_server(endpoint._serve, host=list(hosts), port=0)
    endpoint.port = server.sockets[0].getsockname()[1]
    try:
        yield endpoint
    finally:
        server.close()
        for task in list(endpoint.handlers):
            task.cancel()
        await asyncio.gather(*endpoint.handlers, return_exceptions=True)


def answer(status: int, body: bytes = b"") -> Behaviour:
    async def behave(
        _endpoint: Endpoint, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body)) + body
        )
        await writer.drain()

    return behave


async def trickle(endpoint: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One byte per second of a valid answer: a per-read timeout never fires. Between bytes it
    watches for the client's hang-up, so ``closed_after`` says when the client gave up: a write
    notices a closed peer only at the second write after it (up to 2 s later, more on a busy
    machine: a CI run measured 4.7 s for a 3 s deadline)."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
        writer.write(bytes([byte]))
        await writer.drain()
        endpoint.bytes_sent += 1
        with suppress(TimeoutError):
            if not await asyncio.wait_for(reader.read(1), timeout=1.0):
                return  # end of stream: the client closed the connection


def huge_body(total: int = 1024**3, stop_at: int = 256 * 1024**2) -> Behaviour:
    """A 200 announcing ``total`` bytes, streamed in 64 KiB writes for as long as the client
    reads (``stop_at`` keeps a failing test short)."""

    async def behave(endpoint: Endpoint, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % total
        )
        chunk = b"x" * 65536
        while endpoint.bytes_sent < stop_at:
            writer.write(chunk)
            await writer.drain()
            endpoint.bytes_sent += len(chunk)

    return behave


async def silent(_endpoint: Endpoint, reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    """Accept, read the request, never answer (until the client hangs up)."""
    await reader.read()
