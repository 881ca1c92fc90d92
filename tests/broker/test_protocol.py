"""Wire contract (dasf-protocol.md §2): envelopes, acks, routes, status-ping, broker requests."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
import websockets
from sqlalchemy import func, select

from flplatform.orm.broker import BrokerMessage, BrokerTopic
from tests.broker.conftest import no_message, recv_json, request_frame


async def _stored(live, slug: str) -> int:
    await live.broker.flush()
    async with live.app.state.sessionmaker() as session:
        return (
            await session.execute(
                select(func.count())
                .select_from(BrokerMessage)
                .join(BrokerTopic)
                .where(BrokerTopic.slug == slug)
            )
        ).scalar_one()


async def test_envelope_forwarded_verbatim_with_id_and_publish_time(live):
    slug = await live.create_topic(anonymous=True)
    async with live.connect(f"{slug}/python-backend-2026-11-23T10:00:00.123456") as consumer:
        assert (await recv_json(consumer))["properties"]["messageType"] == "api_info"
        async with live.connect(slug) as producer:
            frame = {
                "properties": {"requestContext": 7, "messageType": "request", "custom": "x"},
                "payload": "",
                "context": 7,
                "extra": {"kept": [1, 2]},
            }
            await producer.send(json.dumps(frame))
            ack = await recv_json(producer)
            assert list(ack) == ["messageId", "context", "result"]
            assert ack["result"] == "ok" and ack["context"] == 7 and uuid.UUID(ack["messageId"]).version == 4
            got = await recv_json(consumer)
            assert list(got)[:4] == ["properties", "payload", "context", "extra"]
            assert got["extra"] == {"kept": [1, 2]} and got["properties"]["custom"] == "x"
            assert got["messageId"] == ack["messageId"]
            assert dt.datetime.fromisoformat(got["publishTime"]).utcoffset() == dt.timedelta(0)
            # String context keeps its type; a supplied messageId is kept; no context → no key.
            mine = str(uuid.uuid4())
            await producer.send(
                json.dumps(
                    {
                        "properties": {"requestContext": "3"},
                        "payload": "",
                        "context": "3",
                        "messageId": mine,
                        "publishTime": "old",
                    }
                )
            )
            ack = await recv_json(producer)
            assert ack == {"messageId": mine, "context": "3", "result": "ok"}
            got = await recv_json(consumer)
            assert got["messageId"] == mine and got["publishTime"] != "old"
            await producer.send(json.dumps({"payload": ""}))
            ack = await recv_json(producer)
            assert "context" not in ack and ack["result"] == "ok"
            assert "context" not in await recv_json(consumer)
            await consumer.send(json.dumps({"messageId": mine}))  # consumer ack: no reply
            assert await no_message(consumer, 0.2)


@pytest.mark.parametrize(
    "producer_path, consumer_path",
    [
        ("{slug}/", "{slug}/web-frontend-2025-01-01T12:00:00.000Z/"),
        ("{slug}?subscriptionType=Exclusive", "{slug}/sub.with:colons?subscriptionType=Exclusive"),
        (
            "v2/producer/persistent/public/default/{slug}",
            "v2/consumer/persistent/public/default/{slug}/backend-1",
        ),
    ],
)
async def test_route_variants(live, producer_path, consumer_path):
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    async with live.connect(consumer_path.format(slug=slug)) as consumer:
        async with live.connect(producer_path.format(slug=slug)) as producer:
            await producer.send(request_frame(1))
            assert (await recv_json(producer))["result"] == "ok"
        assert (await recv_json(consumer))["context"] == 1


async def test_unrouted_paths_are_refused_with_404(live):
    for path in ("a.b", "a/b/c", "/topic", "v2/producer/persistent/public/x", "a/b%20c", "a/b/c/d/e/f/g/h"):
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with live.connect(path):
                pass
        assert info.value.response.status_code == 404, path


async def test_status_ping_stores_pong_and_api_info(live, make_user):
    slug = await live.create_topic(anonymous=True)
    async with live.connect("status-ping") as pong:
        await pong.send(
            json.dumps(
                {
                    "properties": {"requestContext": "1", "messageType": "pong", "source_topic": slug},
                    "context": "1",
                    "payload": "",
                }
            )
        )
        ack = await recv_json(pong)
        assert ack["result"] == "ok" and ack["context"] == "1"
        api = {
            "classes": [],
            "functions": [{"name": "f", "rpc_schema": {}, "return_schema": {}}],
            "rpc_schema": {},
        }
        await pong.send(
            json.dumps(
                {
                    "properties": {
                        "api_info": json.dumps(api),
                        "requestContext": "1",
                        "messageType": "response",
                        "source_topic": slug,
                    },
                    "context": "1",
                    "payload": "",
                }
            )
        )
        assert (await recv_json(pong))["result"] == "ok"
        # No source topic, or one the caller may not consume: error acks, socket stays open.
        await pong.send(json.dumps({"properties": {"messageType": "pong"}, "context": 2}))
        ack = await recv_json(pong)
        assert "error" in ack["result"] and ack["errorMsg"] and ack["context"] == 2
        private = await live.create_topic()
        await pong.send(
            json.dumps({"properties": {"messageType": "pong", "source_topic": private}, "context": 3})
        )
        assert "error" in (await recv_json(pong))["result"]
    await live.broker.flush()
    async with live.app.state.sessionmaker() as session:
        topic = (await session.execute(select(BrokerTopic).where(BrokerTopic.slug == slug))).scalar_one()
    assert topic.last_pong is not None and topic.api_info == api


async def test_broker_requests_have_the_reference_shape(live):
    slug = await live.create_topic(anonymous=True)
    async with live.connect(f"{slug}/b") as consumer:
        api_info = await recv_json(consumer)
        await live.broker.ping_all()
        ping = await recv_json(consumer)
    for message, kind in ((api_info, "api_info"), (ping, "ping")):
        assert message["properties"] == {
            "requestContext": 1,
            "messageType": kind,
            "response_topic": "status-ping",
        }
        assert (
            message["payload"] == ""
            and uuid.UUID(message["messageId"])
            and isinstance(message["publishTime"], str)
        )


async def test_fragments_pass_through_in_order(live):
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    async with live.connect(f"{slug}/client") as consumer, live.connect(slug) as producer:
        for i in range(5):
            await producer.send(
                json.dumps(
                    {
                        "properties": {
                            "requestContext": "4",
                            "messageType": "response",
                            "fragment": i,
                            "num_fragments": 5,
                        },
                        "payload": "QUFB" * 1000,
                        "context": "4",
                    }
                )
            )
        for _ in range(5):
            assert (await recv_json(producer))["result"] == "ok"
        got = [(await recv_json(consumer))["properties"]["fragment"] for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]
    assert await _stored(live, slug) == 5  # cache: stored until acknowledged
