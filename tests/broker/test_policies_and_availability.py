"""Store policies across reconnects (dasf-protocol.md §5), availability with an injected clock
and the reference's HTTP views (§3), response-topic GC (§4), the ``flplatform topic`` CLI.

Reference bugs covered here: 7 (a consumer leaving a topic that never came), 8 (status texts),
9 (one availability definition), 10 (token auth on the HTTP views)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging

import pytest
from sqlalchemy import select

from flplatform.broker import FakeClock
from flplatform.orm.broker import BrokerTopic, StorePolicy
from tests.broker.conftest import no_message, recv_json, request_frame


async def _publish(live, slug: str, contexts, headers=None) -> None:
    async with live.connect(slug, headers=headers) as producer:
        for context in contexts:
            await producer.send(request_frame(context))
            assert (await recv_json(producer))["result"] == "ok"


async def _take(ws, count: int) -> list[dict]:
    """Exactly ``count`` frames, then nothing more for a moment (robust on a loaded machine)."""
    got = [await recv_json(ws, 10) for _ in range(count)]
    assert await no_message(ws, 0.3)
    return got


async def _eventually(probe, expected, timeout: float = 10.0):
    """Poll ``probe()`` until it returns ``expected`` (frames are handled asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if value == expected or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.05)


def _utc(text: str | None) -> dt.datetime | None:
    """An API timestamp (naive means UTC)."""
    if text is None:
        return None
    parsed = dt.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


async def _counts(live, slug: str) -> tuple[int, int]:
    from flplatform.broker import service

    await live.broker.flush()
    async with live.app.state.sessionmaker() as session:
        topic = await service.get_topic(session, slug)
        return (await service.message_counts(session, [topic.id]))[topic.id]


async def test_cache_redelivers_unacknowledged_messages_on_reconnect(live):
    slug = await live.create_topic(anonymous=True, store=StorePolicy.CACHE)
    await _publish(live, slug, [0, 1, 2])
    async with live.connect(f"{slug}/backend") as consumer:
        got = await _take(consumer, 3)
        # Outstanding messages first, in order, and no api_info request after them (reference).
        assert [m.get("context") for m in got] == [0, 1, 2]
        for message in got[:2]:
            await consumer.send(json.dumps({"messageId": message["messageId"]}))
        assert await _eventually(lambda: _counts(live, slug), (1, 1)) == (1, 1)  # the first ack deletes
    async with live.connect(f"{slug}/backend") as consumer:
        assert [m["context"] for m in await _take(consumer, 1)] == [2]


async def test_cacheall_keeps_a_message_until_every_consumer_acknowledged(live, alice, bob):
    slug = await live.create_topic(
        store=StorePolicy.CACHEALL,
        supports_dasf=False,
        public=True,
        grants=[(alice, {"can_consume": True}), (bob, {"can_consume": True})],
    )
    await _publish(live, slug, [0, 1])
    async with live.connect(f"{slug}/a", headers=alice.headers) as consumer:
        for message in await _take(consumer, 2):
            await consumer.send(json.dumps({"messageId": message["messageId"]}))
        # Acknowledged by alice, still stored for bob.
        assert await _eventually(lambda: _counts(live, slug), (0, 2)) == (0, 2)
    async with live.connect(f"{slug}/a", headers=alice.headers) as consumer:
        assert await no_message(consumer)  # alice has nothing outstanding
    async with live.connect(f"{slug}/b", headers=bob.headers) as consumer:
        got = await _take(consumer, 2)
        assert [m["context"] for m in got] == [0, 1]
        for message in got:
            await consumer.send(json.dumps({"messageId": message["messageId"]}))
        assert await _eventually(lambda: _counts(live, slug), (0, 0)) == (0, 0)


async def test_store_keeps_messages_and_redelivers_only_what_a_user_missed(live, alice):
    slug = await live.create_topic(
        store=StorePolicy.STORE, supports_dasf=False, public=True, grants=[(alice, {"can_consume": True})]
    )
    async with live.connect(f"{slug}/a", headers=alice.headers) as consumer:  # subscribes now
        await _publish(live, slug, [0, 1, 2])
        got = await _take(consumer, 3)
        await consumer.send(json.dumps({"messageId": got[0]["messageId"]}))
        assert await _eventually(lambda: _counts(live, slug), (2, 3)) == (2, 3)  # stored forever
    async with live.connect(f"{slug}/a", headers=alice.headers) as consumer:
        assert [m["context"] for m in await _take(consumer, 2)] == [1, 2]


async def test_disabled_stores_nothing_and_redelivers_nothing(live):
    slug = await live.create_topic(anonymous=True, store=StorePolicy.DISABLED, supports_dasf=False)
    await _publish(live, slug, [0, 1])
    async with live.connect(f"{slug}/late") as consumer:
        assert await no_message(consumer)
    assert await _counts(live, slug) == (0, 0)


async def test_redelivery_and_live_messages_arrive_once_each_in_order(live):
    """Messages published while a consumer's redelivery runs reach it exactly once, in order."""
    slug = await live.create_topic(anonymous=True, store=StorePolicy.CACHE, supports_dasf=False)
    await _publish(live, slug, range(300))

    async with live.connect(slug) as producer:

        async def publish_more() -> None:
            for i in range(300, 600):
                await producer.send(request_frame(i))
            for _ in range(300):
                assert (await recv_json(producer))["result"] == "ok"

        publisher = asyncio.create_task(publish_more())
        async with live.connect(f"{slug}/backend") as consumer:
            got = [(await recv_json(consumer))["context"] for _ in range(600)]
            await publisher
            assert await no_message(consumer)
    assert got == list(range(600))


@pytest.mark.broker_config(background_tasks=False)  # only this test pings: no minutely ping_all mid-test
async def test_availability_transitions_and_status_views(live, alice, bob):
    """One definition (reference bug 9): None → False → True, the 10 s grace, the 2 min window;
    the reference's texts and codes (bug 8); Token auth on the HTTP views (bug 10)."""
    clock = FakeClock()
    live.broker.clock = clock
    slug = await live.create_topic(
        grants=[(alice, {"can_view_status": True, "can_produce": True, "can_consume": True})]
    )

    async with live.http(headers=alice.headers, follow_redirects=False) as http:

        async def status() -> tuple[int, str, bool | None]:
            text = await http.get(f"/ws/{slug}/status/")
            data = (await http.get(f"/api/broker/topics/{slug}/status/")).json()
            assert data["status"] == text.text
            return text.status_code, text.text, data["availability"]

        assert await status() == (503, "Status unknown", None)  # never pinged
        async with live.connect(f"{slug}/backend", headers=alice.headers) as backend:
            assert (await recv_json(backend))["properties"]["messageType"] == "api_info"
            ping = await http.post(f"/ws/{slug}/ping/")
            assert ping.status_code == 302 and ping.headers["location"] == f"/ws/{slug}/status/"
            assert (await recv_json(backend))["properties"]["messageType"] == "ping"
            assert await status() == (503, "Consumer could not be reached", False)  # no pong yet
            await backend.send(json.dumps({"messageId": "00000000-0000-4000-8000-000000000000"}))
            expected = (200, "Consumer connected", True)
            assert await _eventually(status, expected) == expected  # any consumer frame is a pong
            # A pong up to 10 s before the last ping still counts (the reference's filters disagreed).
            clock.advance(9)
            await http.get(f"/ws/{slug}/ping/")
            await recv_json(backend)
            assert (await status())[2] is True
            clock.advance(2)  # the pong is now 11 s before... a new ping
            await http.get(f"/ws/{slug}/ping/")
            await recv_json(backend)
            assert (await status())[2] is False
            # A delivery counts as a ping; the consumer's ack as a pong.
            await _publish(live, slug, [1], headers=alice.headers)
            message = await recv_json(backend)
            await backend.send(json.dumps({"messageId": message["messageId"]}))
            assert await _eventually(status, expected) == expected
            clock.advance(1)

        # The backend's leave pings the topic (§3: whoever is left) at the broker's clock when the
        # server gets to it, which may be after this block has returned: wait for that ping (now 1 s
        # after the last one) before moving the clock, or it is stamped 121 s later and reads False.
        async def last_ping() -> dt.datetime | None:
            return _utc((await http.get(f"/api/broker/topics/{slug}/status/")).json()["last_ping"])

        leave_ping = clock.now()
        assert await _eventually(last_ping, leave_ping) == leave_ping
        assert await status() == expected  # the last pong is 1 s before that ping
        clock.advance(121)  # last ping older than 2 minutes
        assert await status() == (503, "Status unknown", None)

        async with live.app.state.sessionmaker() as session:
            topic = (await session.execute(select(BrokerTopic).where(BrokerTopic.slug == slug))).scalar_one()
            topic.supports_dasf = False
            await session.commit()
        assert (await http.get(f"/ws/{slug}/status/")).status_code == 400
        assert (await http.get(f"/ws/{slug}/status/")).text == "Topic is excluded from ping"
        assert (await http.get("/ws/no-such-topic/status/")).status_code == 404
    async with live.http() as anonymous, live.http(headers=bob.headers) as stranger:
        assert (await anonymous.get(f"/ws/{slug}/status/")).status_code == 401
        assert (await stranger.get(f"/ws/{slug}/status/")).status_code == 403
        assert (await stranger.get(f"/ws/{slug}/ping/")).status_code == 403


async def test_a_leaving_backend_makes_the_broker_ping_the_others(live):
    slug = await live.create_topic(anonymous=True)
    async with live.connect(f"{slug}/one") as one:
        await recv_json(one)  # api_info
        async with live.connect(f"{slug}/two") as two:
            await recv_json(two)
        assert (await recv_json(one))["properties"]["messageType"] == "ping"


async def test_consumer_leaving_a_response_topic_that_never_came(live, caplog):
    """Reference bug 7: it called ping() on None. Here nothing fails and nothing is created."""
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    with caplog.at_level(logging.WARNING, logger="flplatform.broker"):
        for _ in range(2):
            async with live.connect(f"{slug}_never/python-backend-2026-01-01T00:00:00.000001") as waiting:
                assert await no_message(waiting, 0.1)
        await asyncio.sleep(0.1)
        await live.broker.ping_all()
        await live.broker.sweep()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    async with live.app.state.sessionmaker() as session:
        assert (
            await session.execute(select(BrokerTopic.id).where(BrokerTopic.slug == f"{slug}_never"))
        ).first() is None


@pytest.mark.broker_config(background_tasks=False)  # only this test sweeps: no 30 s GC sweeper mid-test
async def test_response_topics_are_collected_after_their_last_consumer_left(live):
    clock = FakeClock()
    live.broker.clock = clock
    slug = await live.create_topic(anonymous=True, supports_dasf=False, store=StorePolicy.CACHE)
    response_topic, kept = f"{slug}_resp", f"{slug}_kept"

    async def gc_time(name: str):
        async with live.app.state.sessionmaker() as session:
            return (
                await session.execute(select(BrokerTopic.garbage_collect_on).where(BrokerTopic.slug == name))
            ).scalar_one()

    async with live.connect(f"{response_topic}/me") as inbox, live.connect(f"{kept}/me") as unread:
        async with live.connect(slug) as producer:
            for context, name in ((0, response_topic), (1, kept)):
                await producer.send(request_frame(context, name))
                assert (await recv_json(producer))["result"] == "ok"
        # Answers on both; only the first is acknowledged.
        for name in (response_topic, kept):
            async with live.connect(name) as answer:
                await answer.send(json.dumps({"payload": "", "context": "0"}))
                assert (await recv_json(answer))["result"] == "ok"
        await inbox.send(json.dumps({"messageId": (await recv_json(inbox))["messageId"]}))
        await recv_json(unread)

    async def gc_set(name: str) -> bool:
        return await gc_time(name) is not None

    assert await _eventually(lambda: gc_set(response_topic), True)  # set once the consumer left
    due = await gc_time(response_topic)
    assert (due - clock.now()).total_seconds() == 600
    assert await gc_time(kept) is None  # an unacknowledged answer keeps it
    async with live.connect(f"{response_topic}/me"):  # a consumer back clears the date
        assert await _eventually(lambda: gc_set(response_topic), False) is False
    assert await _eventually(lambda: gc_set(response_topic), True)
    clock.advance(599)
    assert await live.broker.sweep() == []
    clock.advance(2)
    assert await live.broker.sweep() == [response_topic]
    assert await gc_time(kept) is None
    # The source topic is untouched; deleting it cascades to its remaining response topic.
    async with live.app.state.sessionmaker() as session:
        from flplatform.broker import service

        await service.delete_topic(session, await service.get_topic(session, slug))
        await session.commit()
        assert (await session.execute(select(BrokerTopic.id).where(BrokerTopic.slug == kept))).first() is None


async def test_topic_cli_creates_grants_and_shows(live, bob, monkeypatch, capsys):
    from flplatform.cli import main
    from flplatform.settings import get_settings

    monkeypatch.setenv("FLP_DATABASE_URL", live.app.state.settings.database_url)
    get_settings.cache_clear()
    try:
        assert await asyncio.to_thread(main, ["topic", "cli-hello", "--new", "--anonymous"]) == 0
        assert (
            await asyncio.to_thread(
                main,
                [
                    "topic",
                    "cli-hello",
                    "-c",
                    "bob",
                    "-p",
                    "carol",
                    "--create-users",
                    "--store-messages",
                    "store",
                    "--dispatch",
                    "shared",
                    "-i",
                ],
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "created topic cli-hello" in out and "created user carol; token: " in out
        info = json.loads(out[out.index("{") :])
        assert info["public"] and info["anonymous_can_consume"] and info["store_messages"] == "store"
        assert (
            info["consumers"] == ["bob"] and info["producers"] == ["carol"] and info["dispatch"] == "shared"
        )
        assert await asyncio.to_thread(main, ["topic", "cli-hello", "--new"]) == 1
        assert "already exists" in capsys.readouterr().err
        assert await asyncio.to_thread(main, ["topic", "cli-hello", "-c", "bob", "-rm", "-i"]) == 0
        assert json.loads((out := capsys.readouterr().out)[out.index("{") :])["consumers"] == []
    finally:
        get_settings.cache_clear()
    await live.broker.invalidate("cli-hello")
    # The running broker serves the topic the CLI made (anonymous backends may consume).
    async with live.connect("cli-hello/backend") as consumer:
        assert (await recv_json(consumer, 10))["properties"]["messageType"] == "api_info"
        await _publish(live, "cli-hello", [5], headers=bob.headers)
        assert (await recv_json(consumer, 10))["context"] == 5
