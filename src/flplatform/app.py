"""Application factory. The lifespan opens the engine, bootstraps the first admin and starts
each domain's background components (broker timers, workers, …), closing them in reverse."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flplatform import __version__, tasks
from flplatform.db import create_engine, create_sessionmaker
from flplatform.errors import error_response, install_error_handlers
from flplatform.routers import auth as auth_router
from flplatform.routers import billing as billing_router
from flplatform.routers import broker as broker_router
from flplatform.routers import health as health_router
from flplatform.routers import inference as inference_router
from flplatform.routers import organizations as organizations_router
from flplatform.routers import models as models_router
from flplatform.routers import trainings as trainings_router
from flplatform.routers import users as users_router
from flplatform.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Each component is entered at start-up with the app and exited at shutdown (reverse order).
LifespanComponent = Callable[[FastAPI], AbstractAsyncContextManager[Any]]

DESCRIPTION = """
flplatform runs **federated learning** for organisations: clients train a PyTorch model on
their own data, upload updates, and the server aggregates them round after round.

**Authenticate** with the *Authorize* button (OAuth2 password flow: username or email and
password), or send `Authorization: Token <key>`, `Bearer <key>`, or HTTP Basic.

Every error has the same JSON shape: `{"detail": "...", "code": "...", "errors": [...]}`
(`errors` only for validation failures).
"""

TAGS = [
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "auth", "description": "Log in and obtain tokens."},
    {"name": "billing", "description": "Balances (USD, TOKEN, COUPON), top-ups, coupons, usage charges, "
     "statements, bills, price list and ledger reconciliation."},
    {"name": "audit", "description": "Append-only audit log of billing, permission and credential events."},
    {"name": "users", "description": "Users, their profile and their API tokens."},
    {"name": "organizations", "description": "Organisations, projects, groups, members, roles, invitation links and "
     "organisation settings (the permission hierarchy)."},
    {"name": "groups", "description": "DLR-compatible group routes (`/api/groups/`, `/api/users/groups/`)."},
    {"name": "broker", "description": "DASF message broker: topics, grants, stored messages, availability "
     "(websockets under /ws/)."},
    {"name": "models", "description": "Global models (TorchScript), their round history, client updates, metrics, "
     "preprocessing and SWAG statistics."},
    {"name": "trainings", "description": "Federated trainings: participants, lifecycle (I/O/S/C/E), rounds, "
     "signed notifications to clients."},
    {"name": "inference", "description": "Predictions with uncertainty (ensembles, MC dropout, SWAG) from "
     "global, mean and SWAG models."},
]


class BodySizeLimit:
    """Refuse request bodies above a limit with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"Request body larger than {self.max_bytes} bytes.", "payload_too_large"
        )
        await response(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised while the body streams in; an HTTPException so FastAPI's body parsing passes it on."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"Request body larger than {max_bytes} bytes.")


def _operation_id(route: APIRoute) -> str:
    tag = route.tags[0] if route.tags else "default"
    return f"{tag}-{route.name}"


def lifespan_components() -> list[LifespanComponent]:
    """Background components of each domain; domains append theirs here."""
    from flplatform.services.trainings import training_component

    from flplatform.billing.hooks import billing_component
    from flplatform.broker import broker_component
    from flplatform.sandbox import sandbox_component
    from flplatform.workqueue import workqueue_component

    return [sandbox_component, training_component, broker_component, billing_component, workqueue_component]


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = create_engine(settings)
    app.state.engine = engine
    app.state.sessionmaker = create_sessionmaker(engine)
    try:
        await _bootstrap_admin(app)
        async with contextlib.AsyncExitStack() as stack:
            for component in lifespan_components():
                await stack.enter_async_context(component(app))
            yield
            await tasks.drain(timeout=5)
    finally:
        await tasks.cancel_all()
        await engine.dispose()


async def _bootstrap_admin(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    if not (settings.admin_username and settings.admin_password):
        return
    from flplatform.services.users import ensure_admin

    async with app.state.sessionmaker() as session:
        user = await ensure_admin(
            session,
            username=settings.admin_username,
            email=settings.admin_email,
            password=settings.admin_password.get_secret_value(),
        )
        await session.commit()
    if user is not None:
        log.info("created superuser %s from FLP_ADMIN_USERNAME", user.username)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level)
    app = FastAPI(
        title="flplatform",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=_lifespan,
        generate_unique_id_function=_operation_id,
        swagger_ui_parameters={"persistAuthorization": True},
    )
    app.state.settings = settings
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials="*" not in settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.include_router(health_router.router)
    app.include_router(billing_router.router)
    app.include_router(billing_router.audit_router)
    app.include_router(auth_router.router)
    broker_router.include(app)  # JSON API, /ws/ views and websockets
    app.include_router(trainings_router.users_router)  # before users: /api/users/trainings/
    app.include_router(organizations_router.users_groups_router)  # before users: /api/users/groups/
    app.include_router(users_router.router)
    for router in organizations_router.ALL_ROUTERS:
        app.include_router(router)
    app.include_router(inference_router.router)  # before models: /api/models/{id}/metadata/
    app.include_router(models_router.router)
    app.include_router(trainings_router.router)
    return app
