"""DASF message broker (dasf-protocol.md): websocket producers and consumers, store policies,
response topics, availability, and cross-process fan-out over PostgreSQL LISTEN/NOTIFY.

``broker_component`` is the app's lifespan component: it builds the ``Broker`` (on
``app.state.broker``) with the ping timer, the GC sweeper, the writer and the bus.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from flplatform.broker.availability import Clock, FakeClock, availability
from flplatform.broker.config import BrokerConfig
from flplatform.broker.core import Broker
from flplatform.broker.permissions import ANONYMOUS, GRANT_RESOLVERS, Identity, Perms, TopicInfo, identity_of


@contextlib.asynccontextmanager
async def broker_component(app: Any) -> AsyncIterator[Broker]:
    config = getattr(app.state, "broker_config", None) or BrokerConfig()
    broker = Broker(
        app.state.sessionmaker,
        config,
        app.state.settings.database_url,
        clock=getattr(app.state, "broker_clock", None),
    )
    await broker.start()
    app.state.broker = broker
    try:
        yield broker
    finally:
        await broker.stop()


__all__ = [
    "ANONYMOUS",
    "GRANT_RESOLVERS",
    "Broker",
    "BrokerConfig",
    "Clock",
    "FakeClock",
    "Identity",
    "Perms",
    "TopicInfo",
    "availability",
    "broker_component",
    "identity_of",
]
