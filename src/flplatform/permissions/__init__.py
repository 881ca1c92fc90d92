"""One policy layer for every resource (Kolibri's auth permissions, in SQLAlchemy 2.0).

Public API — what routers and other domains call:

* ``Requester``: the caller with their roles and memberships, loaded once per request (one
  indexed query) by the FastAPI dependencies ``auth.dependencies.RequesterDep`` and
  ``AuthenticatedRequester``.
* ``await can_create/can_read/can_update/can_delete(requester, obj)`` → bool, and
  ``readable(requester, Model)`` → a SQLAlchemy boolean clause for ``select(Model).where(...)``;
  both come from the policy registered for ``type(obj)``/``Model`` and always agree
  (property-tested). Clauses compose with ``|``/``&`` (``or_``/``and_``), e.g.
  ``readable(r, Training) | (Training.id == some_id)``.
* ``await ensure_readable(requester, obj, "Model …")`` raises 404 when the caller may not see
  ``obj``; ``await ensure_allowed(requester, "update"|"delete", obj, label)`` raises 404 when it is
  invisible and 403 when visible but not allowed (Kolibri: lists filter, writes refuse).
* ``await has_role_for_user(requester, kinds, user)`` and ``users_without_role(requester, kinds,
  users)`` (one query for many users), ``requester.has_role_for_collection(kinds, collection)``.
* ``await refused_self_edits(requester, user, fields)``: the fields the organisation's
  ``members_can_edit_*`` switches stop a member from changing on their own user.
* ``register(Model, policy)`` to add a resource kind; ``Policy``, ``AnyOf``, ``AllOf``,
  ``Superuser``, ``AllowAll``, ``DenyAll`` to build one.

Models, trainings, metrics and broker topics are registered from
``flplatform.permissions.resources`` (tenant column ``organization_id`` on each row);
``await ensure_visible(requester, obj, label, dlr_message)`` is their 404 (403 between users of
the organisation-less DLR space, as the reference answered).

For other domains (billing accounts): give the table an ``organization_id``
(FK ``collections.id``) and an owner column, write a ``Policy`` subclass whose ``readable``
returns e.g. ``and_(Topic.organization_id == r.organization_id, or_(Topic.owner_id == r.id,
has_org_role_clause(r)))`` and whose booleans test the same on the object, register it with
``register(Topic, Superuser() | TopicRules())``, then filter list queries with
``readable(r, Topic)`` and guard single objects with ``ensure_readable``/``ensure_allowed``.
Building blocks for clauses are in ``flplatform.permissions.organizations``
(``role_collections``, ``has_role_clause``, ``has_org_role_clause``, ``managed_collections``).

The permission table is in docs/permissions.md.
"""

from __future__ import annotations

from typing import Any, Literal

from flplatform.errors import Forbidden, NotFound
from flplatform.orm.broker import BrokerTopic
from flplatform.orm.metric import Metric
from flplatform.orm.model import Model
from flplatform.orm.organizations import (
    Collection,
    Invitation,
    Membership,
    OrganizationSettings,
    Role,
    RoleKind,
)
from flplatform.orm.training import Training
from flplatform.orm.user import User
from flplatform.permissions.base import AllOf, AllowAll, AnyOf, Clause, DenyAll, Policy, Superuser
from flplatform.permissions.organizations import (
    COLLECTION_POLICY,
    INVITATION_POLICY,
    MEMBERSHIP_POLICY,
    ROLE_POLICY,
    SETTINGS_POLICY,
    USER_POLICY,
    MembershipDraft,
    RoleDraft,
    has_role_for_user,
    refused_self_edits,
    users_without_role,
)
from flplatform.permissions.requester import ANY_ROLE, Requester
from flplatform.permissions.resources import (
    METRIC_POLICY,
    MODEL_POLICY,
    TOPIC_POLICY,
    TRAINING_POLICY,
    refusal,
)

_REGISTRY: dict[type[Any], Policy] = {}


def register(model: type[Any], policy: Policy) -> None:
    """Make ``policy`` decide for ``model`` and its subclasses (drafts included)."""
    _REGISTRY[model] = policy


def policy_for(obj_or_model: Any) -> Policy:
    cls = obj_or_model if isinstance(obj_or_model, type) else type(obj_or_model)
    for klass in cls.__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    raise LookupError(f"no permission policy registered for {cls.__name__}")


async def can_create(requester: Requester, obj: Any) -> bool:
    return await policy_for(obj).can_create(requester, obj)


async def can_read(requester: Requester, obj: Any) -> bool:
    return await policy_for(obj).can_read(requester, obj)


async def can_update(requester: Requester, obj: Any) -> bool:
    return await policy_for(obj).can_update(requester, obj)


async def can_delete(requester: Requester, obj: Any) -> bool:
    return await policy_for(obj).can_delete(requester, obj)


def readable(requester: Requester, model: type[Any]) -> Clause:
    return policy_for(model).readable(requester)


async def ensure_readable(requester: Requester, obj: Any, label: str) -> None:
    """404 (not 403) for what the caller may not see: existence is not revealed across tenants."""
    if obj is None or not await can_read(requester, obj):
        raise NotFound(f"{label} not found.")


Action = Literal["create", "update", "delete"]


async def ensure_allowed(requester: Requester, action: Action, obj: Any, label: str) -> None:
    """404 when the caller cannot see ``obj``, 403 when they see it but may not ``action`` it."""
    if action != "create":
        await ensure_readable(requester, obj, label)
    allowed = await {"create": can_create, "update": can_update, "delete": can_delete}[action](requester, obj)
    if not allowed:
        raise Forbidden(f"You may not {action} {label}.")


register(Collection, COLLECTION_POLICY)
register(OrganizationSettings, SETTINGS_POLICY)
register(Membership, MEMBERSHIP_POLICY)
register(MembershipDraft, MEMBERSHIP_POLICY)
register(Role, ROLE_POLICY)
register(RoleDraft, ROLE_POLICY)
register(Invitation, INVITATION_POLICY)
register(User, USER_POLICY)
register(Model, MODEL_POLICY)
register(Training, TRAINING_POLICY)
register(Metric, METRIC_POLICY)
register(BrokerTopic, TOPIC_POLICY)


async def ensure_visible(requester: Requester, obj: Any, label: str, dlr_message: str | None) -> None:
    """Like ``ensure_readable`` for tenant-owned resources (models, trainings, topics): 404, except
    between users of the organisation-less DLR space, who get the reference's 403 with
    ``dlr_message`` — or, with ``dlr_message=None`` (writes), pass on to the write's own rule,
    which answers the reference's 403."""
    if obj is None:
        raise NotFound(f"{label} not found.")
    if await can_read(requester, obj):
        return
    if dlr_message is None and requester.is_unorganised and obj.organization_id is None:
        return
    raise refusal(requester, obj.organization_id, label, dlr_message or f"You may not read {label}.")


__all__ = [
    "ANY_ROLE",
    "AllOf",
    "AllowAll",
    "AnyOf",
    "Action",
    "Clause",
    "DenyAll",
    "MembershipDraft",
    "Policy",
    "Requester",
    "RoleDraft",
    "RoleKind",
    "Superuser",
    "can_create",
    "can_delete",
    "can_read",
    "can_update",
    "ensure_allowed",
    "ensure_readable",
    "ensure_visible",
    "has_role_for_user",
    "policy_for",
    "readable",
    "refused_self_edits",
    "register",
    "users_without_role",
]
