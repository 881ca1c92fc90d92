"""Who is calling, as FastAPI dependencies: the user (``OptionalUser``, ``CurrentUser``,
``SuperUser``, ``CallerOrSelfRegistration``) and the permission subject with their roles
(``RequesterDep``, ``AuthenticatedRequester``; ``flplatform.permissions.Requester``).

The security schemes are declared for OpenAPI so Swagger UI's "Authorize" dialog offers all
three; the header itself is parsed once, by ``auth.authentication``. Requests with a body were
already authenticated from their headers by ``auth.request_guard`` before the body was read, and
that result is reused here; each dependency says which ``AuthPolicy`` it stands for, so the
guard knows from a route's dependencies whether it needs a caller.

How a request authenticated decides whether it may see the user's never-expiring primary token:
only a password or the primary token itself may (:func:`may_see_primary_token`); an API token
or an OAuth2 bearer must not turn into a credential that outlives its own revocation.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBasic, OAuth2PasswordBearer

from flplatform.auth.authentication import PASSWORD, PRIMARY_TOKEN, client_address, identify
from flplatform.auth.login_guard import guard_of
from flplatform.auth.request_guard import (
    PREAUTH_SCOPE_KEY,
    SELF_REGISTRATION_OFF,
    AuthPolicy,
    PreAuthenticated,
    authentication,
)
from flplatform.db import SessionDep
from flplatform.errors import Forbidden, Unauthorized
from flplatform.orm import User
from flplatform.permissions.requester import Requester

oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="/api/auth/token/", auto_error=False, description="Log in with username (or email) and password."
)
basic_scheme = HTTPBasic(
    auto_error=False, description="Username or email + password, or a token + empty password."
)
token_scheme = APIKeyHeader(
    name="Authorization",
    auto_error=False,
    scheme_name="TokenAuth",
    description="`Token <key>` or `Bearer <key>`.",
)


@authentication(AuthPolicy.OPTIONAL)
async def optional_user(
    request: Request,
    session: SessionDep,
    _oauth: Annotated[str | None, Depends(oauth2_scheme)],
    _basic: Annotated[object, Depends(basic_scheme)],
    _token: Annotated[str | None, Depends(token_scheme)],
) -> User | None:
    preauth: PreAuthenticated | None = request.scope.get(PREAUTH_SCOPE_KEY)
    user: User | None
    if preauth is not None:  # checked from the headers before the body was read
        if isinstance(preauth.user, User):
            # Read and found active by the guard moments ago, in this request: adopted into
            # this session as it is (no second SELECT of the same row).
            user = await session.merge(preauth.user, load=False)
        else:
            user = await session.get(User, preauth.user_id)
        if user is None or not user.is_active:
            raise Unauthorized("User inactive or deleted.", code="user_inactive")
        method: str | None = preauth.method
    else:
        found = await identify(
            session,
            request.headers.get("authorization"),
            guard=guard_of(request.app),
            address=client_address(request),
        )
        user, method = (found.user, found.method) if found is not None else (None, None)
    request.state.user = user
    request.state.auth_method = method
    return user


@authentication(AuthPolicy.REQUIRED)
async def current_user(user: Annotated[User | None, Depends(optional_user)]) -> User:
    if user is None:
        raise Unauthorized()
    return user


@authentication(AuthPolicy.REQUIRED)
async def current_superuser(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_superuser:
        raise Forbidden("Only superusers may do this.")
    return user


@authentication(AuthPolicy.REGISTRATION)
async def caller_or_self_registration(
    request: Request, user: Annotated[User | None, Depends(optional_user)]
) -> User | None:
    """The caller, or None for an anonymous caller when self-registration is on (else 401)."""
    if user is None and not request.app.state.settings.allow_self_registration:
        raise Unauthorized(SELF_REGISTRATION_OFF)
    return user


def may_see_primary_token(request: Request) -> bool:
    """Only a password or the primary token itself may read the primary token."""
    return getattr(request.state, "auth_method", None) in (PASSWORD, PRIMARY_TOKEN)


async def get_requester(
    session: SessionDep, user: Annotated[User | None, Depends(optional_user)]
) -> Requester:
    """The caller (anonymous too) with their roles and memberships, loaded once per request."""
    return await Requester.load(session, user)


@authentication(AuthPolicy.REQUIRED)
async def require_requester(requester: Annotated[Requester, Depends(get_requester)]) -> Requester:
    if requester.is_anonymous:
        raise Unauthorized()
    return requester


OptionalUser = Annotated[User | None, Depends(optional_user)]
CallerOrSelfRegistration = Annotated[User | None, Depends(caller_or_self_registration)]
CurrentUser = Annotated[User, Depends(current_user)]
SuperUser = Annotated[User, Depends(current_superuser)]
RequesterDep = Annotated[Requester, Depends(get_requester)]
AuthenticatedRequester = Annotated[Requester, Depends(require_requester)]
