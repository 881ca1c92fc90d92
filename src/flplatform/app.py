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

from flplatform import __version__, blobs
from flplatform.auth.request_guard import RequestGuard
from flplatform.dashboard import install_dashboard
from flplatform.db import create_engine, create_sessionmaker
from flplatform.docs_ui import install_docs
from flplatform.errors import install_error_handlers
from flplatform.jobs import install as install_jobs
from flplatform.kit import malloc, tasks
from flplatform.kit.input_guard import InputGuard
from flplatform.kit.prometheus import HTTPMetrics, metrics_component
from flplatform.onboarding import FIRST_USER_HINT
from flplatform.openapi import install_openapi
from flplatform.routers import audit as audit_router
from flplatform.routers import auth as auth_router
from flplatform.routers import billing as billing_router
from flplatform.routers import billing_ledger as billing_ledger_router
from flplatform.routers import broker as broker_router
from flplatform.routers import groups as groups_router
from flplatform.routers import health as health_router
from flplatform.routers import inference as inference_router
from flplatform.routers import market as market_router
from flplatform.routers import metrics as metrics_router
from flplatform.routers import models as models_router
from flplatform.routers import organization_billing as organization_billing_router
from flplatform.routers import organizations as organizations_router
from flplatform.routers import training_rounds as training_rounds_router
from flplatform.routers import trainings as trainings_router
from flplatform.routers import users as users_router
from flplatform.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Each component is entered at start-up with the app and exited at shutdown (reverse order).
LifespanComponent = Callable[[FastAPI], AbstractAsyncContextManager[Any]]

DESCRIPTION = f"""
flplatform runs **federated learning** for organisations: clients train a PyTorch model on
their own data, upload updates, and the server aggregates them round after round.

**First start?** {FIRST_USER_HINT}

**Authenticate** with the *Authorize* button (OAuth2 password flow: username or email and
password), or send `Authorization: Token <key>`, `Bearer <key>`, or HTTP Basic.

**The workflow**, in the order of the sections below: log in (*auth*), upload a TorchScript model
(*models*), create and start a training with its participants (*trainings*), watch the rounds'
metrics, then ask the trained model for predictions with uncertainty (*inference*).

Every error has the same JSON shape: `{{"detail": "...", "code": "...", "errors": [...]}}`
(`errors` only for validation failures); each operation lists its error statuses with an example.
"""

# Workflow order: Swagger UI and ReDoc show the sections in this order.
TAGS = [
    {"name": "auth", "description": "Log in and obtain tokens."},
    {"name": "users", "description": "Users, their profile and their API tokens."},
    {
        "name": "models",
        "description": "Global models (TorchScript), their round history, client updates, metrics, "
        "preprocessing and SWAG statistics.",
    },
    {
        "name": "trainings",
        "description": "Federated trainings: participants, lifecycle (I/O/S/C/E), rounds, "
        "signed notifications to clients.",
    },
    {
        "name": "inference",
        "description": "Predictions with uncertainty (ensembles, MC dropout, SWAG) from "
        "global, mean and SWAG models.",
    },
    {
        "name": "broker",
        "description": "DASF message broker: topics, grants, stored messages, availability "
        "(websockets under /ws/).",
    },
    {
        "name": "organizations",
        "description": "Organisations, projects, groups, members, roles, invitation links and "
        "organisation settings (the permission hierarchy).",
    },
    {"name": "groups", "description": "DLR-compatible group routes (`/api/groups/`, `/api/users/groups/`)."},
    {
        "name": "billing",
        "description": "Balances (USD, TOKEN, COUPON), top-ups, coupons, usage charges, "
        "statements, bills, price list and ledger reconciliation.",
    },
    {
        "name": "organization-billing",
        "description": "An organisation's own money: balance, top-ups, operations by member, members' "
        "spending limits, monthly statements, bills, market earnings and its audit log.",
    },
    {
        "name": "market",
        "description": "Published models of every organisation (find, read, call), model copies and "
        "pulls of newer rounds.",
    },
    {"name": "audit", "description": "Append-only audit log of billing, permission and credential events."},
    {"name": "health", "description": "Liveness and readiness probes."},
]


def _operation_id(route: APIRoute) -> str:
    tag = route.tags[0] if route.tags else "default"
    return f"{tag}-{route.name}"


def lifespan_components() -> list[LifespanComponent]:
    """Background components of each domain; domains append theirs here."""
    from flplatform.auth.login_guard import login_guard_component
    from flplatform.billing.hooks import billing_component
    from flplatform.blobs.sweep import blob_sweeper_component
    from flplatform.broker import broker_component
    from flplatform.sandbox import sandbox_component
    from flplatform.trainings.event_stream import training_events_component
    from flplatform.trainings.sweeper import training_component
    from flplatform.workqueue import workqueue_component

    return [
        metrics_component,  # first in, last out: marks this process dead once the others are closed
        sandbox_component,
        login_guard_component,
        training_component,
        training_events_component,
        broker_component,
        billing_component,
        workqueue_component,
        blob_sweeper_component,
    ]


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = create_engine(settings)
    app.state.engine = engine
    app.state.sessionmaker = create_sessionmaker(engine)
    # The blob store these settings name (services find it with flplatform.blobs.store_for), and
    # the settings themselves (trainings.liveness reads them from the session).
    app.state.sessionmaker.configure(
        info={blobs.SESSION_KEY: blobs.open_store(settings), "settings": settings}
    )
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
        await _hint_first_user(app)
        return
    from flplatform.users.service import ensure_admin

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


async def _hint_first_user(app: FastAPI) -> None:
    from sqlalchemy.engine import make_url

    from flplatform.onboarding import first_user_banner, has_active_superuser

    async with app.state.sessionmaker() as session:
        if await has_active_superuser(session):
            return
    database = make_url(app.state.settings.database_url).render_as_string(hide_password=True)
    log.warning("\n%s", first_user_banner(database))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level)
    malloc.tune()  # FLP_MALLOC_TUNE=1: large buffers freed go back to the kernel (kit/malloc.py)
    install_jobs()  # job kinds and hooks: this process's in-process worker and rounds use them
    app = FastAPI(
        title="flplatform",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=_lifespan,
        generate_unique_id_function=_operation_id,
        docs_url=None,  # served by install_docs from the package's own copies of the assets
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    install_docs(app)
    install_dashboard(app)  # /ui/
    install_openapi(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials="*" not in settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    # Body limits and authentication from headers, before any body is read (request_guard.py).
    app.add_middleware(RequestGuard)
    app.add_middleware(InputGuard)  # NUL in path/query/headers never reaches a route
    if settings.metrics_enabled:  # outermost: counts every answer by route template (kit/prometheus.py)
        app.add_middleware(HTTPMetrics)
        app.include_router(metrics_router.router)
    # The participants' hot paths first: FastAPI tries the routes of every router included before
    # the matching one, one regular expression each (≈ 0.5 ms of CPU per update with these last).
    app.include_router(inference_router.router)  # before models: /api/models/{id}/metadata/
    app.include_router(models_router.router)
    app.include_router(trainings_router.router)
    app.include_router(training_rounds_router.router)
    app.include_router(health_router.router)
    app.include_router(billing_router.router)
    app.include_router(billing_ledger_router.router)
    app.include_router(organization_billing_router.router)
    app.include_router(market_router.router)
    app.include_router(market_router.copies_router)
    app.include_router(audit_router.router)
    app.include_router(auth_router.router)
    broker_router.include(app)  # JSON API, /ws/ views and websockets
    app.include_router(trainings_router.users_router)  # before users: /api/users/trainings/
    app.include_router(groups_router.users_groups_router)  # before users: /api/users/groups/
    app.include_router(users_router.router)
    for router in organizations_router.ALL_ROUTERS:
        app.include_router(router)
    return app
