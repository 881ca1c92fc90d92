"""One way to page a list: count the matching rows, then fetch one ordered page.

List routes take ``limit``/``offset`` query parameters (``kit.schemas.Limit``/``Offset``), answer a
JSON array and put the total in the ``X-Total-Count`` header; services build the filtered,
permission-scoped ``select`` and hand it here with its order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

Row = TypeVar("Row")


async def page(
    session: AsyncSession,
    statement: Select[Row],
    *,
    order_by: Sequence[Any],
    limit: int,
    offset: int,
) -> list[Row]:
    """The page ``[offset, offset + limit)`` of ``statement``'s rows in ``order_by`` order, without
    a total (for the few lists that report none)."""
    return list((await session.scalars(statement.order_by(*order_by).limit(limit).offset(offset))).all())


async def paginate(
    session: AsyncSession,
    statement: Select[Row],
    *,
    order_by: Sequence[Any],
    limit: int,
    offset: int,
) -> tuple[list[Row], int]:
    """The page ``[offset, offset + limit)`` of ``statement``'s rows in ``order_by`` order (give a
    unique column last, so pages never overlap), and the total count of its rows."""
    total = (await session.execute(select(func.count()).select_from(statement.subquery()))).scalar_one()
    rows = await page(session, statement, order_by=order_by, limit=limit, offset=offset)
    return rows, int(total)
