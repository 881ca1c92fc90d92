from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm

from flplatform.auth import user_for_password
from flplatform.billing import audit
from flplatform.db import SessionDep
from flplatform.errors import Unauthorized, responses
from flplatform.input_guard import require_text
from flplatform.schemas.user import AccessToken
from flplatform.services import users as user_service

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post(
    "/token/",
    response_model=AccessToken,
    summary="Log in (OAuth2 password flow)",
    description="Exchange username (or email) and password for a bearer token; this is what Swagger UI's "
    "**Authorize** dialog calls. The token expires after `FLP_ACCESS_TOKEN_TTL_SECONDS`.",
    responses=responses(401, 422),
)
async def login(
    request: Request, session: SessionDep, form: Annotated[OAuth2PasswordRequestForm, Depends()]
) -> AccessToken:
    require_text(form.username, "username")
    require_text(form.password, "password")
    user = await user_for_password(session, form.username, form.password)
    if user is None:
        # In a session of its own: this request rolls back.
        await audit.record_detached(
            request.app.state.sessionmaker, "auth.login_failed", f"failed login for {form.username[:150]!r}",
            level="WARNING", request=request,
        )
        raise Unauthorized("Invalid username/password.", code="invalid_credentials")
    if not user.is_active:
        raise Unauthorized("User inactive or deleted.", code="user_inactive")
    ttl = request.app.state.settings.access_token_ttl_seconds
    token = await user_service.create_access_token(session, user, ttl)
    return AccessToken(access_token=token, expires_in=ttl)
