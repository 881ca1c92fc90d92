"""Reading a training's live events (``GET /api/trainings/{id}/events/``, Server-Sent Events):
a small parser of the ``text/event-stream`` format (the WHATWG rules: ``event:``, ``data:``
lines joined by newlines, ``id:``, ``retry:``, comments, a blank line ends an event) and the
parsed event. :meth:`flplatform.client.FLPlatformAPI.watch` streams them, reconnecting with
``Last-Event-ID``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

FINAL_STATES = frozenset({"C", "E"})


@dataclass(frozen=True)
class SSEMessage:
    """One event of a ``text/event-stream`` as the format defines it."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


@dataclass(frozen=True)
class TrainingEvent:
    """One training event: ``kind`` (``round_started``, ``update_received``, ...), its number
    ``seq`` in the training (None for ``gap``) and its fields in ``data``."""

    kind: str
    seq: int | None
    training_id: str
    at: str | None
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: SSEMessage) -> TrainingEvent:
        body = json.loads(message.data) if message.data else {}
        seq = body.get("seq")
        return cls(
            kind=str(body.get("kind") or message.event),
            seq=int(seq) if seq is not None else None,
            training_id=str(body.get("training_id", "")),
            at=body.get("at"),
            data=dict(body.get("data") or {}),
        )

    @property
    def finished(self) -> bool:
        """Whether the training ended with this event (state C or E)."""
        return self.kind == "state_changed" and self.data.get("state") in FINAL_STATES


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SSEMessage]:
    """The messages of a stream of lines (without their line ends)."""
    event, last_id, retry = "", None, None
    data: list[str] = []
    has_id = False
    async for line in lines:
        if line == "":
            if data or has_id or retry is not None:
                yield SSEMessage(event=event or "message", data="\n".join(data), id=last_id, retry=retry)
            event, data, has_id, retry = "", [], False, None
            continue
        if line.startswith(":"):
            continue  # a comment (the server's keep-alive pings)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\x00" not in value:
            last_id, has_id = value, True
        elif name == "retry" and value.isdigit():
            retry = int(value)
