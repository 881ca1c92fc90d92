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

HTTP routes stay thin: the topic a route names arrives loaded and authorised
(``VisibleTopic``, ``PingableTopic``, ``ManagedTopic`` in ``broker.dependencies``), and
``broker.service`` does the queries and builds the responses.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request, Response, WebSocket, status
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.convertors import Convertor, register_url_convertor

from flplatform.auth.dependencies import AuthenticatedRequester, CurrentUser
from flplatform.broker import service
from flplatform.broker.dependencies import (
    BrokerDep,
    ManagedTopic,
    PingableTopic,
    VisibleTopic,
    get_broker,
    handshake_identity,
)
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
from flplatform.db import SessionDep
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Detail, Limit, Offset


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


# --------------------------------------------------------------------------- websockets


async def _status_ping(websocket: WebSocket) -> None:
    user = await handshake_identity(websocket)
    await websocket.accept()
    await get_broker(websocket).status_ping_session(websocket, user)


async def _producer(websocket: WebSocket, slug: str) -> None:
    user = await handshake_identity(websocket)
    await websocket.accept()
    await get_broker(websocket).producer_session(websocket, slug, user)


async def _consumer(websocket: WebSocket, slug: str, subscription: str) -> None:
    user = await handshake_identity(websocket)
    history = websocket.query_params.get("history") == "all"
    await websocket.accept()
    await get_broker(websocket).consumer_session(websocket, slug, user, history=history)


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


def _websocket_base(request: Request) -> str:
    """This server's websocket URL prefix, ``ws[s]://host[/root]/ws/``, as the caller reached it."""
    scheme = "wss" if request.url.scheme == "https" else "ws"
    return f"{scheme}://{request.url.netloc}{request.scope.get('root_path', '')}/ws/"


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
async def status_text(broker: BrokerDep, topic: VisibleTopic) -> PlainTextResponse:
    code, text = service.status_answer(broker, topic)
    return PlainTextResponse(text, status_code=code)


_PING_DOC: dict[str, Any] = {
    "summary": "Ping a topic, then redirect to its status",
    "description": "Sends a `ping` to every consumer socket of the topic and answers 302 to `status/` "
    "(the status right after is usually still the previous one; poll again). Public topics, producers "
    "and managers.",
    "status_code": 302,
    "response_class": RedirectResponse,
    "responses": responses(401, 403, 404),
}


async def ping_text(request: Request, broker: BrokerDep, topic: PingableTopic) -> RedirectResponse:
    await service.ping(broker, topic)
    return RedirectResponse(f"{request.url.path.rsplit('/ping/', 1)[0]}/status/", status_code=302)


router.add_api_route("/ws/{slug}/ping/", ping_text, methods=["GET"], name="ping_text", **_PING_DOC)
router.add_api_route("/ws/{slug}/ping/", ping_text, methods=["POST"], name="ping_text_post", **_PING_DOC)


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
    response: Response,
    broker: BrokerDep,
    requester: AuthenticatedRequester,
    responses_: Annotated[bool, Query(alias="responses")] = False,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[TopicRead]:
    reads, total = await service.list_topic_reads(
        broker,
        requester,
        responses=responses_,
        limit=limit,
        offset=offset,
        websocket_base=_websocket_base(request),
    )
    response.headers["X-Total-Count"] = str(total)
    return reads


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
async def create_topic(
    request: Request, session: SessionDep, broker: BrokerDep, user: CurrentUser, data: TopicCreate
) -> TopicDetail:
    topic = await service.create_topic(session, data.slug, user, **data.model_dump(exclude={"slug"}))
    service.invalidate_after_commit(session, broker, [topic.slug])
    return await service.topic_detail(session, broker, topic, _websocket_base(request))


@api.get(
    "/{slug}/",
    response_model=TopicDetail,
    summary="Get a topic",
    description="Settings, availability, api_info, pending and stored counts.",
    responses=responses(401, 403, 404),
)
async def get_topic(
    request: Request, session: SessionDep, broker: BrokerDep, topic: VisibleTopic
) -> TopicDetail:
    return await service.topic_detail(session, broker, topic, _websocket_base(request))


@api.patch(
    "/{slug}/",
    response_model=TopicDetail,
    summary="Update a topic",
    description="Owner, organisation admin or superuser; another organisation's topic is 404. `store_messages: null` returns to the server default.",
    responses=responses(401, 403, 404, 422),
)
async def update_topic(
    request: Request, session: SessionDep, broker: BrokerDep, topic: ManagedTopic, data: TopicUpdate
) -> TopicDetail:
    await service.update_topic(session, topic, data.model_dump(exclude_unset=True))
    service.invalidate_after_commit(session, broker, [topic.slug])
    return await service.topic_detail(session, broker, topic, _websocket_base(request))


@api.delete(
    "/{slug}/",
    response_model=Detail,
    summary="Delete a topic",
    description="Owner, organisation admin or superuser; another organisation's topic is 404. Deletes its response topics, stored messages and grants too.",
    responses=responses(401, 403, 404),
)
async def delete_topic(session: SessionDep, broker: BrokerDep, topic: ManagedTopic, slug: str) -> Detail:
    slugs = await service.delete_topic(session, topic)
    service.invalidate_after_commit(session, broker, slugs)
    return Detail(detail=f"Topic {slug} deleted.")


@api.get(
    "/{slug}/status/",
    response_model=StatusRead,
    summary="Topic availability (JSON)",
    description="`availability`: true (online), false (unreachable), null (unknown or not DASF).",
    responses=responses(401, 403, 404),
)
async def topic_status(broker: BrokerDep, topic: VisibleTopic) -> StatusRead:
    return service.topic_status(broker, topic)


@api.post(
    "/{slug}/ping/",
    response_model=StatusRead,
    summary="Ping a topic",
    description="Sends a `ping` to every consumer socket; the answer shows the status before the pongs arrive.",
    responses=responses(401, 403, 404),
)
async def ping_topic(session: SessionDep, broker: BrokerDep, topic: PingableTopic) -> StatusRead:
    await service.ping(broker, topic)
    # A caller who may ping may see the topic; the status is read as ``status/`` reads it.
    return service.topic_status(broker, await service.fresh_topic(session, broker, topic.slug))


@api.get(
    "/{slug}/grants/",
    response_model=list[GrantRead],
    summary="List a topic's grants",
    description="Per-user `can_produce`, `can_consume`, `can_view_status`, by username. Owner, organisation "
    "admin or superuser; another organisation's topic is 404. `X-Total-Count` carries the total.",
    responses=responses(401, 403, 404, 422),
)
async def list_grants(
    session: SessionDep, response: Response, topic: ManagedTopic, limit: Limit = 100, offset: Offset = 0
) -> list[GrantRead]:
    rows, total = await service.grant_reads(session, topic, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return rows


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
    session: SessionDep, broker: BrokerDep, topic: ManagedTopic, slug: str, user_ref: str, data: GrantWrite
) -> GrantRead:
    # ``slug`` (loaded by ``ManagedTopic``) is named here too so the documented parameters keep
    # their order: slug, then user_ref.
    target = await service.find_user(session, user_ref)
    grant = await service.set_grant(session, topic, target, **data.model_dump())
    service.invalidate_after_commit(session, broker, None)
    return service.grant_read(grant, target.username)


@api.delete(
    "/{slug}/grants/{user_ref}/",
    response_model=Detail,
    summary="Revoke a user's permissions",
    description="Removes the user's grant on the topic. Owner, organisation admin or superuser; another organisation's topic is 404.",
    responses=responses(401, 403, 404),
)
async def delete_grant(
    session: SessionDep, broker: BrokerDep, topic: ManagedTopic, slug: str, user_ref: str
) -> Detail:
    target = await service.find_user(session, user_ref)
    await service.revoke_grant(session, topic, target)
    service.invalidate_after_commit(session, broker, None)
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
    session: SessionDep,
    response: Response,
    broker: BrokerDep,
    topic: ManagedTopic,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[MessageRead]:
    reads, total = await service.message_reads(session, broker, topic, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return reads


@api.post(
    "/{slug}/messages/{message_ref}/resend/",
    response_model=Detail,
    summary="Re-send a stored message",
    description="Publishes the stored envelope again to every consumer socket (by table id or messageId). "
    "Owner, organisation admin or superuser; another organisation's topic is 404.",
    responses=responses(401, 403, 404),
)
async def resend_message(
    session: SessionDep, broker: BrokerDep, topic: ManagedTopic, slug: str, message_ref: str
) -> Detail:
    # ``slug`` is named for the documented parameter order (see ``put_grant``).
    message_id = await service.resend_message(session, broker, topic, message_ref)
    return Detail(detail=f"Message {message_id} re-sent.")


def include(app: Any) -> None:
    """Mount the broker: JSON API, HTTP views, websockets, and the /ws/ catch-all last."""
    app.include_router(api)
    app.include_router(router)
    app.include_router(unrouted_router)


__all__ = ["api", "include", "router", "unrouted_router"]
