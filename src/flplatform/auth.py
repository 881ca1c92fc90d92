"""Who is calling: ``Authorization: Token <key>``, ``Bearer <key>`` (OAuth2 / API tokens),
HTTP Basic with username-or-email and password, and HTTP Basic with a token as the user
name and an empty password (the DLR clients' ``http://<token>@host`` form).

The security schemes are declared for OpenAPI so Swagger UI's "Authorize" dialog offers
all three; the header itself is parsed once here.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBasic, OAuth2PasswordBearer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from flplatform.db import SessionDep
from flplatform.errors import Forbidden, Unauthorized
from flplatform.input_guard import require_text
from flplatform.orm import ApiToken, User
from flplatform.orm.base import utcnow
from flplatform.security import token_digest, verify_password
from flplatform.services.login_names import user_for_login

oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="/api/auth/token/", auto_error=False, description="Log in with username (or email) and password."
)
basic_scheme = HTTPBasic(auto_error=False, description="Username or email + password, or a token + empty password.")
token_scheme = APIKeyHeader(
    name="Authorization", auto_error=False, scheme_name="TokenAuth", description="`Token <key>` or `Bearer <key>`."
)

# Writing last_used_at on every request would turn reads into writes; a coarse value is enough.
_LAST_USED_RESOLUTION = dt.timedelta(minutes=5)


async def user_for_token(session: AsyncSession, token: str) -> User | None:
    row = (
        await session.execute(
            select(ApiToken).options(joinedload(ApiToken.user)).where(ApiToken.digest == token_digest(token))
        )
    ).scalar_one_or_none()
    now = utcnow()
    if row is None or not row.is_usable(now):
        return None
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        row.last_used_at = now
    return row.user


async def user_for_password(session: AsyncSession, login: str, password: str) -> User | None:
    """Username or email login; inactive users are returned too (the caller refuses them)."""
    user = await user_for_login(session, login)
    ok = await verify_password(password, user.password_hash if user else None)
    return user if ok else None


async def authenticate(session: AsyncSession, authorization: str | None) -> User | None:
    """The user an ``Authorization`` header names, or None when there is no header.

    Raises ``Unauthorized`` for a header that is present but wrong, expired or revoked.
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    user: User | None
    if scheme in ("token", "bearer"):
        user = await user_for_token(session, credentials)
        if user is None:
            raise Unauthorized("Invalid token.", code="invalid_token")
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
            user = await user_for_token(session, login)
        else:
            user = await user_for_password(session, login, password)
        if user is None:
            raise Unauthorized("Invalid username/password.", code="invalid_credentials")
    else:
        raise Unauthorized("Unsupported authorization scheme.", code="invalid_credentials")
    if not user.is_active:
        raise Unauthorized("User inactive or deleted.", code="user_inactive")
    return user


async def optional_user(
    request: Request,
    session: SessionDep,
    _oauth: Annotated[str | None, Depends(oauth2_scheme)],
    _basic: Annotated[object, Depends(basic_scheme)],
    _token: Annotated[str | None, Depends(token_scheme)],
) -> User | None:
    try:
        user = await authenticate(session, request.headers.get("authorization"))
    except Unauthorized as exc:
        if exc.code == "invalid_credentials":  # wrong password or malformed credentials (not stale tokens)
            from flplatform.billing import audit

            await audit.record_detached(
                request.app.state.sessionmaker, "auth.login_failed", exc.detail, level="WARNING", request=request
            )
        raise
    request.state.user = user
    return user


async def current_user(user: Annotated[User | None, Depends(optional_user)]) -> User:
    if user is None:
        raise Unauthorized()
    return user


async def current_superuser(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_superuser:
        raise Forbidden("Only superusers may do this.")
    return user


OptionalUser = Annotated[User | None, Depends(optional_user)]
CurrentUser = Annotated[User, Depends(current_user)]
SuperUser = Annotated[User, Depends(current_superuser)]
