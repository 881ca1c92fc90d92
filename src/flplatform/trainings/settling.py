"""The close of a streamed round whose result must not depend on the arrival order: the round's
aggregator tracks the order (:attr:`~flplatform.aggregation.Aggregator.track_order`), and at the close
the few coordinates whose rounding another order could change are recomputed from the memory-mapped
updates in the participants' fixed order (:mod:`flplatform.aggregation.ordering`). Used by
:mod:`flplatform.trainings.folding` for rounds folded on arrival and at the close alike, so both give
the same bits."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flplatform import aggregation
from flplatform.aggregation import Aggregator
from flplatform.blobs import BlobNotFound, BlobStore
from flplatform.blobs.mapped import PageReleaser, mapped
from flplatform.kit import timeline
from flplatform.models.files import ModelFileError

log = logging.getLogger(__name__)

Rows = dict[uuid.UUID, tuple[str, int]]  # local model id -> (digest, sample size)


def new_aggregator(name: str, kwargs: Mapping[str, Any]) -> Aggregator:
    """The round's aggregator; a streamed float64 mean tracks what its result's independence of
    the arrival order needs (:attr:`Aggregator.track_order`, settled by :func:`finish`)."""
    agg = aggregation.get(name, **kwargs)
    agg.track_order = True  # only takes effect for streamed float64 means
    return agg


async def finish(
    agg: Aggregator, store: BlobStore, rows: Rows, order: Sequence[uuid.UUID]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``agg.finish()``, after recomputing in ``order`` (the participants' fixed order) the few
    coordinates whose rounding the arrival order could have changed: whatever order the updates
    were folded in, the result is bitwise the fixed order's (see :mod:`flplatform.aggregation.ordering`)."""
    redo = await asyncio.to_thread(agg.settle)
    timeline.mark("settled")
    if redo:
        for local in order:
            digest, size = rows[local]
            try:
                async with mapped(store, digest) as view:
                    await asyncio.to_thread(agg.redo, view, float(size), PageReleaser(view))
            except BlobNotFound:
                raise ModelFileError(
                    f"Local model {local}: its bytes are missing from the blob store."
                ) from None
        log.info("%d coordinate(s) recomputed in the participants' order", redo)
        timeline.mark("recomputed")
    result = await asyncio.to_thread(agg.finish)
    timeline.mark("finished")
    return result
