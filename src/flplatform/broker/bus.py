"""Cross-process fan-out. SQLite: one process, nothing to carry (``InProcessBus``).
PostgreSQL: LISTEN/NOTIFY on channel ``flp_broker`` (``PostgresBus``); both are the generic bus
of :mod:`flplatform.kit.bus` on the broker's channel.

Events are small JSON objects ``{"o": origin, "k": kind, ...}``:

* ``m``: a message for topic ``s`` (slug) / ``t`` (topic id): ``c`` the envelope text when it
  fits in a NOTIFY payload, else ``p``, the row to read it from;
* ``g``: ping the consumers of slug ``s``;
* ``i``: topic or grant data changed (slug ``s`` or every slug): drop caches.

Message events are sent inside the writer's transaction (``pg_notify``), in publish order, so
they are delivered exactly when the row is committed and in commit order; each process handles
them one at a time and skips its own events (it dispatched locally).

**Inline envelopes, not only ids** (issue 10 sketched "payload = message id, message read from
the table"). An envelope whose text, once JSON-escaped into the event, fits in
``FLP_BROKER_NOTIFY_INLINE_BYTES`` (7,900; PostgreSQL refuses payloads of 8,000 bytes or more)
travels inline: every listening process saves one query per message, and ``disabled`` topics
write nothing for such messages. Larger envelopes carry the key of a ``broker_messages`` row:
the stored row for ``cacheall``/``store``, a transient copy for ``cache`` (its first ack deletes
the stored row, possibly before another process read it) and for ``disabled``; the sweeper
removes transient rows after a minute.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from flplatform.kit import bus as kit_bus

CHANNEL = "flp_broker"


def fits_notify(text: str, slug: str, inline_bytes: int) -> bool:
    """Whether an envelope travels inline in a NOTIFY payload. The envelope text is ASCII
    (``json.dumps``), but it is embedded in the event as a JSON string, where every quote
    and backslash doubles: measure the escaped form, plus the event's other keys."""
    budget = inline_bytes - 100 - len(slug)
    return len(text) <= budget and len(json.dumps(text)) <= budget


def message_event(
    slug: str, topic_id: uuid.UUID, text: str | None, pk: int | None, inline_bytes: int
) -> dict[str, Any]:
    """An ``m`` event: the envelope inline when it fits, else the key of the row holding it."""
    event: dict[str, Any] = {"k": "m", "s": slug, "t": str(topic_id)}
    if text is not None and fits_notify(text, slug, inline_bytes):
        event["c"] = text
    else:
        event["p"] = pk
    return event


class InProcessBus(kit_bus.InProcessBus):
    """Single process: local dispatch already reached everyone; nothing to forward."""

    def __init__(self) -> None:
        super().__init__(CHANNEL)


class PostgresBus(kit_bus.PostgresBus):
    """LISTEN/NOTIFY on ``flp_broker`` (the generic bus of :mod:`flplatform.kit.bus`)."""

    def __init__(self, database_url: str):
        super().__init__(database_url, CHANNEL)
