"""Who a request's ``Authorization`` header names: ``Token <key>``, ``Bearer <key>`` (OAuth2 / API
tokens), HTTP Basic with username-or-email and password, and HTTP Basic with a token as the user
name and an empty password (the DLR clients' ``http://<token>@host`` form).

Plain functions over a session, shared by the FastAPI dependencies (``auth.dependencies``), the
request-body guard (``auth.request_guard``, which authenticates before a body is read) and the
broker's websocket. Password checks go through the login throttle (``auth.login_guard``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from flplatform.auth.credentials import token_digest, verify_password
from flplatform.auth.login_guard import LoginGuard
from flplatform.auth.login_names import user_for_login
from flplatform.errors import Unauthorized
from flplatform.kit.input_guard import require_text
from flplatform.orm import ApiToken, User
from flplatform.orm.base import utcnow

# How a request authenticated (request.state.auth_method).
PASSWORD = "password"
PRIMARY_TOKEN = "primary_token"
TOKEN = "token"  # an API token or an OAuth2 bearer

# Writing last_used_at on every request would turn reads into writes; a coarse value is enough.
_LAST_USED_RESOLUTION = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Identified:
    user: User
    method: str  # PASSWORD, PRIMARY_TOKEN or TOKEN


# Built once: every authenticated request runs it (building and hashing a statement per request cost
# ≈ 0.1 ms of the event loop's time per client update).
_TOKEN_BY_DIGEST = (
    select(ApiToken).options(joinedload(ApiToken.user)).where(ApiToken.digest == bindparam("digest"))
)


async def _token_row(session: AsyncSession, token: str) -> ApiToken | None:
    row = (await session.execute(_TOKEN_BY_DIGEST, {"digest": token_digest(token)})).scalar_one_or_none()
    now = utcnow()
    if row is None or not row.is_usable(now):
        return None
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        row.last_used_at = now
    return row


async def user_for_token(session: AsyncSession, token: str) -> User | None:
    row = await _token_row(session, token)
    return row.user if row is not None else None


async def user_for_password(session: AsyncSession, login: str, password: str) -> User | None:
    """Username or email login; inactive users are returned too (the caller refuses them).
    Not throttled: request paths use :func:`login_with_password`."""
    user = await user_for_login(session, login)
    ok = await verify_password(password, user.password_hash if user else None)
    return user if ok else None


async def login_with_password(
    session: AsyncSession, login: str, password: str, *, guard: LoginGuard | None, address: str | None
) -> User | None:
    """:func:`user_for_password` behind the login throttle: 429 once the name or the address has
    used up its failures (before any hashing), failures counted and audited in aggregate."""
    user = await user_for_login(session, login)
    if guard is not None:
        await guard.check(login, address, user.id if user else None)
    ok = await verify_password(password, user.password_hash if user else None)
    if ok:
        return user
    if guard is not None:
        await guard.failed(login, address, user.id if user else None)
    return None


async def identify(
    session: AsyncSession,
    authorization: str | None,
    *,
    guard: LoginGuard | None = None,
    address: str | None = None,
) -> Identified | None:
    """The user an ``Authorization`` header names and how, or None when there is no header.

    Raises ``Unauthorized`` for a header that is present but wrong, expired or revoked, and
    ``TooManyRequests`` for a throttled password check.
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    user: User | None = None
    method = TOKEN
    if scheme in ("token", "bearer"):
        row = await _token_row(session, credentials)
        if row is None:
            raise Unauthorized("Invalid token.", code="invalid_token")
        user, method = row.user, PRIMARY_TOKEN if row.is_primary else TOKEN
    elif scheme == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("Invalid basic header.", code="invalid_credentials") from None
        login, sep, password = decoded.partition(":")
        if not sep:
            raise Unauthorized("Invalid basic header.", code="invalid_credentials")
        require_text(login, "The Basic user name")
        require_text(password, "The Basic password")
        if password == "":
            row = await _token_row(session, login)
            if row is not None:
                user, method = row.user, PRIMARY_TOKEN if row.is_primary else TOKEN
        else:
            user = await login_with_password(session, login, password, guard=guard, address=address)
            method = PASSWORD
        if user is None:
            raise Unauthorized("Invalid username/password.", code="invalid_credentials")
    else:
        raise Unauthorized("Unsupported authorization scheme.", code="invalid_credentials")
    if not user.is_active:
        raise Unauthorized("User inactive or deleted.", code="user_inactive")
    return Identified(user, method)


async def authenticate(
    session: AsyncSession,
    authorization: str | None,
    *,
    guard: LoginGuard | None = None,
    address: str | None = None,
) -> User | None:
    """:func:`identify` without the method."""
    found = await identify(session, authorization, guard=guard, address=address)
    return found.user if found is not None else None


def client_address(connection: Any) -> str | None:
    client = getattr(connection, "client", None)
    return client.host if client is not None else None
