"""Folding stored updates into an aggregator: each read as a zero-copy view of its memory-mapped
blob (:func:`flplatform.blobs.mapped.mapped`), its pages dropped behind the fold as it is read
(:class:`~flplatform.blobs.mapped.PageReleaser`); several waiting updates in one pass over the
running sum (:func:`fold_blobs`). Used by :mod:`~flplatform.trainings.folding`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from flplatform.aggregation import Aggregator
from flplatform.blobs import BlobNotFound, BlobStore
from flplatform.blobs.mapped import PageReleaser, mapped
from flplatform.models.files import ModelFileError

#: Updates waiting to be folded (uploads that committed together, a close) fold this many per pass
#: over the running sum: the float64 sum (2× the model) is read and written once per pass.
FOLD_PASS_UPDATES = 4


async def fold_blob(agg: Aggregator, store: BlobStore, digest: str, weight: float, what: str) -> None:
    """Add one stored update to ``agg`` as a zero-copy view of its memory-mapped blob; folded at once
    unless the aggregator keeps every update (then the mapping stays while it does). A folded
    update's pages are dropped behind the fold as it reads them (:class:`PageReleaser`)."""
    try:
        async with mapped(store, digest) as view:
            await asyncio.to_thread(_add, agg, view, weight)
    except BlobNotFound:
        raise ModelFileError(f"{what}: its bytes are missing from the blob store.") from None


def _add(agg: Aggregator, view: memoryview, weight: float) -> None:
    agg.add(view, weight, release=None if agg.collects else PageReleaser(view))
    if not agg.collects:
        agg.fold_pending()


async def fold_blobs(agg: Aggregator, store: BlobStore, items: Sequence[tuple[str, float, str]]) -> None:
    """:func:`fold_blob` for several stored updates (digest, weight, what) in one pass over the
    running sum: their blobs are mapped together and added as ``stable`` (immutable files, mapped
    until the pass ends), so the float64 sum is read and written once for all of them."""
    if agg.collects or len(items) == 1:
        for digest, weight, what in items:
            await fold_blob(agg, store, digest, weight, what)
        return
    async with contextlib.AsyncExitStack() as stack:
        views: list[tuple[memoryview, float]] = []
        for digest, weight, what in items:
            try:
                views.append((await stack.enter_async_context(mapped(store, digest)), weight))
            except BlobNotFound:
                raise ModelFileError(f"{what}: its bytes are missing from the blob store.") from None
        await asyncio.to_thread(_add_stable, agg, views)


def _add_stable(agg: Aggregator, views: list[tuple[memoryview, float]]) -> None:
    for view, weight in views:
        agg.add(view, weight, release=PageReleaser(view), stable=True)
    agg.fold_pending()
