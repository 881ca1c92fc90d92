"""The market listing: published models (``billing_model_pricing.inference_public``) across
organisations, with what a buyer needs to call them. This is the one deliberate exposure of a
model beyond its organisation: name, description, input shape, methods, prices and the
publishing organisation's name — never weights, training data, owners' names or metrics."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from sqlalchemy import Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import NotFound
from flplatform.kit.pagination import paginate
from flplatform.orm import GlobalModel, MeanModel, ModelKind, SWAGModel
from flplatform.orm.billing import ModelPricing
from flplatform.orm.organizations import Collection
from flplatform.orm.training import UncertaintyMethod

Sort = Literal["name", "-name", "price", "-price", "published", "-published"]


def uncertainty_methods(model: GlobalModel) -> list[UncertaintyMethod]:
    methods = [UncertaintyMethod.NONE, UncertaintyMethod.MC_DROPOUT]
    if isinstance(model, MeanModel):
        methods.append(UncertaintyMethod.ENSEMBLE)
    elif isinstance(model, SWAGModel):
        methods.append(UncertaintyMethod.SWAG)
    return methods


def _published() -> Select[GlobalModel]:
    return (
        select(GlobalModel)
        .join(ModelPricing, ModelPricing.model_id == GlobalModel.id)
        .where(ModelPricing.inference_public.is_(True))
    )


async def list_market(
    session: AsyncSession,
    *,
    q: str | None = None,
    organization_id: uuid.UUID | None = None,
    method: UncertaintyMethod | None = None,
    max_price: int | None = None,
    copyable: bool | None = None,
    sort: Sort = "-published",
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """A page of published models and the total; ``q`` matches name or description
    (case-insensitive), ``method`` keeps models that support it, ``max_price`` caps the price per
    sample (minor units)."""
    stmt = _published()
    if q:
        pattern = f"%{q.lower()}%"
        stmt = stmt.where(
            or_(func.lower(GlobalModel.name).like(pattern), func.lower(GlobalModel.description).like(pattern))
        )
    if organization_id is not None:
        stmt = stmt.where(GlobalModel.organization_id == organization_id)
    if method is UncertaintyMethod.SWAG:
        stmt = stmt.where(GlobalModel.kind == ModelKind.SWAG.value)
    elif method is UncertaintyMethod.ENSEMBLE:
        stmt = stmt.where(GlobalModel.kind == ModelKind.MEAN.value)
    if max_price is not None:
        stmt = stmt.where(ModelPricing.inference_price_per_sample <= max_price)
    if copyable is not None:
        stmt = stmt.where(ModelPricing.copy_allowed.is_(copyable))
    column = {
        "name": GlobalModel.name,
        "price": ModelPricing.inference_price_per_sample,
        "published": ModelPricing.published_at,
    }[sort.lstrip("-")]
    order = column.desc() if sort.startswith("-") else column.asc()
    models, total = await paginate(
        session, stmt, order_by=(order, GlobalModel.id), limit=limit, offset=offset
    )
    return await _cards(session, models), total


async def _cards(session: AsyncSession, models: list[GlobalModel]) -> list[dict[str, Any]]:
    """The page's cards: pricing and organisation names in two queries, whatever the page size."""
    ids = [m.id for m in models]
    pricing = {
        p.model_id: p
        for p in (await session.scalars(select(ModelPricing).where(ModelPricing.model_id.in_(ids))))
    }
    org_ids = {m.organization_id for m in models if m.organization_id is not None}
    names = dict(
        (
            await session.execute(select(Collection.id, Collection.name).where(Collection.id.in_(org_ids)))
        ).all()
    )
    cards = []
    for model in models:
        price = pricing[model.id]
        cards.append(
            {
                "id": model.id,
                "name": model.name,
                "description": model.description,
                "type": model.kind.upper(),
                "input_shape": model.input_shape,
                "has_preprocessing": model.has_preprocessing,
                "round": model.round,
                "uncertainty_methods": uncertainty_methods(model),
                "price_per_sample": price.inference_price_per_sample,
                "copy_allowed": price.copy_allowed,
                "copy_price": price.copy_price,
                "organization_id": model.organization_id,
                "organization_name": names.get(model.organization_id) if model.organization_id else None,
                "published_at": price.published_at,
            }
        )
    return cards


async def market_card(session: AsyncSession, model_id: uuid.UUID) -> dict[str, Any]:
    """One published model's card; 404 when it is not on the market."""
    model = (await session.scalars(_published().where(GlobalModel.id == model_id))).first()
    if model is None:
        raise NotFound(f"Model {model_id} is not on the market.")
    return (await _cards(session, [model]))[0]
