"""The websocket transport under the broker (``flplatform.serving``: uvicorn's websockets-sansio):
the frame size limits and the keepalive pings the broker relies on still apply."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from flplatform.serving import WS_MAX_SIZE
from tests.broker.conftest import recv_json, request_frame, serve_live

UVICORN_DEFAULT_MAX_SIZE = 16 * 1024**2


async def _eventually(probe, expected, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := probe()) != expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return value


async def test_a_frame_above_uvicorns_default_limit_reaches_the_broker_and_gets_its_error_ack(live):
    """17 MiB: over the broker's 10 MiB message limit and uvicorn's 16 MiB default, under our 64 MiB
    ws_max_size. The broker answers with an error ack and the socket stays usable."""
    assert live.broker.config.max_message_bytes < UVICORN_DEFAULT_MAX_SIZE < 17 * 1024**2 < WS_MAX_SIZE
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    async with live.connect(slug) as producer:
        await producer.send(json.dumps({"payload": "x" * (17 * 1024**2), "context": 1}))
        ack = await recv_json(producer, 30)
        assert "error" in ack["result"] and "larger than" in ack["errorMsg"]
        await producer.send(request_frame(2))
        assert (await recv_json(producer))["result"] == "ok"


async def test_a_frame_above_ws_max_size_closes_the_socket_with_1009(app):
    async with serve_live(app, ws_max_size=1024**2) as live:
        slug = await live.create_topic(anonymous=True, supports_dasf=False)
        async with live.connect(slug) as producer:
            await producer.send(request_frame(1))
            assert (await recv_json(producer))["result"] == "ok"
            with pytest.raises(websockets.ConnectionClosed):
                await producer.send(json.dumps({"payload": "x" * (1024**2 + 1)}))
                await recv_json(producer)
            assert producer.close_code == 1009  # message too big


async def test_a_consumer_that_stops_answering_keepalive_pings_is_dropped_and_the_others_pinged(app):
    """A consumer whose host vanished sends no TCP close; uvicorn's keepalive (20 s in production,
    shortened here) drops it, and the broker's leave bookkeeping pings whoever is left (§3)."""
    async with serve_live(app, ws_ping_interval=0.2, ws_ping_timeout=0.5) as live:
        slug = await live.create_topic(anonymous=True)
        async with live.connect(f"{slug}/alive") as alive, live.connect(f"{slug}/frozen") as frozen:
            for ws in (alive, frozen):
                assert (await recv_json(ws))["properties"]["messageType"] == "api_info"
            assert live.broker.registry.count(slug) == 2
            await asyncio.sleep(1.0)  # several keepalive rounds: answered pings keep both
            assert live.broker.registry.count(slug) == 2
            frozen.transport.pause_reading()  # reads nothing more, so answers no ping
            assert await _eventually(lambda: live.broker.registry.count(slug), 1) == 1
            assert (await recv_json(alive))["properties"]["messageType"] == "ping"
            frozen.transport.resume_reading()
