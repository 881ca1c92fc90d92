"""The running weighted sum of the mean-based stages, and the record of one added update.

:class:`WeightedSum` keeps ``Σ coef_i · update_i`` in one flat buffer per dtype group and folds
several updates per pass over it (:func:`~flplatform.aggregation.kernels.fold_flat`); :class:`Update`
is what an aggregator keeps of an added update (its tensors per dtype group, weight, DP clipping
factor, and the wire bytes it views, if any).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .codec import FlatLayout, WireState
from .kernels import FOLD_CHUNK, accumulator_dtype, fold_chunk, fold_flat

Sources = dict[torch.dtype, "torch.Tensor | list[torch.Tensor]"]


@dataclass
class Update:
    """One added update: its tensors per dtype group (one flat view, or per-tensor 1-D views)."""

    sources: Sources
    weight: float
    clip: float  # DP clipping factor applied to floating groups (1.0 without DP)
    nbytes: int
    wire: bytes | None = None  # the immutable bytes every source views (decoded zero-copy), else None


class WeightedSum:
    """Running ``Σ coef_i · update_i`` over some dtype groups, in flat buffers.

    ``fold`` adds several updates per pass over the accumulator (see :func:`fold_flat`): memory
    traffic per update falls from 3 passes (read update, read + write accumulator) towards 1.
    Updates whose group is not one contiguous range go through ``torch._foreach_add_`` per tensor.
    Buffers start uninitialised (``fresh``): the first fold writes them instead of adding to zeros.
    """

    def __init__(
        self, layout: FlatLayout, dtypes: Iterable[torch.dtype], accumulate: torch.dtype, chunk: int
    ):
        self.layout = layout
        self.chunk = chunk
        self.acc: dict[torch.dtype, torch.Tensor] = {
            d: torch.empty(layout.numel[d], dtype=accumulator_dtype(d, accumulate)) for d in dtypes
        }
        self.fresh: set[torch.dtype] = set(self.acc)
        self.means: set[torch.dtype] = set()  # groups already divided by the total weight (see fold)
        self._acc_views: dict[torch.dtype, list[torch.Tensor]] = {}
        self._acc_chunks: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acc.values())

    def fold(
        self, items: list[tuple[Update, dict[torch.dtype, float]]], mean_scale: float | None = None
    ) -> None:
        """Add ``Σ coefs[dtype] · update.sources[dtype]`` for every group.

        ``mean_scale`` (1 / total weight) marks the round's last fold: floating groups summed in their
        own dtype whose updates are flat become the mean in the same pass (listed in ``means``) instead
        of being divided by another pass later.
        """
        for dtype, acc in self.acc.items():
            flat_sources: list[torch.Tensor] = []
            flat_coefs: list[float] = []
            # The mean's scale, when this group becomes the mean in this fold (else None).
            scale = mean_scale if dtype.is_floating_point and acc.dtype == dtype else None
            if scale is not None and any(
                not isinstance(update.sources[dtype], torch.Tensor) for update, _ in items
            ):
                scale = None
            for update, coefs in items:
                coef = coefs[dtype]
                if coef == 0.0:
                    continue
                source = update.sources[dtype]
                if isinstance(source, torch.Tensor):
                    flat_sources.append(source)
                    flat_coefs.append(coef if scale is None else coef * scale)
                else:
                    if dtype in self.fresh:
                        acc.zero_()
                        self.fresh.discard(dtype)
                    self._fold_tensors(dtype, acc, source, coef)
            if flat_sources:
                chunk = fold_chunk(acc.dtype)
                chunks = self._acc_chunks.get(dtype)
                if chunks is None:
                    chunks = self._acc_chunks[dtype] = acc.split(chunk)
                fresh = dtype in self.fresh
                fold_flat(
                    acc,
                    flat_sources,
                    flat_coefs,
                    chunk=chunk,
                    acc_chunks=chunks,
                    init=fresh,
                    acc_scale=None if fresh else scale,
                )
                self.fresh.discard(dtype)
                if scale is not None:
                    self.means.add(dtype)

    def _fold_tensors(
        self, dtype: torch.dtype, acc: torch.Tensor, tensors: list[torch.Tensor], coef: float
    ) -> None:
        views = self._acc_views.get(dtype)
        if views is None:
            views = self._acc_views[dtype] = self.layout.slot_views(acc, dtype)
        small_targets, small_sources = [], []
        for target, source in zip(views, tensors, strict=False):
            if source.numel() <= FOLD_CHUNK:
                small_targets.append(target)
                small_sources.append(source)
            else:
                fold_flat(target, [source], [coef])
        if small_targets:
            torch._foreach_add_(small_targets, small_sources, alpha=coef)

    def scale(self, factor: float) -> None:
        for dtype, buffer in self.acc.items():
            if dtype not in self.fresh:
                buffer.mul_(factor)

    def take(self) -> dict[torch.dtype, torch.Tensor]:
        """The sums (zeros for a group nothing was folded into); the object is empty afterwards."""
        for dtype in self.fresh:
            self.acc[dtype].zero_()
        acc, self.acc, self._acc_views, self._acc_chunks, self.fresh, self.means = (
            self.acc,
            {},
            {},
            {},
            set(),
            set(),
        )
        return acc


def wire_of(state_dict: Mapping[str, torch.Tensor], sources: Sources) -> bytes | None:
    """The bytes ``state_dict`` was decoded from (zero-copy) when every source still views them."""
    if not isinstance(state_dict, WireState) or state_dict.wire is None:
        return None
    address = state_dict.address
    for source in sources.values():
        tensors = [source] if isinstance(source, torch.Tensor) else source
        for tensor in tensors:
            if tensor.numel() and tensor.untyped_storage().data_ptr() != address:
                return None  # replaced or copied by the caller: not a view of the wire bytes
    return state_dict.wire
