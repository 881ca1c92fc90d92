"""Each place where the reference broker is wrong (dasf-protocol.md §7) has a test here."""

from __future__ import annotations

import asyncio
import json
import uuid

from sqlalchemy import func, select

from flplatform.orm.broker import BrokerMessage, BrokerTopic, ResponseTopic, StorePolicy
from tests.broker.conftest import no_message, recv_json, request_frame


async def _count(live, slug: str) -> int:
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


async def test_refused_publish_gets_an_error_ack(live, bob):
    slug = await live.create_topic()  # private
    async with live.connect(slug) as anonymous, live.connect(slug, headers=bob.headers) as stranger:
        for ws in (anonymous, stranger):
            await ws.send(request_frame(5))
            ack = await recv_json(ws)
            assert "error" in ack["result"] and "not allowed to publish" in ack["errorMsg"]
            assert ack["context"] == 5  # demessaging maps the failure to the waiting request
    # Anonymous callers cannot create topics; authenticated ones create them and own them.
    fresh = f"new_{uuid.uuid4().hex[:8]}"
    async with live.connect(fresh) as anonymous:
        await anonymous.send(request_frame(1))
        assert "error" in (await recv_json(anonymous))["result"]
    async with live.connect(fresh, headers=bob.headers) as creator:
        await creator.send(request_frame(1))
        assert (await recv_json(creator))["result"] == "ok"
    async with live.http(headers=bob.headers) as http:
        topic = (await http.get(f"/api/broker/topics/{fresh}/")).json()
    assert topic["owner_id"] == bob.id


async def test_malformed_input_gets_error_acks_and_the_socket_stays_open(live):
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    other = await live.create_topic()
    live.broker.config.max_message_bytes = 4096
    bad_frames = [
        "not json",
        "[1, 2]",
        json.dumps({"messageId": "not-a-uuid", "payload": "", "context": 1}),
        json.dumps({"messageId": 12, "payload": ""}),
        json.dumps({"properties": {"requestContext": "abc"}, "payload": ""}),
        json.dumps({"properties": "nope", "payload": ""}),
        json.dumps({"properties": {"response_topic": other, "requestContext": 1}, "payload": ""}),
        json.dumps({"properties": {"response_topic": "bad slug!"}, "payload": ""}),
        json.dumps({"payload": "x" * 5000}),
    ]
    async with live.connect(slug) as producer:
        for frame in bad_frames:
            await producer.send(frame)
            ack = await recv_json(producer)
            assert "error" in ack["result"] and ack["errorMsg"], frame[:60]
        await producer.send(b"\xff\xfe binary garbage")
        assert "error" in (await recv_json(producer))["result"]
        # Still open and working.
        await producer.send(request_frame(9))
        assert (await recv_json(producer))["result"] == "ok"
    assert await _count(live, slug) == 1  # only the valid one; nothing half-stored
    async with live.connect(f"{slug}/sub") as consumer:
        assert (await recv_json(consumer))["context"] == 9  # redelivered (cache)
        for frame in ("{}", "garbage", json.dumps({"messageId": "nope"}), "x" * 5000):
            await consumer.send(frame)
            assert "error" in (await recv_json(consumer))["result"]
        await consumer.send(json.dumps({"messageId": str(uuid.uuid4())}))  # unknown id: ignored quietly
        assert await no_message(consumer, 0.2)
    # A response topic already answering another source topic is a collision too (the reference
    # crashed the socket on the unique slug); the first source keeps it.
    second = await live.create_topic(anonymous=True, supports_dasf=False)
    shared = f"{slug}_answers"
    async with live.connect(slug) as first_producer, live.connect(second) as second_producer:
        await first_producer.send(request_frame(1, shared))
        assert (await recv_json(first_producer))["result"] == "ok"
        await second_producer.send(request_frame(2, shared))
        ack = await recv_json(second_producer)
        assert "error" in ack["result"] and "collides" in ack["errorMsg"] and ack["context"] == 2
        await second_producer.send(request_frame(3))
        assert (await recv_json(second_producer))["result"] == "ok"
    assert await _count(live, second) == 1


async def test_repeated_message_id_is_refused_without_storing_twice(live):
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    mine = str(uuid.uuid4())
    async with live.connect(slug) as producer:
        await producer.send(json.dumps({"messageId": mine, "payload": "", "context": 1}))
        await producer.send(json.dumps({"messageId": mine, "payload": "", "context": 2}))
        first, second = await recv_json(producer), await recv_json(producer)
    assert first["result"] == "ok" and "error" in second["result"] and second["context"] == 2
    assert await _count(live, slug) == 1


async def _no_loss(live, policy: StorePolicy, total: int) -> None:
    live.broker.config.consumer_queue_size = 64  # make back-pressure kick in early
    slug = await live.create_topic(anonymous=True, store=policy, supports_dasf=False)
    received: list[int] = []

    async def slow_consumer(ws) -> None:
        while len(received) < total:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            received.append(message["context"])
            await ws.send(json.dumps({"messageId": message["messageId"]}))
            if len(received) % 500 == 0:
                await asyncio.sleep(0.2)  # slow: the producer must be held back, not dropped

    async with live.connect(f"{slug}/slow") as consumer:
        reader = asyncio.create_task(slow_consumer(consumer))
        async with live.connect(slug) as producer:

            async def send_all() -> None:
                for i in range(total):
                    await producer.send(json.dumps({"payload": "", "context": i}))

            sender = asyncio.create_task(send_all())
            acks = [json.loads(await asyncio.wait_for(producer.recv(), 30))["result"] for _ in range(total)]
            await sender
        await asyncio.wait_for(reader, 60)
    assert acks == ["ok"] * total
    assert received == list(range(total))  # every message, in order


async def test_pipelined_messages_to_a_slow_consumer_all_arrive_in_order(live):
    await _no_loss(live, StorePolicy.DISABLED, 10_000)


async def test_no_loss_with_cache_policy(live):
    await _no_loss(live, StorePolicy.CACHE, 2_000)
    # Everything was acknowledged, so nothing stays stored.


async def test_anonymous_response_topics_are_bound_to_their_waiting_sockets(live):
    """Another anonymous caller cannot read an anonymous response topic by guessing its slug."""
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    response_topic = f"{slug}_AbCdEfGh"
    async with live.connect(f"{slug}/backend") as backend, live.connect(f"{response_topic}/me") as mine:
        async with live.connect(slug) as requester:
            await requester.send(request_frame(0, response_topic))
            assert (await recv_json(requester))["result"] == "ok"
        request = await recv_json(backend)
        async with live.connect(f"{response_topic}/guesser") as guesser:
            async with live.connect(response_topic) as answer:
                await answer.send(
                    json.dumps(
                        {
                            "properties": {
                                "status": "success",
                                "requestContext": "0",
                                "messageType": "response",
                                "source_topic": slug,
                            },
                            "context": "0",
                            "payload": "Ig==",
                        }
                    )
                )
                assert (await recv_json(answer))["result"] == "ok"
            got = await recv_json(mine)
            assert got["properties"]["messageType"] == "response" and request["messageId"]
            assert await no_message(guesser, 0.5)
    async with live.app.state.sessionmaker() as session:
        topic = (
            await session.execute(select(ResponseTopic).where(ResponseTopic.slug == response_topic))
        ).scalar_one()
    assert topic.requester_id is None and topic.is_public is False


async def test_response_topic_grants_follow_the_source_topic(live, alice, bob, make_user):
    """Requester consumes; whoever may consume the source topic may answer, also when granted later
    (the reference took a snapshot at creation)."""
    carol = await make_user("carol")
    slug = await live.create_topic(grants=[(bob, {"can_consume": True}), (alice, {"can_produce": True})])
    response_topic = f"{slug}_resp"
    async with live.connect(f"{response_topic}/alice", headers=alice.headers) as inbox:
        async with live.connect(slug, headers=alice.headers) as requester:
            await requester.send(request_frame(0, response_topic))
            assert (await recv_json(requester))["result"] == "ok"
        async with live.http(headers=alice.headers) as http:
            assert (
                await http.put(f"/api/broker/topics/{slug}/grants/carol/", json={"can_consume": True})
            ).status_code == 403
        async with live.app.state.sessionmaker() as session:
            from flplatform.broker import service

            topic = await service.get_topic(session, slug)
            await service.set_grant(session, topic, carol.user, can_consume=True)
            await session.commit()
        await live.broker.invalidate(None)
        for account, context in ((bob, "1"), (carol, "2")):
            async with live.connect(response_topic, headers=account.headers) as answer:
                await answer.send(
                    json.dumps(
                        {
                            "properties": {"requestContext": context, "messageType": "response"},
                            "context": context,
                            "payload": "",
                        }
                    )
                )
                assert (await recv_json(answer))["result"] == "ok"
            assert (await recv_json(inbox))["context"] == context
        async with live.connect(response_topic) as anonymous:
            await anonymous.send(json.dumps({"payload": "", "context": 3}))
            assert "error" in (await recv_json(anonymous))["result"]


async def test_store_does_not_flood_a_new_consumer_unless_asked(live, alice, bob):
    slug = await live.create_topic(
        anonymous=True,
        store=StorePolicy.STORE,
        supports_dasf=False,
        grants=[(alice, {"can_consume": True}), (bob, {"can_consume": True})],
    )
    async with live.connect(slug) as producer:
        for i in range(3):
            await producer.send(request_frame(i))
            assert (await recv_json(producer))["result"] == "ok"
    async with live.connect(f"{slug}/a", headers=alice.headers) as consumer:
        assert await no_message(consumer, 0.4)  # brand-new: history is not replayed
        async with live.connect(slug) as producer:
            await producer.send(request_frame(10))
            await recv_json(producer)
        assert (await recv_json(consumer))["context"] == 10
    async with live.connect(f"{slug}/b?history=all", headers=bob.headers) as consumer:
        got = [(await recv_json(consumer))["context"] for _ in range(4)]
    assert got == [0, 1, 2, 10]


async def test_shared_dispatch_splits_messages_between_backends(live):
    slug = await live.create_topic(
        anonymous=True, supports_dasf=False, dispatch="shared", store=StorePolicy.DISABLED
    )
    async with live.connect(f"{slug}/one") as one, live.connect(f"{slug}/two") as two:
        async with live.connect(slug) as producer:
            for i in range(20):
                await producer.send(request_frame(i))
            for _ in range(20):
                assert (await recv_json(producer))["result"] == "ok"
        got_one, got_two = [], []
        for ws, got in ((one, got_one), (two, got_two)):
            while True:
                try:
                    got.append((await recv_json(ws, 0.5))["context"])
                except TimeoutError:
                    break
    assert sorted(got_one + got_two) == list(range(20))
    assert got_one and got_two and not set(got_one) & set(got_two)


async def test_bodies_that_grow_when_escaped_are_published(live):
    """On PostgreSQL small envelopes ride inside the NOTIFY payload (8,000-byte limit), where
    their quotes and backslashes are escaped again: a 6 kB body of quotes doubles. It must go
    through the table instead of failing the writer's batch."""
    quotes = '"\\' * 1500
    for policy in (StorePolicy.CACHE, StorePolicy.DISABLED):
        slug = await live.create_topic(anonymous=True, store=policy, supports_dasf=False)
        async with live.connect(f"{slug}/sub") as consumer, live.connect(slug) as producer:
            for context in range(3):
                await producer.send(json.dumps({"payload": quotes, "context": context}))
            assert [(await recv_json(producer))["result"] for _ in range(3)] == ["ok"] * 3
            got = [await recv_json(consumer) for _ in range(3)]
        assert [m["context"] for m in got] == [0, 1, 2] and got[0]["payload"] == quotes
