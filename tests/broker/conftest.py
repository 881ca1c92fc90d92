"""Broker fixtures: a real uvicorn serving the test app in the test's event loop (so tests can
reach ``app.state.broker`` directly), websocket helpers, and demessaging module runners."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
import websockets

from flplatform.broker import Broker
from flplatform.orm.broker import BrokerTopic, BrokerTopicGrant, StorePolicy
from flplatform.serving import uvicorn_ws_options
from tests.conftest import free_port


@dataclass
class LiveBroker:
    app: Any
    port: int

    @property
    def broker(self) -> Broker:
        return self.app.state.broker

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http_url, timeout=10, **kw)

    def connect(self, path: str, headers: dict[str, str] | None = None) -> Any:
        return websockets.connect(
            f"{self.ws_url}/{path}",
            additional_headers=headers or {},
            compression=None,
            max_size=None,
            open_timeout=30,  # a loaded 2-core machine can take seconds per handshake
        )

    async def create_topic(
        self,
        slug: str | None = None,
        *,
        public: bool = False,
        anonymous: bool = False,
        store: StorePolicy | None = None,
        dispatch: str = "broadcast",
        supports_dasf: bool = True,
        grants: list[tuple[Any, dict[str, bool]]] | None = None,
    ) -> str:
        """A topic straight in the database (``anonymous`` = the reference's ``--anonymous``)."""
        slug = slug or f"t_{uuid.uuid4().hex[:10]}"
        async with self.app.state.sessionmaker() as session:
            topic = BrokerTopic(
                slug=slug,
                is_public=public or anonymous,
                anonymous_can_consume=anonymous,
                store_messages=store,
                dispatch=dispatch,
                supports_dasf=supports_dasf,
                api_info={},
            )
            session.add(topic)
            await session.flush()
            for account, flags in grants or []:
                session.add(BrokerTopicGrant(topic_id=topic.id, user_id=account.user.id, **flags))
            await session.commit()
        await self.broker.invalidate(slug)
        return slug


@contextlib.asynccontextmanager
async def serve_live(app: Any, **ws_overrides: Any) -> AsyncIterator[LiveBroker]:
    """``app`` on uvicorn in this event loop, with the production websocket settings
    (``flplatform.serving``) except ``ws_overrides``."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        **uvicorn_ws_options(**ws_overrides),
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        if task.done():
            task.result()  # the start-up failure itself (e.g. a deprecation warning made an error)
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield LiveBroker(app, port)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def live(app: Any) -> AsyncIterator[LiveBroker]:
    async with serve_live(app) as server:
        yield server


async def recv_json(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def no_message(ws: Any, timeout: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), timeout)
    except TimeoutError:
        return True
    return False


def request_frame(context: int = 0, response_topic: str | None = None, **extra: Any) -> str:
    properties: dict[str, Any] = {"requestContext": context, "messageType": "request"}
    if response_topic:
        properties["response_topic"] = response_topic
    return json.dumps(
        {"properties": properties, "payload": "eyJmdW5jX25hbWUiOiJoZWxsbyJ9", "context": context, **extra}
    )
