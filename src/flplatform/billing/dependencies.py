"""Who may see whose money: the billing routes' permission checks as FastAPI dependencies.

Personal billing data is personal: a user sees their own, superusers see and manage everyone's (no
organisation role reaches into a member's personal balance). An organisation's money is its
admins' (and superusers'): balance, operations, statements, bills, limits, audit log; a member
sees only their own spending of it. Billing on a model follows the model policy
(:mod:`flplatform.permissions`): its report and its market pricing belong to those who may update
the model. Everything refused here is a 404 where existence must not leak (operations, bills,
models) and a 403 where the caller named another user on purpose.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from flplatform.auth.dependencies import AuthenticatedRequester, CurrentUser
from flplatform.billing.bills import get_bill
from flplatform.billing.market import model_pricing
from flplatform.billing.operations import get_operation
from flplatform.db import SessionDep
from flplatform.errors import Forbidden, NotFound
from flplatform.kit.schemas import Limit, Offset, SafeDateTime
from flplatform.orm import Model
from flplatform.orm.billing import Bill, Operation, OperationKind
from flplatform.orm.organizations import Collection, CollectionKind
from flplatform.permissions import Requester, can_read, can_update, ensure_readable


def billing_subject(caller: CurrentUser, user_id: uuid.UUID | None = None) -> uuid.UUID:
    """Whose billing data a request reads: the caller's, or ``user_id``'s for superusers (403 for
    anyone else naming another user)."""
    if user_id is None or user_id == caller.id:
        return caller.id
    if not caller.is_superuser:
        raise Forbidden("You may only see your own billing data.")
    return user_id


BillableUserId = Annotated[uuid.UUID, Depends(billing_subject)]


@dataclass(frozen=True)
class OperationFilter:
    """The operation history a request may list: ``user_id`` None means everyone's (superusers)."""

    user_id: uuid.UUID | None
    kind: OperationKind | None
    model_id: uuid.UUID | None
    since: dt.datetime | None
    until: dt.datetime | None
    limit: int
    offset: int


def operation_filter(
    caller: CurrentUser,
    user_id: uuid.UUID | None = None,
    all: bool = False,
    kind: OperationKind | None = None,
    model_id: uuid.UUID | None = None,
    since: SafeDateTime | None = None,
    until: SafeDateTime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> OperationFilter:
    """The history's query parameters, scoped: ``all=true`` (everyone's) is for superusers only."""
    if all and not caller.is_superuser:
        raise Forbidden("Only superusers may list everyone's operations.")
    return OperationFilter(
        user_id=None if all else billing_subject(caller, user_id),
        kind=kind,
        model_id=model_id,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )


OperationQuery = Annotated[OperationFilter, Depends(operation_filter)]


async def visible_operation(session: SessionDep, caller: CurrentUser, operation_id: uuid.UUID) -> Operation:
    """An operation the caller paid, acted on or earned from, or that their organisation did when
    they are its admin (any, for superusers); 404 otherwise."""
    op = await get_operation(session, operation_id)
    if caller.is_superuser or caller.id in (op.payer_id, op.actor_id, op.model_owner_id):
        return op
    # An organisation's admins see what it paid, was credited or earned.
    org_id = caller.organization_id
    if org_id is not None and org_id in (op.organization_id, op.model_organization_id):
        organization = await session.get(Collection, org_id)
        if organization is not None and await can_update(await Requester.load(session, caller), organization):
            return op
    raise NotFound(f"Operation {operation_id} not found.")


VisibleOperation = Annotated[Operation, Depends(visible_operation)]


async def own_bill(session: SessionDep, caller: CurrentUser, bill_id: uuid.UUID) -> Bill:
    """A bill addressed to the caller (any, for superusers); 404 otherwise."""
    bill = await get_bill(session, bill_id)
    if bill.user_id != caller.id and not caller.is_superuser:
        raise NotFound(f"Bill {bill_id} not found.")
    return bill


OwnBill = Annotated[Bill, Depends(own_bill)]


async def managed_model(session: SessionDep, caller: CurrentUser, model_id: uuid.UUID) -> Model:
    """A model the caller may update under the model policy (its owner, the organisation's admins,
    superusers): its billing report and market pricing are theirs. 404 otherwise."""
    model = await session.get(Model, model_id)
    if model is None or not await can_update(await Requester.load(session, caller), model):
        raise NotFound(f"Model {model_id} not found.")
    return model


ManagedModel = Annotated[Model, Depends(managed_model)]


async def market_model(session: SessionDep, caller: CurrentUser, model_id: uuid.UUID) -> Model:
    """A model whose market pricing the caller may see: one they may read under the model policy,
    or any model its owner published on the inference market (the one deliberate exposure across
    organisations). 404 otherwise."""
    model = await session.get(Model, model_id)
    pricing = await model_pricing(session, model_id)
    published = pricing is not None and pricing.inference_public
    if model is None or not (published or await can_read(await Requester.load(session, caller), model)):
        raise NotFound(f"Model {model_id} not found.")
    return model


MarketModel = Annotated[Model, Depends(market_model)]


# ---------------------------------------------------------------------------- organisation money


async def readable_organization(requester: AuthenticatedRequester, organization_id: uuid.UUID) -> Collection:
    """The organisation if the caller can see it (its users, superusers), else 404 (the
    organisations package's own dependency, which billing cannot import: it would close a cycle)."""
    found = await requester.session.get(Collection, organization_id)
    if found is None or found.kind != CollectionKind.ORGANIZATION:
        raise NotFound(f"Organization {organization_id} not found.")
    await ensure_readable(requester, found, f"Organization {organization_id}")
    return found


ReadableOrganization = Annotated[Collection, Depends(readable_organization)]


async def _is_org_admin(requester: AuthenticatedRequester, organization: Collection) -> bool:
    return await can_update(requester, organization)


async def org_money_admin(
    requester: AuthenticatedRequester, organization: ReadableOrganization
) -> Collection:
    """An organisation whose money the caller manages (its admins, superusers): 404 when the
    caller cannot see the organisation, 403 for its other members."""
    if not await _is_org_admin(requester, organization):
        raise Forbidden("Only the organisation's admins see and manage its money.")
    return organization


OrgMoneyAdmin = Annotated[Collection, Depends(org_money_admin)]


@dataclass(frozen=True)
class OrgMember:
    """An organisation and one of its users whose spending the caller may see."""

    organization: Collection
    user_id: uuid.UUID


async def org_member_subject(
    requester: AuthenticatedRequester, organization: ReadableOrganization, user_id: uuid.UUID
) -> OrgMember:
    """A member's spending of the organisation's money: their own, or anyone's for its admins
    (403 for other members; the member must belong to the organisation, else 404)."""
    from flplatform.billing.organizations import organization_member

    caller = requester.user
    assert caller is not None
    if user_id != caller.id and not await _is_org_admin(requester, organization):
        raise Forbidden("Members see only their own spending; the organisation's admins see everyone's.")
    await organization_member(requester.session, organization.id, user_id)
    return OrgMember(organization, user_id)


OrgMemberSubject = Annotated[OrgMember, Depends(org_member_subject)]


@dataclass(frozen=True)
class OrgOperationFilter:
    organization: Collection
    user_id: uuid.UUID | None
    kind: OperationKind | None
    model_id: uuid.UUID | None
    since: dt.datetime | None
    until: dt.datetime | None
    limit: int
    offset: int


async def org_operation_filter(
    requester: AuthenticatedRequester,
    organization: ReadableOrganization,
    user_id: uuid.UUID | None = None,
    kind: OperationKind | None = None,
    model_id: uuid.UUID | None = None,
    since: SafeDateTime | None = None,
    until: SafeDateTime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> OrgOperationFilter:
    """The organisation's operations: all of them (filter by member with ``user_id``) for its
    admins; a member's own spending for the member (naming another member: 403)."""
    caller = requester.user
    assert caller is not None
    if not await _is_org_admin(requester, organization):
        if user_id not in (None, caller.id):
            raise Forbidden("Members see only their own spending; the organisation's admins see everyone's.")
        user_id = caller.id
    return OrgOperationFilter(organization, user_id, kind, model_id, since, until, limit, offset)


OrgOperationQuery = Annotated[OrgOperationFilter, Depends(org_operation_filter)]


async def org_bill(session: SessionDep, organization: OrgMoneyAdmin, bill_id: uuid.UUID) -> Bill:
    """A bill addressed to the organisation; 404 otherwise."""
    bill = await get_bill(session, bill_id)
    if bill.organization_id != organization.id:
        raise NotFound(f"Bill {bill_id} not found.")
    return bill


OrgBill = Annotated[Bill, Depends(org_bill)]
