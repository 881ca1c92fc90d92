"""A consumer socket's delivery queue, bounded in messages *and* bytes, and the process-wide
byte budget all those queues share.

A consumer that never reads must not pin ``consumer_queue_size`` × ``max_message_bytes`` of
memory: each queue also holds at most ``consumer_queue_bytes`` of envelope text (an empty queue
still takes one message of any allowed size, or a large message could never be delivered).
Across the process, ``consumer_queue_total_bytes`` bounds what all queues hold together; a
message fanned out to many sockets is one string in memory, so it is counted once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


def item_bytes(item: Any) -> int:
    """What an item pins: the envelope text of a delivery (pings are a few bytes: counted 0)."""
    text = getattr(item, "text", None)
    return len(text) if isinstance(text, str) else 0


class QueueBudget:
    """Bytes held by every consumer queue of this process, each distinct item counted once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._refs: dict[int, int] = {}

    def would_exceed(self, item: Any) -> bool:
        return id(item) not in self._refs and self.total + item_bytes(item) > self.limit

    def hold(self, item: Any) -> None:
        key = id(item)  # the queue keeps the item alive, so its id stays unique while counted
        count = self._refs.get(key, 0)
        if count == 0:
            self.total += item_bytes(item)
        self._refs[key] = count + 1

    def release(self, item: Any) -> None:
        key = id(item)
        count = self._refs.get(key, 0)
        if count <= 1:
            if count == 1:
                self.total -= item_bytes(item)
            self._refs.pop(key, None)
        else:
            self._refs[key] = count - 1


class DeliveryQueue:
    """FIFO for one consumer socket: ``put`` waits for room, ``put_nowait`` raises
    ``asyncio.QueueFull``; room means fewer than ``max_items`` items and ``max_bytes`` not exceeded
    by the new item (or an empty queue)."""

    def __init__(self, max_items: int, max_bytes: int, budget: QueueBudget | None = None) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.budget = budget
        self.bytes = 0
        self._items: deque[Any] = deque()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()

    def qsize(self) -> int:
        return len(self._items)

    def fits(self, item: Any) -> bool:
        if not self._items:
            return True
        return len(self._items) < self.max_items and self.bytes + item_bytes(item) <= self.max_bytes

    def put_nowait(self, item: Any) -> None:
        if not self.fits(item):
            raise asyncio.QueueFull
        self.force_put(item)

    def force_put(self, item: Any) -> None:
        """Past the bounds: only while the socket is set up (see ``ConsumerConnection.enqueue``)."""
        self._items.append(item)
        self.bytes += item_bytes(item)
        if self.budget is not None:
            self.budget.hold(item)
        self._readable.set()

    async def put(self, item: Any) -> None:
        while not self.fits(item):
            self._room.clear()
            await self._room.wait()
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        self.bytes -= item_bytes(item)
        if self.budget is not None:
            self.budget.release(item)
        if not self._items:
            self._readable.clear()
        self._room.set()
        return item

    async def get(self) -> Any:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        return self.get_nowait()

    def clear(self) -> None:
        """Drop everything (the socket is gone): the budget gets its bytes back."""
        while self._items:
            self.get_nowait()
