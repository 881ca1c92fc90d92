from __future__ import annotations

import json

from tests.broker.conftest import recv_json, request_frame


async def test_publish_and_consume(live):
    slug = await live.create_topic(anonymous=True)
    async with live.connect(f"{slug}/sub-1") as consumer:
        first = await recv_json(consumer)
        assert first["properties"]["messageType"] == "api_info"
        async with live.connect(slug) as producer:
            await producer.send(request_frame(3))
            ack = await recv_json(producer)
            assert ack["result"] == "ok" and ack["context"] == 3
        got = await recv_json(consumer)
        assert got["messageId"] == ack["messageId"]
        await consumer.send(json.dumps({"messageId": got["messageId"]}))
