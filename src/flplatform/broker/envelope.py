"""DASF envelopes (dasf-protocol.md §2): validation, enrichment, acks and broker-made messages.

The broker never inspects ``payload``; it only checks the fields it must store or route by.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

SLUG_RE = re.compile(r"^[-_\w]+$")
STATUS_PING = "status-ping"


class EnvelopeError(ValueError):
    """Bad input from a client: answered with an error ack, the socket stays open."""


def iso_now(now: dt.datetime) -> str:
    return now.isoformat()


def error_ack(
    reason: str, message_id: Any = None, context: Any = ..., present: bool = False
) -> dict[str, Any]:
    """An ack whose ``result`` contains "error" (demessaging only reacts to that) plus ``errorMsg``."""
    ack: dict[str, Any] = {"messageId": message_id if isinstance(message_id, str) else None}
    if present:
        ack["context"] = context
    text = reason if reason.startswith("error") else f"error: {reason}"
    ack["result"] = text
    ack["errorMsg"] = reason
    return ack


def ok_ack(message_id: str, context: Any = None, present: bool = False) -> dict[str, Any]:
    ack: dict[str, Any] = {"messageId": message_id}
    if present:
        ack["context"] = context
    ack["result"] = "ok"
    return ack


@dataclass(slots=True)
class Produced:
    """A validated producer frame, enriched and serialised once for every consumer."""

    content: dict[str, Any]
    message_id: str
    message_uuid: uuid.UUID
    request_context: int | None
    response_topic: str | None
    has_context: bool
    context: Any
    text: str = ""


def parse_json_object(raw: str | bytes, max_bytes: int) -> dict[str, Any]:
    if isinstance(raw, str):  # a character is 1-4 bytes: encode only when it could matter
        too_big = len(raw) > max_bytes or (len(raw) * 4 > max_bytes and len(raw.encode()) > max_bytes)
    else:
        too_big = len(raw) > max_bytes
    if too_big:
        raise EnvelopeError(f"message larger than {max_bytes} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError("message is not valid JSON") from None
    if not isinstance(value, dict):
        raise EnvelopeError("message must be a JSON object")
    return value


def _request_context(properties: dict[str, Any]) -> int | None:
    value = properties.get("requestContext")
    if value is None:
        return None
    if isinstance(value, bool):
        raise EnvelopeError("properties.requestContext must be an integer or a numeric string")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        number = int(value)
    else:
        raise EnvelopeError("properties.requestContext must be an integer or a numeric string")
    if not -(2**63) <= number < 2**63:
        raise EnvelopeError("properties.requestContext is out of range")
    return number


def validate_produced(content: dict[str, Any], now: dt.datetime) -> Produced:
    """Check what the broker stores or routes by; add ``messageId`` and set ``publishTime``."""
    has_context = "context" in content
    context = content.get("context")
    properties = content.get("properties")
    if properties is None:
        properties = {}
    elif not isinstance(properties, dict):
        raise EnvelopeError("properties must be a JSON object")
    request_context = _request_context(properties)
    response_topic = properties.get("response_topic")
    if response_topic is not None:
        if (
            not isinstance(response_topic, str)
            or not SLUG_RE.match(response_topic)
            or len(response_topic) > 255
        ):
            raise EnvelopeError("properties.response_topic must be a slug ([-_\\w]+)")
        if response_topic == STATUS_PING:
            response_topic = None  # replies to status-ping are not a response topic
    if "messageId" in content:
        message_id = content["messageId"]
        if not isinstance(message_id, str):
            raise EnvelopeError("messageId must be a UUID string")
        try:
            message_uuid = uuid.UUID(message_id)
        except ValueError:
            raise EnvelopeError("messageId must be a UUID string") from None
    else:
        message_uuid = uuid.uuid4()
        message_id = str(message_uuid)
        content["messageId"] = message_id
    content["publishTime"] = iso_now(now)
    return Produced(
        content=content,
        message_id=message_id,
        message_uuid=message_uuid,
        request_context=request_context,
        response_topic=response_topic,
        has_context=has_context,
        context=context,
    )


def broker_request(message_type: str, now: dt.datetime) -> str:
    """A broker-made ``ping`` or ``api_info`` envelope, exactly as the reference sends them."""
    return json.dumps(
        {
            "properties": {"requestContext": 1, "messageType": message_type, "response_topic": STATUS_PING},
            "publishTime": iso_now(now),
            "messageId": str(uuid.uuid4()),
            "payload": "",
        }
    )
