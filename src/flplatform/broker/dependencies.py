"""FastAPI dependencies of the broker's HTTP API: the process's ``Broker``, and the topic a
route's ``{slug}`` names, loaded and authorised (in the manner of Polar's ``auth.py``
annotations). A route that takes ``ManagedTopic`` runs only for the topic's managers; the others
got their 401, 403 or 404 before the route body.

* ``VisibleTopic``: anyone with a permission on the topic, or whom ``TOPIC_POLICY`` lets read
  it; read fresh (the broker's pending last_ping/last_pong written first).
* ``PingableTopic``: producers and managers.
* ``ManagedTopic``: owner, organisation admin, superuser (anonymous callers: 401 first).
* ``handshake_identity``: who opens a websocket (token in ``Authorization``, else anonymous).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, WebSocket
from fastapi.requests import HTTPConnection

from flplatform.auth.authentication import authenticate, client_address
from flplatform.auth.dependencies import AuthenticatedRequester, RequesterDep
from flplatform.auth.login_guard import guard_of
from flplatform.broker import service
from flplatform.broker.core import Broker
from flplatform.broker.permissions import Identity, identity_of
from flplatform.db import SessionDep
from flplatform.errors import AppError
from flplatform.orm.broker import BrokerTopic


def get_broker(connection: HTTPConnection) -> Broker:
    """The process's broker (``broker_component`` put it on the app), for requests and sockets."""
    broker: Broker = connection.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(get_broker)]


async def visible_topic(
    slug: str, session: SessionDep, broker: BrokerDep, requester: RequesterDep
) -> BrokerTopic:
    topic = await service.fresh_topic(session, broker, slug)
    await service.require_visible(broker, requester, topic)
    return topic


async def pingable_topic(
    slug: str, session: SessionDep, broker: BrokerDep, requester: RequesterDep
) -> BrokerTopic:
    topic = await service.get_topic(session, slug)
    await service.require_pingable(broker, requester, topic)
    return topic


async def managed_topic(slug: str, session: SessionDep, requester: AuthenticatedRequester) -> BrokerTopic:
    topic = await service.get_topic(session, slug)
    await service.require_manager(requester, topic)
    return topic


VisibleTopic = Annotated[BrokerTopic, Depends(visible_topic)]
PingableTopic = Annotated[BrokerTopic, Depends(pingable_topic)]
ManagedTopic = Annotated[BrokerTopic, Depends(managed_topic)]

__all__ = ["BrokerDep", "ManagedTopic", "PingableTopic", "VisibleTopic", "get_broker"]


async def handshake_identity(websocket: WebSocket) -> Identity:
    """The socket's identity; an unknown or expired key is the anonymous identity (reference)."""
    header = websocket.headers.get("authorization")
    if not header:
        return Identity()
    async with websocket.app.state.sessionmaker() as session:
        try:
            user = await authenticate(
                session, header, guard=guard_of(websocket.app), address=client_address(websocket)
            )
        except AppError:
            return Identity()
        identity = identity_of(user)
        await session.commit()
    return identity
