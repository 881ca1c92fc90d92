"""Permission checks on ``/api/users/{user_id}/`` as FastAPI dependencies (Polar's ``auth.py``
annotations): a route declares ``user: UpdatableUser`` and receives a user the caller may change.

A user the caller may not see is 404, one they see but may not change or delete is 403
(``flplatform.permissions``'s user policy; docs/permissions.md).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.orm.user import User
from flplatform.permissions import ensure_allowed, ensure_readable
from flplatform.users import service


async def readable_user(requester: AuthenticatedRequester, user_id: uuid.UUID) -> User:
    user = await service.get_user(requester.session, user_id)
    await ensure_readable(requester, user, f"User {user_id}")
    return user


async def updatable_user(requester: AuthenticatedRequester, user_id: uuid.UUID) -> User:
    user = await service.get_user(requester.session, user_id)
    await ensure_allowed(requester, "update", user, f"user {user_id}")
    return user


async def deletable_user(requester: AuthenticatedRequester, user_id: uuid.UUID) -> User:
    user = await service.get_user(requester.session, user_id)
    await ensure_allowed(requester, "delete", user, f"user {user_id}")
    return user


ReadableUser = Annotated[User, Depends(readable_user)]
UpdatableUser = Annotated[User, Depends(updatable_user)]
DeletableUser = Annotated[User, Depends(deletable_user)]
