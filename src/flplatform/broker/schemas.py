"""Schemas of the broker's JSON topic API."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from pydantic import Field

from flplatform.kit.schemas import RequestSchema, Schema
from flplatform.orm.broker import DispatchMode, StorePolicy

Slug = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[-_\w]+$", examples=["hello"])]


class TopicCreate(RequestSchema):
    slug: Slug
    is_public: bool = Field(
        default=False, description="Anyone may publish (and view the status); not consume."
    )
    anonymous_can_consume: bool = Field(default=False, description="Anyone, anonymous included, may consume.")
    supports_dasf: bool = Field(default=True, description="The broker pings the topic and asks for api_info.")
    store_messages: StorePolicy | None = Field(
        default=None, description="disabled | cache | cacheall | store; null: the server default."
    )
    dispatch: DispatchMode = Field(
        default=DispatchMode.BROADCAST,
        description="broadcast: every consumer socket gets every message; shared: one socket per message.",
    )

    model_config = {
        **RequestSchema.model_config,
        "json_schema_extra": {
            "examples": [{"slug": "hello", "is_public": True, "anonymous_can_consume": True}]
        },
    }


class TopicUpdate(RequestSchema):
    is_public: bool | None = None
    anonymous_can_consume: bool | None = None
    supports_dasf: bool | None = None
    store_messages: StorePolicy | None = Field(
        default=None, description="Send null to use the server default."
    )
    dispatch: DispatchMode | None = None

    model_config = {
        **RequestSchema.model_config,
        "json_schema_extra": {"examples": [{"store_messages": "store"}]},
    }


class TopicRead(Schema):
    id: uuid.UUID
    slug: str
    is_response_topic: bool
    is_response_for: str | None = Field(default=None, description="Source topic slug of a response topic")
    is_public: bool
    anonymous_can_consume: bool
    supports_dasf: bool
    store_messages: StorePolicy | None
    effective_store_messages: StorePolicy
    dispatch: DispatchMode
    owner_id: uuid.UUID | None
    created_at: dt.datetime
    last_ping: dt.datetime | None
    last_pong: dt.datetime | None
    availability: bool | None = Field(description="true online, false unreachable, null unknown")
    garbage_collect_on: dt.datetime | None
    pending_count: int = Field(description="Stored messages nobody acknowledged yet")
    stored_count: int = Field(description="Stored messages")
    connected_consumers: int = Field(description="Consumer sockets on this topic in the answering process")
    websocket_url: str = Field(description="Producer URL; consumers append /<subscription>")


class TopicDetail(TopicRead):
    api_info: dict[str, Any]


class GrantWrite(RequestSchema):
    can_produce: bool = False
    can_consume: bool = False
    can_view_status: bool = False

    model_config = {
        **RequestSchema.model_config,
        "json_schema_extra": {
            "examples": [{"can_produce": False, "can_consume": True, "can_view_status": True}]
        },
    }


class GrantRead(Schema):
    user_id: uuid.UUID
    username: str
    can_produce: bool
    can_consume: bool
    can_view_status: bool


class MessageRead(Schema):
    id: int
    message_id: uuid.UUID
    context: int | None
    user_id: uuid.UUID | None
    created_at: dt.datetime
    delivered_to: list[str] = Field(
        description="Consumer identities (user ids or 'anonymous') that acknowledged"
    )
    content: dict[str, Any] = Field(description="The envelope as forwarded")


class StatusRead(Schema):
    slug: str
    availability: bool | None
    status: str = Field(examples=["Consumer connected"])
    last_ping: dt.datetime | None
    last_pong: dt.datetime | None
