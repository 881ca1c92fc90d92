"""The broker's and the inference's metrics move with their traffic (read from this process's
registry, as a single-process ``/metrics`` reports them). On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import torch
from prometheus_client import REGISTRY

from tests.broker.conftest import live, recv_json, request_frame  # noqa: F401
from tests.inference.conftest import DropoutMLP, add_model  # noqa: F401


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


BROKER = (
    "flplatform_broker_messages_published_total",
    "flplatform_broker_messages_delivered_total",
    "flplatform_broker_messages_refused_total",
)


async def test_broker_counts_published_delivered_refused_and_sockets(live: Any) -> None:
    slug = await live.create_topic(anonymous=True)
    published, delivered, refused = (sample(name) for name in BROKER)
    consumers = sample("flplatform_broker_sockets", role="consumer")
    producers = sample("flplatform_broker_sockets", role="producer")
    async with live.connect(f"{slug}/sub-1") as consumer:
        await recv_json(consumer)  # api_info: the broker's own request, not a delivered message
        async with live.connect(slug) as producer:
            await producer.send(request_frame(3))
            assert (await recv_json(producer))["result"] == "ok"
            assert sample("flplatform_broker_sockets", role="producer") == producers + 1
            await producer.send("not json")
            assert (await recv_json(producer))["result"] != "ok"
        got = await recv_json(consumer)
        await consumer.send(json.dumps({"messageId": got["messageId"]}))
        assert sample("flplatform_broker_sockets", role="consumer") == consumers + 1
        async with live.connect("no-such-topic") as anonymous:  # anonymous callers create no topics
            await anonymous.send(request_frame(4))
            assert (await recv_json(anonymous))["result"] != "ok"
    assert [sample(name) for name in BROKER] == [published + 1, delivered + 1, refused + 2]
    for _ in range(100):  # the server ends a session just after the client saw the close
        if (
            sample("flplatform_broker_sockets", role="consumer"),
            sample("flplatform_broker_sockets", role="producer"),
        ) == (consumers, producers):
            break
        await asyncio.sleep(0.05)
    assert sample("flplatform_broker_sockets", role="consumer") == consumers
    assert sample("flplatform_broker_sockets", role="producer") == producers


async def test_inference_counts_requests_and_latency_per_method(
    client: Any, alice: Any, add_model: Any
) -> None:
    model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    before = sample("flplatform_inference_requests_total", method="NONE")
    seconds = sample("flplatform_inference_seconds_count", method="NONE")
    x = torch.zeros(2, 4).tolist()
    for _ in range(2):
        r = await client.post(
            "/api/inference/", headers=alice.headers, json={"model_id": str(model_id), "model_input": x}
        )
        assert r.status_code == 200, r.text
    assert sample("flplatform_inference_requests_total", method="NONE") == before + 2
    assert sample("flplatform_inference_seconds_count", method="NONE") == seconds + 2
