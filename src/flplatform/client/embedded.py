"""An ASGI app served by uvicorn inside the running event loop, on a socket bound up front
(so its URL is known before it starts, port 0 picks a free one)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from flplatform.serving import uvicorn_ws_options


class _Server(uvicorn.Server):
    """Leaves signal handling to the host program (several servers share one process here)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmbeddedServer:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            lifespan="auto",
            timeout_graceful_shutdown=5,
            **uvicorn_ws_options(),
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=[self._sock])
        except SystemExit as exc:  # uvicorn exits on a failed start-up; keep the host process alive
            raise RuntimeError(f"server on {self.url} failed to start (see the log above)") from exc

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raises the start-up failure
                raise RuntimeError("server stopped during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"server on {self.url} did not start within {timeout}s")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is None:
            self._sock.close()
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self._sock.close()

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()
