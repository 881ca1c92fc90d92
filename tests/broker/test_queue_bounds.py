"""Consumer queues are bounded in bytes as well as messages, per socket and per process
(issue 14: a consumer that never reads pinned 1,000 × 1 MiB for 60 s)."""

from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import urlsplit

import pytest
import websockets

from flplatform.broker.connections import Delivery
from flplatform.broker.queues import DeliveryQueue, QueueBudget

KIB = 1024
MESSAGE_BYTES = 256 * KIB


def _delivery(size: int) -> Delivery:
    return Delivery(topic_id=None, message_id="m", text="x" * size)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the queue itself


async def test_queue_refuses_what_would_exceed_its_bytes_but_always_takes_one():
    queue = DeliveryQueue(max_items=100, max_bytes=10 * KIB)
    queue.put_nowait(_delivery(6 * KIB))
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(_delivery(6 * KIB))
    queue.put_nowait(_delivery(4 * KIB))  # exactly at the bound
    assert queue.bytes == 10 * KIB and queue.qsize() == 2
    queue.clear()
    queue.put_nowait(_delivery(50 * KIB))  # larger than the bound: an empty queue takes it
    assert queue.qsize() == 1


async def test_put_waits_for_room_in_bytes():
    queue = DeliveryQueue(max_items=100, max_bytes=10 * KIB)
    queue.put_nowait(_delivery(8 * KIB))
    waiting = asyncio.create_task(queue.put(_delivery(8 * KIB)))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await queue.get()
    await asyncio.wait_for(waiting, 1)
    assert queue.bytes == 8 * KIB


async def test_budget_counts_a_message_shared_by_many_queues_once():
    budget = QueueBudget(limit=1024 * KIB)
    queues = [DeliveryQueue(10, 64 * KIB, budget) for _ in range(5)]
    shared = _delivery(40 * KIB)
    for queue in queues:
        queue.put_nowait(shared)
    assert budget.total == 40 * KIB
    for queue in queues[:4]:
        await queue.get()
    assert budget.total == 40 * KIB
    queues[4].clear()
    assert await _eventually(lambda: budget.total == 0)


# --------------------------------------------------------------------------- through the broker


def _idle_consumer(live, path: str):
    """A consumer that never reads: the client stops reading its socket after one frame. Its socket's
    receive buffer is fixed small before it connects: left to TCP autotuning (up to
    ``net.ipv4.tcp_rmem``'s maximum, 32 MiB on some machines) the kernel could go on taking a stalled
    consumer's backlog off the server's queue at any moment, and which consumer holds the largest
    backlog, the one the process bound disconnects, would depend on the kernel's timing."""
    url = urlsplit(live.ws_url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
    sock.connect((url.hostname, url.port))
    return websockets.connect(
        f"{live.ws_url}/{path}", sock=sock, compression=None, max_size=None, max_queue=1, open_timeout=30
    )


async def _publish_until(producer, condition, *, limit: int = 400) -> int:
    body = json.dumps({"payload": "A" * MESSAGE_BYTES})
    for sent in range(1, limit + 1):
        await producer.send(body)
        assert json.loads(await asyncio.wait_for(producer.recv(), 30))["result"] == "ok"
        if condition():
            return sent
    raise AssertionError(f"condition not reached after {limit} messages")


async def _eventually(condition, timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def _close_code(ws) -> int | None:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def test_a_consumer_that_never_reads_holds_at_most_its_byte_bound(live):
    config = live.broker.config
    config.consumer_queue_bytes = 1024 * KIB
    config.consumer_stall_seconds = 1.0
    slug = await live.create_topic(anonymous=True, supports_dasf=False)
    async with _idle_consumer(live, f"{slug}/idle") as idle, live.connect(slug) as producer:
        [conn] = live.broker.registry.consumers(slug)
        peak = 0

        def stalled() -> bool:
            nonlocal peak
            peak = max(peak, conn.queue.bytes)
            return conn.closed

        await _publish_until(producer, stalled)
        assert 0 < peak <= config.consumer_queue_bytes
        assert await _close_code(idle) == 1013
    assert await _eventually(lambda: live.broker.queue_budget.total == 0)


async def test_process_total_disconnects_the_largest_backlog(live):
    config = live.broker.config
    config.consumer_queue_bytes = 64 * 1024 * KIB  # not the binding bound here
    config.consumer_queue_total_bytes = 2048 * KIB
    config.consumer_stall_seconds = 30.0
    hoarder_topic = await live.create_topic(anonymous=True, supports_dasf=False)
    other_topic = await live.create_topic(anonymous=True, supports_dasf=False)
    budget = live.broker.queue_budget
    async with (
        _idle_consumer(live, f"{hoarder_topic}/a") as hoarder,
        _idle_consumer(live, f"{other_topic}/b"),
    ):
        [hoarding] = live.broker.registry.consumers(hoarder_topic)
        [other] = live.broker.registry.consumers(other_topic)
        async with live.connect(hoarder_topic) as producer:
            await _publish_until(producer, lambda: hoarding.queue.bytes >= 1280 * KIB)
        peak = 0

        def evicted() -> bool:
            nonlocal peak
            peak = max(peak, budget.total)
            return hoarding.closed

        async with live.connect(other_topic) as producer:
            await _publish_until(producer, evicted)
        assert peak <= config.consumer_queue_total_bytes
        assert await _close_code(hoarder) == 1013
        assert not other.closed and live.broker.registry.consumers(other_topic) == [other]
        assert budget.total == other.queue.bytes
    assert await _eventually(lambda: budget.total == 0)
