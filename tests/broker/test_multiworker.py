"""Two real uvicorn worker processes on one PostgreSQL (issue 10, broker part): a producer on
worker 1 and a consumer on worker 2; the fan-out between them is LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import websockets

from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm.broker import BrokerTopic, StorePolicy
from tests.scale.harness import fleet, server_env

pytestmark = [pytest.mark.postgres_only, pytest.mark.slow]

TOTAL = 1000
LARGE = "L" * 12_000  # above the 8,000-byte NOTIFY limit: through the table
QUOTES = '"\\' * 1500  # 3 kB that doubles when escaped into a NOTIFY payload


def _payload(i: int) -> str:
    return LARGE if i % 97 == 0 else QUOTES if i % 89 == 0 else f"m{i}"


def _ws(url: str, path: str) -> Any:
    return websockets.connect(
        url.replace("http://", "ws://") + "/ws/" + path, compression=None, max_size=None, open_timeout=20
    )


async def _create_topics(db_url: str, topics: dict[str, StorePolicy]) -> None:
    engine = create_engine(db_url)
    async with create_sessionmaker(engine)() as session:
        for slug, policy in topics.items():
            session.add(
                BrokerTopic(
                    slug=slug,
                    is_public=True,
                    anonymous_can_consume=True,
                    store_messages=policy,
                    supports_dasf=False,
                    api_info={},
                )
            )
        await session.commit()
    await engine.dispose()


def _frame(i: int) -> str:
    return json.dumps(
        {"properties": {"requestContext": i, "messageType": "request"}, "payload": _payload(i), "context": i}
    )


async def _quick_acks(ws: Any, got: list[int]) -> None:
    while len(got) < TOTAL:
        message = json.loads(await ws.recv())
        got.append(message["context"])
        await ws.send(json.dumps({"messageId": message["messageId"]}))


async def _pipeline(producer_url: str, consumer_url: str, slug: str) -> list[int]:
    """Pipeline TOTAL messages into worker 1; return the contexts worker 2's consumer got. A
    consumer on worker 1 acknowledges everything at once (with ``cache`` the first ack deletes
    the stored row, maybe before worker 2 read it) and must get everything too."""
    received: list[int] = []
    local: list[int] = []
    async with (
        _ws(consumer_url, f"{slug}/on-worker-2") as consumer,
        _ws(producer_url, f"{slug}/on-1") as fast,
    ):
        quick = asyncio.create_task(_quick_acks(fast, local))
        await asyncio.sleep(0.2)  # the consumers are registered before anything is sent
        async with _ws(producer_url, slug) as producer:

            async def send_all() -> None:
                for i in range(TOTAL):
                    await producer.send(_frame(i))

            sender = asyncio.create_task(send_all())
            acks = [json.loads(await asyncio.wait_for(producer.recv(), 60))["result"] for _ in range(TOTAL)]
            await sender
        assert acks == ["ok"] * TOTAL
        while len(received) < TOTAL:
            message = json.loads(await asyncio.wait_for(consumer.recv(), 60))
            i = message["context"]
            assert message["payload"] == _payload(i)
            received.append(i)
            await consumer.send(json.dumps({"messageId": message["messageId"]}))
        try:
            extra = await asyncio.wait_for(consumer.recv(), 0.5)
        except TimeoutError:
            extra = None
        assert extra is None, f"unexpected extra delivery: {str(extra)[:200]}"
        await asyncio.wait_for(quick, 30)
    assert local == list(range(TOTAL))
    return received


async def test_producer_on_one_worker_consumer_on_the_other(db_url, tmp_path):
    run = uuid.uuid4().hex[:6]
    cached, unstored, backend = f"mw_cache_{run}", f"mw_disabled_{run}", f"mw_rpc_{run}"
    await _create_topics(
        db_url, {cached: StorePolicy.CACHE, unstored: StorePolicy.DISABLED, backend: StorePolicy.CACHE}
    )
    with fleet(server_env(db_url), tmp_path) as workers:
        one, two = await asyncio.to_thread(workers.start, 2)
        try:
            for slug in (cached, unstored):
                assert await _pipeline(one, two, slug) == list(range(TOTAL)), slug

            # A request/response round trip across the workers: the caller waits on worker 1 for
            # a response topic that does not exist yet; the backend listens on worker 2.
            response_topic = f"{backend}_AbCdEfGh"
            async with (
                _ws(two, f"{backend}/backend") as listener,
                _ws(one, f"{response_topic}/caller") as inbox,
            ):
                await asyncio.sleep(0.2)
                async with _ws(one, backend) as requester:
                    await requester.send(
                        json.dumps(
                            {
                                "properties": {
                                    "response_topic": response_topic,
                                    "requestContext": 0,
                                    "messageType": "request",
                                },
                                "payload": "",
                                "context": 0,
                            }
                        )
                    )
                    assert json.loads(await requester.recv())["result"] == "ok"
                request = json.loads(await asyncio.wait_for(listener.recv(), 20))
                await listener.send(json.dumps({"messageId": request["messageId"]}))
                async with _ws(two, request["properties"]["response_topic"]) as answer:
                    await answer.send(
                        json.dumps(
                            {
                                "properties": {
                                    "status": "success",
                                    "requestContext": "0",
                                    "messageType": "response",
                                    "source_topic": backend,
                                },
                                "context": "0",
                                "payload": "Ig==",
                            }
                        )
                    )
                    assert json.loads(await answer.recv())["result"] == "ok"
                response = json.loads(await asyncio.wait_for(inbox.recv(), 20))
                assert response["properties"]["messageType"] == "response" and response["context"] == "0"
        except BaseException:
            print(workers.logs())
            raise
