"""Local fan-out: a message for a topic goes into the queue of each consumer socket of this
process (``broadcast``) or of the next one in turn (``shared``).

Queues are bounded in messages and bytes, and fan-out waits for room rather than dropping (see
``connections``); all queues of the process together hold at most ``consumer_queue_total_bytes``:
the socket with the largest backlog is disconnected to make room (``make_room``).
"""

from __future__ import annotations

import logging

from flplatform.broker.config import BrokerConfig
from flplatform.broker.connections import ConsumerConnection, ConsumerStalled, Delivery, Registry
from flplatform.broker.permissions import TopicInfo
from flplatform.broker.queues import QueueBudget
from flplatform.kit.tasks import spawn
from flplatform.orm.broker import DispatchMode

log = logging.getLogger(__name__)


class FanOut:
    def __init__(
        self, registry: Registry, queue_budget: QueueBudget, config: BrokerConfig, stats: dict[str, int]
    ):
        self.registry = registry
        self.queue_budget = queue_budget
        self.config = config
        self.stats = stats

    async def dispatch(self, topic: TopicInfo, item: Delivery) -> None:
        conns = self.registry.consumers(topic.slug)
        if not conns:
            return
        if topic.dispatch is DispatchMode.SHARED:
            target = self.registry.next_shared(topic.slug)
            conns = [target] if target is not None else []
        if conns:
            await self.make_room(item)
        for conn in conns:
            try:
                await conn.enqueue(item, self.config.consumer_stall_seconds)
            except ConsumerStalled:
                await self.drop_stalled(conn)

    async def make_room(self, item: Delivery) -> None:
        """Keep every consumer queue of the process within ``consumer_queue_total_bytes``: while
        the new message would not fit, the socket holding the most bytes (the one pinning the
        memory) is disconnected as a stalled consumer would be."""
        budget = self.queue_budget
        budget.limit = self.config.consumer_queue_total_bytes
        while budget.would_exceed(item):
            holders = [
                c for slug in self.registry.slugs() for c in self.registry.consumers(slug) if not c.closed
            ]
            largest = max(holders, key=lambda c: c.queue.bytes, default=None)
            if largest is None or largest.queue.bytes == 0:
                return  # nothing queued to give back: the message itself is the only holder
            self.stats["evicted_for_memory"] += 1
            log.warning(
                "consumer queues of this process hold %d bytes; disconnecting %s on %s (%d bytes queued)",
                budget.total,
                largest.id,
                largest.slug,
                largest.queue.bytes,
            )
            await self.drop_stalled(largest)

    async def drop_stalled(self, conn: ConsumerConnection) -> None:
        log.warning("consumer %s on %s stalled; disconnecting it", conn.id, conn.slug)
        conn.release()
        self.registry.remove(conn)
        self.stats["stalled"] += 1
        # In the background: a peer that reads nothing can hold the close handshake for seconds,
        # and this runs on the dispatch path.
        spawn(_close_stalled(conn), name="broker-close-stalled")


async def _close_stalled(conn: ConsumerConnection) -> None:
    try:
        await conn.websocket.close(code=1013, reason="consumer too slow")
    except Exception:
        log.debug("closing a stalled consumer failed", exc_info=True)


__all__ = ["FanOut"]
