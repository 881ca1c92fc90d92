"""DASF broker routes: websockets under ``/ws/``, the reference's HTTP status/ping views, and a
JSON topic API under ``/api/broker/topics/``.

Websocket routes, tried in this order (optional trailing slash, query string ignored):

* ``/ws/status-ping``: backends post pongs and api_info replies;
* ``/ws/v2/producer/{persistence}/{tenant}/{namespace}/{slug}`` and
  ``/ws/v2/consumer/{persistence}/{tenant}/{namespace}/{slug}/{subscription}``: Pulsar-style
  aliases, so demessaging's default Pulsar configuration connects too;
* ``/ws/{slug}`` (producer), ``/ws/{slug}/{subscription}`` (consumer; the subscription is a label);
* anything else under ``/ws/`` is refused at the handshake with HTTP 404.

Handshakes authenticate with ``Authorization: Token|Bearer <key>`` and are always accepted;
permissions are decided per message, as the reference does (clients rely on it).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, WebSocket, status
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.convertors import Convertor, register_url_convertor

from flplatform.auth.authentication import authenticate, client_address
from flplatform.auth.dependencies import CurrentUser, OptionalUser
from flplatform.auth.login_guard import guard_of
from flplatform.broker import service
from flplatform.broker.availability import STATUS_TEXT, availability
from flplatform.broker.core import Broker, identity_of, policy_for, topic_info
from flplatform.broker.permissions import Identity, Perms
from flplatform.broker.schemas import (
    GrantRead,
    GrantWrite,
    MessageRead,
    StatusRead,
    TopicCreate,
    TopicDetail,
    TopicRead,
    TopicUpdate,
)
from flplatform.db import SessionDep, after_commit
from flplatform.errors import AppError, Forbidden, NotFound, Unauthorized, responses
from flplatform.kit.schemas import Detail, Limit, Offset
from flplatform.orm.broker import BrokerTopic, ResponseTopic
from flplatform.permissions import Requester, can_read


class _SlugConvertor(Convertor[str]):
    regex = r"[-_\w]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _SubscriptionConvertor(_SlugConvertor):
    regex = r"[-.:\w]+"


register_url_convertor("dasfslug", _SlugConvertor())
register_url_convertor("dasfsub", _SubscriptionConvertor())

router = APIRouter(tags=["broker"])


def _broker(app: Any) -> Broker:
    return app.state.broker  # type: ignore[no-any-return]


async def _handshake_identity(websocket: WebSocket) -> Identity:
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


# --------------------------------------------------------------------------- websockets


async def _status_ping(websocket: WebSocket) -> None:
    user = await _handshake_identity(websocket)
    await websocket.accept()
    await _broker(websocket.app).status_ping_session(websocket, user)


async def _producer(websocket: WebSocket, slug: str) -> None:
    user = await _handshake_identity(websocket)
    await websocket.accept()
    await _broker(websocket.app).producer_session(websocket, slug, user)


async def _consumer(websocket: WebSocket, slug: str, subscription: str) -> None:
    user = await _handshake_identity(websocket)
    history = websocket.query_params.get("history") == "all"
    await websocket.accept()
    await _broker(websocket.app).consumer_session(websocket, slug, user, history=history)


async def _alias_producer(
    websocket: WebSocket, persistence: str, tenant: str, namespace: str, slug: str
) -> None:
    await _producer(websocket, slug)


async def _alias_consumer(
    websocket: WebSocket, persistence: str, tenant: str, namespace: str, slug: str, subscription: str
) -> None:
    await _consumer(websocket, slug, subscription)


async def _unrouted(websocket: WebSocket, rest: str) -> None:
    """Unknown /ws/ paths: HTTP 404 at the handshake (the reference answered 500)."""
    body = {"detail": f"No websocket route for /ws/{rest}.", "code": "not_found"}
    try:
        await websocket.send_denial_response(JSONResponse(body, status_code=404))
    except RuntimeError:  # server without the denial-response extension: plain refusal
        await websocket.close(code=1008)


_ALIAS = "{persistence:dasfslug}/{tenant:dasfslug}/{namespace:dasfslug}"
_WEBSOCKETS: list[tuple[str, Any, str]] = [
    ("/ws/status-ping", _status_ping, "dasf-status-ping"),
    (f"/ws/v2/producer/{_ALIAS}/{{slug:dasfslug}}", _alias_producer, "dasf-pulsar-producer"),
    (
        f"/ws/v2/consumer/{_ALIAS}/{{slug:dasfslug}}/{{subscription:dasfsub}}",
        _alias_consumer,
        "dasf-pulsar-consumer",
    ),
    ("/ws/{slug:dasfslug}", _producer, "dasf-producer"),
    ("/ws/{slug:dasfslug}/{subscription:dasfsub}", _consumer, "dasf-consumer"),
]
for _path, _endpoint, _name in _WEBSOCKETS:
    router.add_api_websocket_route(_path, _endpoint, name=_name)
    router.add_api_websocket_route(_path + "/", _endpoint, name=_name + "-slash")
# The catch-all is added by ``include`` (after every other router) so it cannot shadow them.
unrouted_router = APIRouter()
unrouted_router.add_api_websocket_route("/ws/{rest:path}", _unrouted, name="dasf-unrouted")


# --------------------------------------------------------------------------- helpers


def _websocket_url(request: Request, slug: str) -> str:
    scheme = "wss" if request.url.scheme == "https" else "ws"
    return f"{scheme}://{request.url.netloc}{request.scope.get('root_path', '')}/ws/{slug}"


async def _perms(request: Request, user: Any, topic: BrokerTopic) -> Perms:
    broker = _broker(request.app)
    return await broker.perms_for(identity_of(user), topic_info(topic, broker.config))


async def _pingable(request: Request, requester: Requester, topic: BrokerTopic) -> None:
    """Producers and managers ping; another organisation's topic is 404."""
    if service.out_of_scope(requester, topic):
        raise Unauthorized() if requester.is_anonymous else NotFound(f"Topic {topic.slug} not found.")
    perms = await _perms(request, requester.user, topic)
    if not (perms.produce or await service.can_manage(requester, topic)):
        if requester.is_anonymous:
            raise Unauthorized()
        if topic.organization_id is not None and not (
            perms.consume or perms.view_status or await can_read(requester, topic)
        ):
            raise NotFound(f"Topic {topic.slug} not found.")
        raise Forbidden("You may not ping this topic.")


async def _visible(request: Request, requester: Requester, topic: BrokerTopic) -> Perms:
    """A topic of another organisation is 404 (401 for anonymous callers); inside the caller's
    scope the reference's rules (any permission on the topic) or ``TOPIC_POLICY`` let them see it."""
    if service.out_of_scope(requester, topic):
        raise Unauthorized() if requester.is_anonymous else NotFound(f"Topic {topic.slug} not found.")
    perms = await _perms(request, requester.user, topic)
    if not (
        perms.produce
        or perms.consume
        or perms.view_status
        or await can_read(requester, topic)
        or await service.can_manage(requester, topic)
    ):
        if requester.is_anonymous:
            raise Unauthorized()
        if topic.organization_id is not None:  # objects one may not see are 404 in organisations
            raise NotFound(f"Topic {topic.slug} not found.")
        raise Forbidden("You may not view this topic.")
    return perms


async def _read(
    request: Request, session: SessionDep, topics: list[BrokerTopic], detail: bool = False
) -> list[Any]:
    broker = _broker(request.app)
    counts = await service.message_counts(session, [t.id for t in topics])
    sources: dict[uuid.UUID, str] = {}
    source_ids = [t.is_response_for_id for t in topics if isinstance(t, ResponseTopic)]
    if source_ids:
        from sqlalchemy import select

        rows = await session.execute(
            select(BrokerTopic.id, BrokerTopic.slug).where(BrokerTopic.id.in_(source_ids))
        )
        sources = {r.id: r.slug for r in rows}
    now = broker.clock.now()
    out: list[Any] = []
    for topic in topics:
        is_response = isinstance(topic, ResponseTopic)
        pending, stored = counts.get(topic.id, (0, 0))
        data: dict[str, Any] = {
            "id": topic.id,
            "slug": topic.slug,
            "is_response_topic": is_response,
            "is_response_for": sources.get(topic.is_response_for_id) if is_response else None,
            "is_public": topic.is_public,
            "anonymous_can_consume": topic.anonymous_can_consume,
            "supports_dasf": topic.supports_dasf,
            "store_messages": topic.store_messages,
            "effective_store_messages": policy_for(topic.store_messages, is_response, broker.config),
            "dispatch": topic.dispatch,
            "owner_id": topic.owner_id,
            "created_at": topic.created_at,
            "last_ping": topic.last_ping,
            "last_pong": topic.last_pong,
            "availability": availability(topic.supports_dasf, topic.last_ping, topic.last_pong, now),
            "garbage_collect_on": topic.garbage_collect_on,
            "pending_count": pending,
            "stored_count": stored,
            "connected_consumers": broker.registry.count(topic.slug),
            "websocket_url": _websocket_url(request, topic.slug),
        }
        if detail:
            out.append(TopicDetail(**data, api_info=topic.api_info or {}))
        else:
            out.append(TopicRead(**data))
    return out


def _invalidate_after_commit(request: Request, session: SessionDep, slugs: list[str] | None) -> None:
    broker = _broker(request.app)

    async def _job() -> None:
        if slugs is None:
            await broker.invalidate(None)
        for slug in slugs or []:
            await broker.invalidate(slug)

    after_commit(session, _job)


async def _fresh_topic(request: Request, session: SessionDep, slug: str) -> BrokerTopic:
    """The topic with last_ping/last_pong as this process knows them (pending touches written)."""
    await _broker(request.app).flush()
    return await service.get_topic(session, slug)


# --------------------------------------------------------------------------- reference HTTP views


@router.get(
    "/ws/{slug}/status/",
    summary="Topic availability (plain text, as the reference)",
    description="200 `Consumer connected`; 503 `Status unknown`; 503 `Consumer could not be reached`; "
    "400 `Topic is excluded from ping` when the topic does not support DASF; 404 unknown topic. Allowed "
    "for public topics and for users with any grant on the topic.",
    response_class=PlainTextResponse,
    responses={
        **responses(401, 403, 404, 422),
        200: {
            "description": "A consumer (backend) answered the latest ping.",
            "content": {"text/plain": {"example": "Consumer connected"}},
        },
        400: {
            "description": "The topic does not support DASF, so it is never pinged.",
            "content": {"text/plain": {"example": "Topic is excluded from ping"}},
        },
        503: {
            "description": "The DASF availability answer (dasf-protocol.md, HTTP status view), not a server "
            "failure: `Status unknown` when no ping was sent within the last 2 minutes, `Consumer could not be "
            "reached` when the latest ping got no pong. Clients ping (`ping/`) and poll again.",
            "content": {
                "text/plain": {
                    "examples": {
                        "unknown": {"value": "Status unknown"},
                        "unreachable": {"value": "Consumer could not be reached"},
                    }
                }
            },
        },
    },
)
async def status_text(
    request: Request, session: SessionDep, user: OptionalUser, slug: str
) -> PlainTextResponse:
    topic = await _fresh_topic(request, session, slug)
    await _visible(request, await Requester.load(session, user), topic)
    if not topic.supports_dasf:
        return PlainTextResponse("Topic is excluded from ping", status_code=400)
    value = availability(
        topic.supports_dasf, topic.last_ping, topic.last_pong, _broker(request.app).clock.now()
    )
    code, text = STATUS_TEXT[value]
    return PlainTextResponse(text, status_code=code)


_PING_DOC = dict(
    summary="Ping a topic, then redirect to its status",
    description="Sends a `ping` to every consumer socket of the topic and answers 302 to `status/` "
    "(the status right after is usually still the previous one; poll again). Public topics, producers "
    "and managers.",
    status_code=302,
    response_class=RedirectResponse,
    responses=responses(401, 403, 404),
)


async def _ping_and_redirect(request: Request, session: SessionDep, user: Any, slug: str) -> RedirectResponse:
    topic = await service.get_topic(session, slug)
    await _pingable(request, await Requester.load(session, user), topic)
    broker = _broker(request.app)
    await broker.ping_topic(topic_info(topic, broker.config))
    return RedirectResponse(f"{request.url.path.rsplit('/ping/', 1)[0]}/status/", status_code=302)


@router.get("/ws/{slug}/ping/", **_PING_DOC)  # type: ignore[arg-type]
async def ping_text(request: Request, session: SessionDep, user: OptionalUser, slug: str) -> RedirectResponse:
    return await _ping_and_redirect(request, session, user, slug)


@router.post("/ws/{slug}/ping/", **_PING_DOC)  # type: ignore[arg-type]
async def ping_text_post(
    request: Request, session: SessionDep, user: OptionalUser, slug: str
) -> RedirectResponse:
    return await _ping_and_redirect(request, session, user, slug)


# --------------------------------------------------------------------------- JSON topic API

api = APIRouter(prefix="/api/broker/topics", tags=["broker"])


@api.get(
    "/",
    response_model=list[TopicRead],
    summary="List topics",
    description="Topics the caller may see (public, granted, owned; organisation admins and coaches: every "
    "topic of their organisation; superusers see all; never another organisation's). Response topics "
    "only with `responses=true`. `X-Total-Count` carries the total.",
    responses=responses(401),
)
async def list_topics(
    request: Request,
    session: SessionDep,
    response: Response,
    user: CurrentUser,
    responses_: Annotated[bool, Query(alias="responses")] = False,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[Any]:
    await _broker(request.app).flush()
    requester = await Requester.load(session, user)
    rows, total = await service.visible_topics(requester, responses=responses_, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return await _read(request, session, rows)


@api.post(
    "/",
    response_model=TopicDetail,
    status_code=status.HTTP_201_CREATED,
    summary="Create a topic",
    description="The creator owns the topic and gets `can_produce`, `can_consume` and `can_view_status`. "
    "`anonymous_can_consume` + `is_public` is the reference's `--anonymous` (what demessaging's test "
    "harness uses).",
    responses=responses(401, 409, 422),
)
async def create_topic(request: Request, session: SessionDep, user: CurrentUser, data: TopicCreate) -> Any:
    topic = await service.create_topic(session, data.slug, user, **data.model_dump(exclude={"slug"}))
    _invalidate_after_commit(request, session, [topic.slug])
    return (await _read(request, session, [topic], detail=True))[0]


@api.get(
    "/{slug}/",
    response_model=TopicDetail,
    summary="Get a topic",
    description="Settings, availability, api_info, pending and stored counts.",
    responses=responses(401, 403, 404),
)
async def get_topic(request: Request, session: SessionDep, user: OptionalUser, slug: str) -> Any:
    topic = await _fresh_topic(request, session, slug)
    await _visible(request, await Requester.load(session, user), topic)
    return (await _read(request, session, [topic], detail=True))[0]


@api.patch(
    "/{slug}/",
    response_model=TopicDetail,
    summary="Update a topic",
    description="Owner, organisation admin or superuser; another organisation's topic is 404. `store_messages: null` returns to the server default.",
    responses=responses(401, 403, 404, 422),
)
async def update_topic(
    request: Request, session: SessionDep, user: CurrentUser, slug: str, data: TopicUpdate
) -> Any:
    topic = await service.get_topic(session, slug)
    await service.require_manager(await Requester.load(session, user), topic)
    service.update_topic(topic, data.model_dump(exclude_unset=True))
    await session.flush()
    _invalidate_after_commit(request, session, [slug])
    return (await _read(request, session, [topic], detail=True))[0]


@api.delete(
    "/{slug}/",
    response_model=Detail,
    summary="Delete a topic",
    description="Owner, organisation admin or superuser; another organisation's topic is 404. Deletes its response topics, stored messages and grants too.",
    responses=responses(401, 403, 404),
)
async def delete_topic(request: Request, session: SessionDep, user: CurrentUser, slug: str) -> Detail:
    topic = await service.get_topic(session, slug)
    await service.require_manager(await Requester.load(session, user), topic)
    slugs = await service.delete_topic(session, topic)
    _invalidate_after_commit(request, session, slugs)
    return Detail(detail=f"Topic {slug} deleted.")


@api.get(
    "/{slug}/status/",
    response_model=StatusRead,
    summary="Topic availability (JSON)",
    description="`availability`: true (online), false (unreachable), null (unknown or not DASF).",
    responses=responses(401, 403, 404),
)
async def topic_status(request: Request, session: SessionDep, user: OptionalUser, slug: str) -> StatusRead:
    topic = await _fresh_topic(request, session, slug)
    await _visible(request, await Requester.load(session, user), topic)
    value = availability(
        topic.supports_dasf, topic.last_ping, topic.last_pong, _broker(request.app).clock.now()
    )
    text = STATUS_TEXT[value][1] if topic.supports_dasf else "Topic is excluded from ping"
    return StatusRead(
        slug=slug, availability=value, status=text, last_ping=topic.last_ping, last_pong=topic.last_pong
    )


@api.post(
    "/{slug}/ping/",
    response_model=StatusRead,
    summary="Ping a topic",
    description="Sends a `ping` to every consumer socket; the answer shows the status before the pongs arrive.",
    responses=responses(401, 403, 404),
)
async def ping_topic(request: Request, session: SessionDep, user: OptionalUser, slug: str) -> StatusRead:
    topic = await service.get_topic(session, slug)
    await _pingable(request, await Requester.load(session, user), topic)
    broker = _broker(request.app)
    await broker.ping_topic(topic_info(topic, broker.config))
    return await topic_status(request, session, user, slug)


@api.get(
    "/{slug}/grants/",
    response_model=list[GrantRead],
    summary="List a topic's grants",
    description="Per-user `can_produce`, `can_consume`, `can_view_status`. Owner, organisation admin or superuser; another organisation's topic is 404.",
    responses=responses(401, 403, 404),
)
async def list_grants(session: SessionDep, user: CurrentUser, slug: str) -> list[GrantRead]:
    topic = await service.get_topic(session, slug)
    await service.require_manager(await Requester.load(session, user), topic)
    return [
        GrantRead(
            user_id=g.user_id,
            username=name,
            can_produce=g.can_produce,
            can_consume=g.can_consume,
            can_view_status=g.can_view_status,
        )
        for g, name in await service.list_grants(session, topic)
    ]


@api.put(
    "/{slug}/grants/{user_ref}/",
    response_model=GrantRead,
    summary="Grant permissions to a user",
    description="Sets the user's three flags (user by id or username). Connected sockets see the change "
    "at once. Owner, organisation admin or superuser; another organisation's topic is 404. An organisation's "
    "topic is granted only to its users (400 `grant_outside_organization`).",
    responses=responses(400, 401, 403, 404, 422),
)
async def put_grant(
    request: Request, session: SessionDep, user: CurrentUser, slug: str, user_ref: str, data: GrantWrite
) -> GrantRead:
    topic = await service.get_topic(session, slug)
    await service.require_manager(await Requester.load(session, user), topic)
    target = await service.find_user(session, user_ref)
    grant = await service.set_grant(session, topic, target, **data.model_dump())
    _invalidate_after_commit(request, session, None)
    return GrantRead(
        user_id=target.id,
        username=target.username,
        can_produce=grant.can_produce,
        can_consume=grant.can_consume,
        can_view_status=grant.can_view_status,
    )


@api.delete(
    "/{slug}/grants/{user_ref}/",
    response_model=Detail,
    summary="Revoke a user's permissions",
    description="Removes the user's grant on the topic. Owner, organisation admin or superuser; another organisation's topic is 404.",
    responses=responses(401, 403, 404),
)
async def delete_grant(
    request: Request, session: SessionDep, user: CurrentUser, slug: str, user_ref: str
) -> Detail:
    topic = await service.get_topic(session, slug)
    await service.require_manager(await Requester.load(session, user), topic)
    target = await service.find_user(session, user_ref)
    await service.revoke_grant(session, topic, target)
    _invalidate_after_commit(request, session, None)
    return Detail(detail=f"Revoked {target.username}'s grant on {slug}.")


@api.get(
    "/{slug}/messages/",
    response_model=list[MessageRead],
    summary="List stored messages",
    description="Stored messages in delivery order with who acknowledged them; `X-Total-Count` carries "
    "the total. Owner, organisation admin or superuser; another organisation's topic is 404.",
    responses=responses(401, 403, 404),
)
async def list_messages(
    request: Request,
    session: SessionDep,
    response: Response,
    user: CurrentUser,
    slug: str,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[MessageRead]:
    await _broker(request.app).flush()
    topic = await service.get_topic(session, slug)
    await service.require_manager(await Requester.load(session, user), topic)
    rows, total = await service.list_messages(session, topic, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    import json

    return [
        MessageRead(
            id=r.id,
            message_id=r.message_id,
            context=r.context,
            user_id=r.user_id,
            created_at=r.created_at,
            delivered_to=keys,
            content=json.loads(r.content),
        )
        for r, keys in rows
    ]


@api.post(
    "/{slug}/messages/{message_ref}/resend/",
    response_model=Detail,
    summary="Re-send a stored message",
    description="Publishes the stored envelope again to every consumer socket (by table id or messageId). "
    "Owner, organisation admin or superuser; another organisation's topic is 404.",
    responses=responses(401, 403, 404),
)
async def resend_message(
    request: Request, session: SessionDep, user: CurrentUser, slug: str, message_ref: str
) -> Detail:
    topic = await service.get_topic(session, slug)
    await service.require_manager(await Requester.load(session, user), topic)
    row = await service.get_message(session, topic, message_ref)
    broker = _broker(request.app)
    await broker.resend(topic_info(topic, broker.config), row.id, row.content)
    return Detail(detail=f"Message {row.message_id} re-sent.")


def include(app: Any) -> None:
    """Mount the broker: JSON API, HTTP views, websockets, and the /ws/ catch-all last."""
    app.include_router(api)
    app.include_router(router)
    app.include_router(unrouted_router)


__all__ = ["api", "include", "router", "unrouted_router", "NotFound"]
