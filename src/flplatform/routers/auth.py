from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordRequestForm

from flplatform.auth.authentication import PASSWORD, client_address, login_with_password
from flplatform.auth.login_guard import guard_of
from flplatform.db import SessionDep
from flplatform.errors import Unauthorized, responses
from flplatform.kit.input_guard import require_text
from flplatform.kit.routing import APIRouter
from flplatform.onboarding import FIRST_USER_HINT, has_users
from flplatform.users import service as user_service
from flplatform.users.schemas import AccessToken

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post(
    "/token/",
    response_model=AccessToken,
    summary="Log in (OAuth2 password flow)",
    description="Exchange username (or email) and password for a bearer token; this is what Swagger UI's "
    "**Authorize** dialog calls. The token expires after `FLP_ACCESS_TOKEN_TTL_SECONDS`.",
    responses={
        **responses(401, 422, 429),
        401: {
            **responses(401)[401],
            "content": {
                "application/json": {
                    "example": {
                        "detail": "Invalid username/password.",
                        "code": "invalid_credentials",
                        "error": "invalid_grant",
                        "error_description": "Invalid username/password.",
                    }
                }
            },
        },
    },
)
async def login(
    request: Request, session: SessionDep, form: Annotated[OAuth2PasswordRequestForm, Depends()]
) -> AccessToken:
    require_text(form.username, "username")
    require_text(form.password, "password")
    user = await login_with_password(
        session, form.username, form.password, guard=guard_of(request.app), address=client_address(request)
    )
    if user is None:  # counted and audited (aggregated) by the login guard
        detail = "Invalid username/password."
        if not await has_users(session):  # a fresh server: say how to make the first user
            detail = f"{detail} {FIRST_USER_HINT}"
        raise _login_refused(detail, "invalid_credentials")
    if not user.is_active:
        raise _login_refused("User inactive or deleted.", "user_inactive")
    request.state.auth_method = PASSWORD
    ttl = request.app.state.settings.access_token_ttl_seconds
    token = await user_service.create_access_token(session, user, ttl)
    return AccessToken(access_token=token, expires_in=ttl)


def _login_refused(detail: str, code: str) -> Unauthorized:
    """401 in the project's error shape plus RFC 6749 §5.2's ``error``/``error_description``, which
    OAuth2 clients (Swagger UI's "Auth Error" among them) show to the person logging in."""
    return Unauthorized(detail, code=code, extra={"error": "invalid_grant", "error_description": detail})
