"""Broker settings (env prefix ``FLP_BROKER_``), kept apart from the service settings so the
broker's knobs stay in its own domain. Tests replace ``app.state.broker_config`` before start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flplatform.orm.broker import StorePolicy


class BrokerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLP_BROKER_", env_file=".env", extra="ignore")

    store_messages: StorePolicy = Field(default=StorePolicy.CACHE, description="Default store policy")
    store_source_messages: StorePolicy | None = Field(default=None, description="Default for source topics")
    store_response_messages: StorePolicy | None = Field(
        default=None, description="Default for response topics"
    )
    create_topic_on_message: bool = Field(
        default=True, description="Publishing to an unknown slug creates the topic (authenticated users only)"
    )
    max_message_bytes: int = Field(
        default=10 * 1024**2, ge=1024, description="Larger frames get an error ack"
    )
    consumer_queue_size: int = Field(
        default=1000, ge=1, description="Live messages buffered per consumer socket"
    )
    consumer_queue_bytes: int = Field(
        default=16 * 1024**2,
        ge=1024,
        description="Envelope bytes buffered per consumer socket (an empty queue still takes one message)",
    )
    consumer_queue_total_bytes: int = Field(
        default=512 * 1024**2,
        ge=1024,
        description="Bytes buffered by all consumer sockets of a process together; beyond it the socket with "
        "the largest backlog is disconnected (1013)",
    )
    consumer_stall_seconds: float = Field(
        default=60.0, gt=0, description="A consumer whose queue stays full this long is disconnected"
    )
    producer_max_inflight: int = Field(
        default=1000, ge=1, description="Unacknowledged frames per producer socket"
    )
    write_batch_size: int = Field(default=500, ge=1)
    permission_cache_seconds: float = Field(default=5.0, ge=0, description="Grant/topic cache lifetime")
    ping_interval_seconds: float = Field(default=60.0, gt=0, description="Broker pings every DASF topic")
    gc_interval_seconds: float = Field(default=30.0, gt=0, description="Response-topic sweeper period")
    gc_delay_seconds: float = Field(
        default=600.0, ge=0, description="Response topic kept after last consumer left"
    )
    touch_flush_seconds: float = Field(
        default=0.25, gt=0, description="last_ping/last_pong write-behind period"
    )
    notify_inline_bytes: int = Field(
        default=7900, ge=100, le=7990, description="Larger bodies go through the table"
    )
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = Field(
        default="NORMAL", description="SQLite PRAGMA synchronous of the broker's writer (the app keeps FULL)"
    )
    background_tasks: bool = Field(default=True, description="Run the ping timer and the GC sweeper")
