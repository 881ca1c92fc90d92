"""The policy algebra (Kolibri's ``BasePermissions``, ``PermissionsFromAny/All``).

A ``Policy`` answers four booleans for one object and gives one SQL clause for lists. Policies
compose: ``a | b`` allows what either allows (booleans short-circuit, clauses are OR-ed) and
``a & b`` what both allow. ``true()``/``false()`` play the roles of Kolibri's ``~q_none``/``q_none``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, false, or_, true
from sqlalchemy.sql.elements import ColumnElement

from flplatform.permissions.requester import Requester

Clause = ColumnElement[bool]


class Policy:
    """Denies everything; subclasses allow what they should. ``model`` is the mapped class the
    ``readable`` clause is written against."""

    model: type[Any] | None = None

    async def can_create(self, requester: Requester, obj: Any) -> bool:
        return False

    async def can_read(self, requester: Requester, obj: Any) -> bool:
        return False

    async def can_update(self, requester: Requester, obj: Any) -> bool:
        return False

    async def can_delete(self, requester: Requester, obj: Any) -> bool:
        return False

    def readable(self, requester: Requester) -> Clause:
        return false()

    def __or__(self, other: Policy) -> Policy:
        return AnyOf(self, other)

    def __and__(self, other: Policy) -> Policy:
        return AllOf(self, other)


def _flatten(kind: type[_Combined], policies: tuple[Policy, ...]) -> list[Policy]:
    out: list[Policy] = []
    for policy in policies:
        out.extend(policy.policies if isinstance(policy, kind) else [policy])
    return out


class _Combined(Policy):
    def __init__(self, *policies: Policy):
        self.policies = _flatten(type(self), policies)
        models = {p.model for p in self.policies if p.model is not None}
        self.model = models.pop() if len(models) == 1 else None


class AnyOf(_Combined):
    """Allowed if any part allows; stops at the first that does."""

    async def _any(self, op: str, requester: Requester, obj: Any) -> bool:
        for policy in self.policies:
            if await getattr(policy, op)(requester, obj):
                return True
        return False

    async def can_create(self, requester: Requester, obj: Any) -> bool:
        return await self._any("can_create", requester, obj)

    async def can_read(self, requester: Requester, obj: Any) -> bool:
        return await self._any("can_read", requester, obj)

    async def can_update(self, requester: Requester, obj: Any) -> bool:
        return await self._any("can_update", requester, obj)

    async def can_delete(self, requester: Requester, obj: Any) -> bool:
        return await self._any("can_delete", requester, obj)

    def readable(self, requester: Requester) -> Clause:
        return or_(*(p.readable(requester) for p in self.policies))


class AllOf(_Combined):
    """Allowed only if every part allows; stops at the first that does not."""

    async def _all(self, op: str, requester: Requester, obj: Any) -> bool:
        for policy in self.policies:
            if not await getattr(policy, op)(requester, obj):
                return False
        return True

    async def can_create(self, requester: Requester, obj: Any) -> bool:
        return await self._all("can_create", requester, obj)

    async def can_read(self, requester: Requester, obj: Any) -> bool:
        return await self._all("can_read", requester, obj)

    async def can_update(self, requester: Requester, obj: Any) -> bool:
        return await self._all("can_update", requester, obj)

    async def can_delete(self, requester: Requester, obj: Any) -> bool:
        return await self._all("can_delete", requester, obj)

    def readable(self, requester: Requester) -> Clause:
        return and_(*(p.readable(requester) for p in self.policies))


class DenyAll(Policy):
    pass


class AllowAll(Policy):
    async def can_create(self, requester: Requester, obj: Any) -> bool:
        return True

    async def can_read(self, requester: Requester, obj: Any) -> bool:
        return True

    async def can_update(self, requester: Requester, obj: Any) -> bool:
        return True

    async def can_delete(self, requester: Requester, obj: Any) -> bool:
        return True

    def readable(self, requester: Requester) -> Clause:
        return true()


class Superuser(Policy):
    """Platform superusers may do anything (the user policy adds: except delete themselves)."""

    async def can_create(self, requester: Requester, obj: Any) -> bool:
        return requester.is_superuser

    async def can_read(self, requester: Requester, obj: Any) -> bool:
        return requester.is_superuser

    async def can_update(self, requester: Requester, obj: Any) -> bool:
        return requester.is_superuser

    async def can_delete(self, requester: Requester, obj: Any) -> bool:
        return requester.is_superuser

    def readable(self, requester: Requester) -> Clause:
        return true() if requester.is_superuser else false()
