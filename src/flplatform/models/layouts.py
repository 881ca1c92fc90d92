"""The tensor layout (names, dtypes, shapes) of a global model's weights, kept by blob digest.

An update is checked against the layout of the global model it was trained from. Reading that
layout from the weights means reading the whole archive, having the sandbox extract its state and
decoding it (about 3× the model in the server, each round); so the layout is stored once per
weights blob (table ``weights_layouts``, :class:`~flplatform.orm.WeightsLayout`) and kept in a
per-process cache by digest. A round's new global has its predecessor's layout (aggregation keeps
names, dtypes and shapes), which :func:`carry` records when it is written. A blob without a stored
layout (an uploaded model, or one from before this table) gets it computed from the weights on
first use, once, and stored (:func:`layout_of`). A global model uploaded as TorchScript gets its
layout at upload, from the model sandbox's check, with its archive's storage plan (which zip entry
holds which tensor, :mod:`flplatform.models.archive_weights`): nothing decodes it later for either.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import torch
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.models.files import ModelFileError, TensorSpec
from flplatform.orm import WeightsLayout

Layout = dict[str, TensorSpec]

_CACHE_SIZE = 256
_cache: OrderedDict[str, Layout] = OrderedDict()
_in_table: set[str] = set()  # digests whose row this process has read (committed rows)
_lock = threading.Lock()


def encode(layout: Mapping[str, TensorSpec]) -> dict[str, Any]:
    """JSON form: ``{name: [dtype, shape]}`` (``"float32"``, ``[64, 3]``)."""
    return {name: [str(s.dtype).removeprefix("torch."), list(s.shape)] for name, s in layout.items()}


def decode(data: Mapping[str, Any]) -> Layout:
    """The inverse of :func:`encode`; ``ModelFileError`` for a malformed row."""
    layout: Layout = {}
    try:
        for name, (dtype_name, shape) in data.items():
            dtype = getattr(torch, str(dtype_name), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {dtype_name!r}")
            layout[str(name)] = TensorSpec(tuple(int(d) for d in shape), dtype)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"The stored tensor layout is malformed ({exc}).") from None
    return layout


def cached(digest: str) -> Layout | None:
    with _lock:
        layout = _cache.get(digest)
        if layout is not None:
            _cache.move_to_end(digest)
        return layout


def _remember(digest: str, layout: Layout) -> None:
    with _lock:
        _cache[digest] = layout
        _cache.move_to_end(digest)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def forget_cache() -> None:
    """Empties this process's cache (tests)."""
    with _lock:
        _cache.clear()
        _in_table.clear()


def _insert(session: AsyncSession) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(WeightsLayout)


async def stored(session: AsyncSession, digest: str) -> Layout | None:
    """The layout of blob ``digest`` from the cache or the table; None when neither has it."""
    layout = cached(digest)
    if layout is not None:
        return layout
    data = (
        await session.execute(select(WeightsLayout.layout).where(WeightsLayout.digest == digest))
    ).scalar_one_or_none()
    if data is None:
        return None
    layout = decode(data)
    _remember(digest, layout)
    with _lock:
        _in_table.add(digest)
    return layout


async def record(
    session: AsyncSession,
    digest: str,
    layout: Mapping[str, TensorSpec],
    *,
    plan: Mapping[str, str] | None = None,
) -> None:
    """Stores the layout of blob ``digest`` (and a TorchScript archive's storage ``plan``) in the
    session's transaction (a row already there is kept: same content; it gains a plan it lacked).
    A digest is marked as stored only once a read saw its row (a committed one), so a rolled-back
    insert is written again by a later call."""
    _remember(digest, dict(layout))
    with _lock:
        if digest in _in_table and plan is None:
            return
    there = (
        await session.execute(
            select(WeightsLayout.storage_plan, WeightsLayout.digest).where(WeightsLayout.digest == digest)
        )
    ).one_or_none()
    if there is not None:
        if plan is not None and there.storage_plan is None:
            await session.execute(
                update(WeightsLayout).where(WeightsLayout.digest == digest).values(storage_plan=dict(plan))
            )
        with _lock:
            _in_table.add(digest)
        return
    await session.execute(
        _insert(session)
        .values(digest=digest, layout=encode(layout), storage_plan=dict(plan) if plan is not None else None)
        .on_conflict_do_nothing(index_elements=["digest"])
    )


async def stored_plan(session: AsyncSession, digest: str) -> dict[str, str] | None:
    """The storage plan stored with blob ``digest``'s layout; None when there is none."""
    plan = (
        await session.execute(select(WeightsLayout.storage_plan).where(WeightsLayout.digest == digest))
    ).scalar_one_or_none()
    if not isinstance(plan, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in plan.items()
    ):
        return None
    return dict(plan)


async def carry(session: AsyncSession, source: str | None, target: str) -> None:
    """Records for blob ``target`` the layout of blob ``source`` (a new global model and the one it
    was aggregated from); nothing when ``source``'s layout is not known."""
    if source is None or source == target:
        return
    layout = await stored(session, source)
    if layout is not None:
        # Not the plan: a new archive rebuilt in the sandbox may name its storages differently.
        await record(session, target, layout)


async def layout_of(
    session: AsyncSession,
    digest: str,
    compute: Callable[[], Awaitable[Mapping[str, TensorSpec]]],
    *,
    persist: bool = True,
) -> Layout:
    """The layout of blob ``digest``: stored, or ``compute()``-d from the weights and stored.
    ``persist=False`` only caches a computed layout (a request that must not take the database's
    write lock yet, e.g. before streaming a body on SQLite); a later ``persist=True`` call writes
    the row."""
    layout = await stored(session, digest)
    if layout is None:
        layout = dict(await compute())
        _remember(digest, layout)
    if persist:
        await record(session, digest, layout)
    return layout
