"""Users and their tokens (``/api/users/``): list, create, read, change and delete users; the
caller's primary token and API tokens (``/api/users/myself/…``).

Permission checks on ``/api/users/{user_id}/`` are the dependencies of ``users.dependencies``.
"""

from __future__ import annotations

import uuid

from fastapi import Request, Response, status

from flplatform.auth.dependencies import (
    AuthenticatedRequester,
    CallerOrSelfRegistration,
    CurrentUser,
    RequesterDep,
    may_see_primary_token,
)
from flplatform.db import SessionDep
from flplatform.errors import Forbidden, responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Detail, Limit, Offset
from flplatform.orm import User
from flplatform.permissions import Requester
from flplatform.trainings.outbound import validate_message_endpoint
from flplatform.users import service as user_service
from flplatform.users.dependencies import DeletableUser, ReadableUser, UpdatableUser
from flplatform.users.schemas import (
    TokenCreate,
    TokenCreated,
    TokenRead,
    UserCreate,
    UserRead,
    UserUpdate,
    read_user,
)

router = APIRouter(prefix="/api/users", tags=["users"])


@router.get(
    "/",
    response_model=list[UserRead],
    summary="List users",
    description="The users the caller may see (see docs/permissions.md), ordered by creation; "
    "`X-Total-Count` carries the total.",
    responses=responses(401),
)
async def list_users(
    response: Response,
    requester: AuthenticatedRequester,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[UserRead]:
    rows, total = await user_service.list_users(requester, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [read_user(u, viewer=requester) for u in rows]


@router.post(
    "/",
    response_model=UserRead,
    status_code=status.HTTP_201_CREATED,
    summary="Create a user",
    description="Superusers create any user (in any organisation); organisation admins create users in their "
    "organisation (the default `organization_id`). Anonymous callers may register themselves (never as staff "
    "or superuser, outside organisations) when `FLP_ALLOW_SELF_REGISTRATION` is on; joining an organisation "
    "goes through an invitation link. The response carries the new user's `token`.",
    responses=responses(401, 403, 404, 409, 422),
)
async def create_user(
    request: Request,
    session: SessionDep,
    data: UserCreate,
    caller: CallerOrSelfRegistration,
    requester: RequesterDep,
) -> UserRead:
    data = await user_service.authorize_new_user(requester, data)
    validate_message_endpoint(data.message_endpoint, request.app.state.settings)
    user, token = await user_service.create_user(session, data, created_by=caller)
    return read_user(user, token)


@router.get(
    "/myself/",
    response_model=UserRead,
    summary="The calling user",
    description="`token` (the never-expiring primary token) only for requests authenticated by password or by "
    "the primary token itself; API tokens and OAuth2 bearers get `null`.",
    responses=responses(401),
)
async def myself(request: Request, session: SessionDep, user: CurrentUser) -> UserRead:
    token = await user_service.primary_token(session, user) if may_see_primary_token(request) else None
    return read_user(user, token)


@router.post(
    "/myself/token/rotate/",
    response_model=UserRead,
    summary="Replace my primary token",
    description="Revokes the primary token (the one DLR clients use) and issues a new one. Only for requests "
    "authenticated by password or by the primary token (403 for API tokens and OAuth2 bearers).",
    responses=responses(401, 403),
)
async def rotate_token(request: Request, session: SessionDep, user: CurrentUser) -> UserRead:
    if not may_see_primary_token(request):
        raise Forbidden(
            "Rotating the primary token needs a password or the primary token itself.",
            code="primary_token_required",
        )
    return read_user(user, await user_service.rotate_primary_token(session, user))


@router.get(
    "/myself/tokens/",
    response_model=list[TokenRead],
    summary="List my API tokens",
    description="Newest first; `limit`/`offset` page them and `X-Total-Count` carries the total.",
    responses=responses(401, 422),
)
async def list_tokens(
    session: SessionDep, user: CurrentUser, response: Response, limit: Limit = 100, offset: Offset = 0
) -> list[TokenRead]:
    rows, total = await user_service.list_tokens(session, user, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [TokenRead.model_validate(t) for t in rows]


@router.post(
    "/myself/tokens/",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an API token",
    description="The token is shown once in the response; only a keyed digest is stored.",
    responses=responses(401, 422),
)
async def create_token(session: SessionDep, user: CurrentUser, data: TokenCreate) -> TokenCreated:
    row, token = await user_service.create_api_token(session, user, data)
    return TokenCreated(**TokenRead.model_validate(row).model_dump(), token=token)


@router.delete(
    "/myself/tokens/{token_id}/",
    response_model=TokenRead,
    summary="Revoke an API token",
    responses=responses(401, 404, 422),
)
async def revoke_token(session: SessionDep, user: CurrentUser, token_id: uuid.UUID) -> TokenRead:
    return TokenRead.model_validate(await user_service.revoke_token(session, user, token_id))


@router.get(
    "/{user_id}/",
    response_model=UserRead,
    summary="Get a user",
    description="`token` is included only when the caller asks for themselves, authenticated by password or by "
    "the primary token (not by an API token or an OAuth2 bearer).",
    responses=responses(401, 404, 422),
)
async def get_user(
    request: Request, session: SessionDep, requester: AuthenticatedRequester, user: ReadableUser
) -> UserRead:
    mine = user.id == requester.id and may_see_primary_token(request)
    token = await user_service.primary_token(session, user) if mine else None
    return read_user(user, token, viewer=requester)


async def _update(request: Request, requester: Requester, user: User, data: UserUpdate) -> UserRead:
    validate_message_endpoint(data.message_endpoint, request.app.state.settings)
    await user_service.update_user_as(requester, user, data)
    return read_user(user)


@router.patch(
    "/{user_id}/",
    response_model=UserRead,
    summary="Update a user",
    description="Users change themselves (within their organisation's `members_can_edit_*` settings); "
    "organisation admins change their organisation's users; superusers anyone.",
    responses=responses(401, 403, 404, 409, 422),
)
async def patch_user(
    request: Request, requester: AuthenticatedRequester, user: UpdatableUser, data: UserUpdate
) -> UserRead:
    return await _update(request, requester, user, data)


@router.put(
    "/{user_id}/",
    response_model=UserRead,
    summary="Update a user (same as PATCH)",
    responses=responses(401, 403, 404, 409, 422),
)
async def put_user(
    request: Request, requester: AuthenticatedRequester, user: UpdatableUser, data: UserUpdate
) -> UserRead:
    return await _update(request, requester, user, data)


@router.delete(
    "/{user_id}/",
    response_model=Detail,
    summary="Delete a user",
    description="Superusers delete anyone but themselves; organisation admins their organisation's users; "
    "users their own account (in an organisation: if `members_can_delete_account`).",
    responses=responses(401, 403, 404, 422),
)
async def delete_user(session: SessionDep, requester: AuthenticatedRequester, user: DeletableUser) -> Detail:
    await user_service.delete_user(session, user, by=requester.authenticated_user)
    return Detail(detail="User removed!")
