"""Who may see whose money: the billing routes' permission checks as FastAPI dependencies.

Billing data is personal: a user sees their own, superusers see and manage everyone's (no
organisation role reaches into a member's balance). Billing on a model follows the model policy
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

from flplatform.auth.dependencies import CurrentUser
from flplatform.billing.bills import get_bill
from flplatform.billing.market import model_pricing
from flplatform.billing.operations import get_operation
from flplatform.db import SessionDep
from flplatform.errors import Forbidden, NotFound
from flplatform.kit.schemas import Limit, Offset, SafeDateTime
from flplatform.orm import Model
from flplatform.orm.billing import Bill, Operation, OperationKind
from flplatform.permissions import Requester, can_read, can_update


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
    """An operation the caller paid, acted on or earned from (any, for superusers); 404 otherwise."""
    op = await get_operation(session, operation_id)
    if not caller.is_superuser and caller.id not in (op.payer_id, op.actor_id, op.model_owner_id):
        raise NotFound(f"Operation {operation_id} not found.")
    return op


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
