"""The broker's tables as SQLAlchemy Core ``Table`` objects, for the bulk statements of the hot
path (the writer, redelivery, GC). The ORM declares ``__table__`` as a generic ``FromClause``;
these are the same objects, typed as the ``Table`` they are."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table

from flplatform.orm.broker import BrokerDelivery, BrokerMessage, BrokerTopic

MESSAGES = cast(Table, BrokerMessage.__table__)
DELIVERIES = cast(Table, BrokerDelivery.__table__)
TOPICS = cast(Table, BrokerTopic.__table__)

__all__ = ["DELIVERIES", "MESSAGES", "TOPICS"]
