"""Request bodies: who may send one, and how large, decided before a byte of it is read.

FastAPI reads and parses a route's body (JSON, or a multipart form spooled to disk) *before* it
resolves the route's dependencies, authentication included. :class:`RequestGuard` is a pure ASGI
middleware that wraps ``receive``: the first time anything asks for the body — FastAPI's body
parsing or a route reading ``request.stream()`` itself — it runs, in this order:

1. **Size from headers**: a ``Content-Length`` above the route's limit is a 413 at once.
2. **Authentication from headers**, for routes whose dependencies authenticate (found by walking
   the route's dependency tree once): a route that needs a user and gets no ``Authorization``
   header is a 401; ``POST /api/users/`` without credentials is a 401 unless
   ``FLP_ALLOW_SELF_REGISTRATION``; a present header is checked now (tokens, or a throttled
   password check), in a session of its own. The result is left in the scope, so the route's own
   dependency does not verify the password a second time.
3. **Size while streaming**: bytes are counted as they arrive (chunked bodies have no
   ``Content-Length``) and the request fails with 413 when the count passes the limit.

Limits: multipart bodies ``FLP_MAX_UPLOAD_BYTES``, every other body ``FLP_MAX_JSON_BODY_BYTES``;
a route may set its own with :func:`body_limits` (the inference routes do).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flplatform.auth.authentication import PASSWORD, identify
from flplatform.auth.login_guard import guard_of
from flplatform.errors import AppError, PayloadTooLarge, Unauthorized

# Where a header-authenticated caller is left for flplatform.auth.dependencies.optional_user.
PREAUTH_SCOPE_KEY = "flplatform.preauth"

LimitFn = Callable[[Any], int]  # app.state -> bytes
Call = TypeVar("Call", bound=Callable[..., Any])


@dataclass(frozen=True)
class PreAuthenticated:
    user_id: uuid.UUID
    method: str
    # The row as the guard read it (committed, detached): the route's session adopts it
    # without reading it again (auth.dependencies.optional_user).
    user: Any = None


@dataclass(frozen=True)
class RouteBodyLimits:
    json: LimitFn | None = None
    multipart: LimitFn | None = None


def body_limits(*, json: LimitFn | None = None, multipart: LimitFn | None = None) -> Callable[[Any], Any]:
    """Decorate an endpoint whose bodies may exceed the defaults; each limit is a function of
    ``app.state`` so it follows the settings of the running application."""

    def mark(endpoint: Any) -> Any:
        endpoint.__flp_body_limits__ = RouteBodyLimits(json=json, multipart=multipart)
        return endpoint

    return mark


class AuthPolicy(enum.Enum):
    NONE = "none"  # the route never looks at credentials
    OPTIONAL = "optional"  # anonymous callers welcome; a present header must be valid
    REGISTRATION = "registration"  # anonymous only with FLP_ALLOW_SELF_REGISTRATION
    REQUIRED = "required"


_POLICY_ATTRIBUTE = "_flplatform_auth_policy"  # a route's policy, found once
_MARK_ATTRIBUTE = "_flplatform_authentication"  # what one dependency stands for


def authentication(policy: AuthPolicy) -> Callable[[Call], Call]:
    """Mark an authentication dependency with the policy it stands for (``auth.dependencies``);
    :func:`auth_policy` finds the marks in a route's dependency tree."""

    def mark(call: Call) -> Call:
        setattr(call, _MARK_ATTRIBUTE, policy)
        return call

    return mark


_STRICTNESS = (AuthPolicy.REQUIRED, AuthPolicy.REGISTRATION, AuthPolicy.OPTIONAL)


def auth_policy(route: Any) -> AuthPolicy:
    """The strictest authentication the route's dependency tree asks for."""
    cached = getattr(route, _POLICY_ATTRIBUTE, None)
    if isinstance(cached, AuthPolicy):
        return cached
    marks: set[AuthPolicy] = set()
    stack = [getattr(route, "dependant", None)]
    while stack:
        dependant = stack.pop()
        if dependant is None:
            continue
        mark = getattr(dependant.call, _MARK_ATTRIBUTE, None)
        if isinstance(mark, AuthPolicy):
            marks.add(mark)
        stack.extend(dependant.dependencies)
    policy = next((p for p in _STRICTNESS if p in marks), AuthPolicy.NONE)
    if route is not None:
        setattr(route, _POLICY_ATTRIBUTE, policy)
    return policy


class BodyRefused(HTTPException):
    """An AppError raised from ``receive``: FastAPI's body parsing passes HTTPExceptions on
    unchanged (anything else becomes a generic 400), and the app's handler keeps ``code``."""

    def __init__(self, error: AppError):
        super().__init__(error.status_code, error.detail, headers=error.headers)
        self.code = error.code


class RequestGuard:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, _GuardedBody(scope, receive).receive, send)


class _GuardedBody:
    def __init__(self, scope: Scope, receive: Receive):
        self.scope = scope
        self.inner = receive
        self.checked = False
        self.limit = 0
        self.received = 0

    async def receive(self) -> Message:
        if not self.checked:
            self.checked = True
            try:
                await self._before_body()
            except AppError as exc:
                raise BodyRefused(exc) from None
        message = await self.inner()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise BodyRefused(_too_large(self.limit))
        return message

    async def _before_body(self) -> None:
        scope = self.scope
        app = scope["app"]
        settings = app.state.settings
        headers = Headers(scope=scope)
        route = scope.get("route")
        limits: RouteBodyLimits = getattr(
            getattr(route, "endpoint", None), "__flp_body_limits__", RouteBodyLimits()
        )
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type == "multipart/form-data":
            self.limit = limits.multipart(app.state) if limits.multipart else settings.max_upload_bytes
        else:
            self.limit = limits.json(app.state) if limits.json else settings.max_json_body_bytes
        self.limit = min(self.limit, settings.max_upload_bytes)
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            raise _too_large(self.limit)
        if "user" in scope.get("state", {}):
            return  # the route's dependencies already authenticated (it reads the body itself)
        await self._authenticate(route, headers)

    async def _authenticate(self, route: Any, headers: Headers) -> None:
        policy = auth_policy(route)
        if policy is AuthPolicy.NONE:
            return
        authorization = headers.get("authorization")
        app = self.scope["app"]
        if not authorization:
            if policy is AuthPolicy.REQUIRED:
                raise Unauthorized()
            if policy is AuthPolicy.REGISTRATION and not app.state.settings.allow_self_registration:
                raise Unauthorized(SELF_REGISTRATION_OFF)
            return
        client = self.scope.get("client")
        async with app.state.sessionmaker() as session:
            found = await identify(
                session, authorization, guard=guard_of(app), address=client[0] if client else None
            )
            # A token look-up writes only through the ORM (the coarse last_used_at): with nothing
            # to write, closing the session ends its read. Password checks (the login throttle
            # writes with statements) always commit.
            if found is None or found.method == PASSWORD or session.dirty or session.new or session.deleted:
                await session.commit()
        if found is not None:
            self.scope[PREAUTH_SCOPE_KEY] = PreAuthenticated(
                user_id=found.user.id, method=found.method, user=found.user
            )


SELF_REGISTRATION_OFF = "Self-registration is disabled; ask an administrator."


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body larger than {limit} bytes.")
