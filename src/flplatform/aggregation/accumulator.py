"""The running weighted sum of the mean-based stages, and the record of one added update.

:class:`WeightedSum` keeps ``Σ coef_i · update_i`` in one flat buffer per dtype group and folds
several updates per pass over it (:func:`~flplatform.aggregation.kernels.fold_flat`); :class:`Update`
is what an aggregator keeps of an added update (its tensors per dtype group, weight, DP clipping
factor, and the wire bytes it views, if any).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from .buffers import new_buffer
from .codec import FlatLayout, WireState, held_elsewhere
from .errors import UpdateValidationError
from .kernels import Release, accumulator_dtype, divide_checked, fold_chunk, fold_flat
from .segments import fold_inline, fold_segments, fold_whole, inline_pieces

if TYPE_CHECKING:
    from .ordering import DeferredBound

Sources = dict[torch.dtype, "torch.Tensor | list[torch.Tensor]"]

#: Tensors of a state dict up to this many elements are folded in their own shape: flattening costs
#: about a microsecond of Python per tensor and update, as much as folding a small tensor. Larger ones
#: are kept 1-D (cut into chunks by :func:`fold_segments`). At most the smallest fold chunk (float64
#: accumulator without inline kernels: 16384), so a tensor folded in its own shape is always whole.
SMALL_TENSOR = 1 << 14
#: A dtype group whose tensors are all small (≤ :data:`SMALL_TENSOR` elements) and whose accumulator
#: is at most this many bytes folds state dicts update by update in the caller's thread
#: (:func:`~flplatform.aggregation.kernels.fold_inline`): the accumulator stays in cache between
#: updates anyway, so passes of several updates save no memory traffic, only cost Python and thread
#: hand-offs. A plain ``add_`` loop over such a model is what it competes with.
INLINE_FOLD_BYTES = 8 << 20


class GatherPlan:
    """What :func:`gather_tensors` checks an update's tensors against, made once per layout.

    The checks run as C-level ``map`` loops over the update's tensors (≈ 0.2 µs per tensor instead of
    ≈ 0.5 µs for a Python loop that reads ``dtype`` and ``shape`` one at a time): what remains per
    update is one attribute read per tensor and property, which no cache can spare, since any tensor
    of a new state dict may differ from the model.
    """

    def __init__(self, layout: FlatLayout):
        slots = [slot for group in layout.groups.values() for slot in group]
        names = [slot.name for slot in slots]
        self.name_set = layout.name_set
        self.count = len(names)
        getter = operator.itemgetter(*names)
        # itemgetter of one key returns the value itself, of several a tuple
        self.get: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, ...]] = (
            getter if len(names) > 1 else lambda state: (getter(state),)
        )
        self.dtypes = [slot.dtype for slot in slots]
        self.shapes = [torch.Size(slot.shape) for slot in slots]
        self.groups: list[tuple[torch.dtype, int, int, list[int]]] = []  # dtype, first, stop, large ones
        start = 0
        for dtype, group in layout.groups.items():
            stop = start + len(group)
            large = [i for i, slot in enumerate(group) if slot.numel > SMALL_TENSOR]
            self.groups.append((dtype, start, stop, large))
            start = stop
        #: per group of two or more tensors with elements: the first two's names and their distance in
        #: bytes when the group lies back to back (see :meth:`apart`); the other groups are one flat
        #: range whenever their tensor is contiguous (:meth:`FlatLayout.flat_view`)
        self.pairs: dict[torch.dtype, tuple[str, str, int]] = {}
        for dtype, group in layout.groups.items():
            placed = [slot for slot in group if slot.numel]
            if len(placed) >= 2:
                step = (placed[1].offset - placed[0].offset) * dtype.itemsize
                self.pairs[dtype] = (placed[0].name, placed[1].name, step)

    def apart(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether in every group of several tensors the first two (of ``state``, not yet checked) lie
        apart in memory, so that :meth:`FlatLayout.flat_view` finds none of them one flat range: a
        cheap early answer for a caller's separate tensors."""
        for first_name, second_name, step in self.pairs.values():
            first, second = state[first_name], state[second_name]
            if not isinstance(first, torch.Tensor) or not isinstance(second, torch.Tensor):
                return False
            if second.data_ptr() == first.data_ptr() + step:
                return False
        return True


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


def _taken(plan: GatherPlan, state: object) -> tuple[torch.Tensor, ...] | None:
    """The update's values in layout order, unchecked; None unless its names are the model's."""
    if not isinstance(state, Mapping) or len(state) != plan.count or state.keys() != plan.name_set:
        return None
    return plan.get(state)


def _matches(
    plan: GatherPlan, tensors: tuple[torch.Tensor, ...], start: int = 0, stop: int | None = None
) -> bool:
    """Whether every value (of ``tensors``, or of its slots ``start:stop``) is a tensor of the model's
    dtype and shape (C-level loops, see :class:`GatherPlan`)."""
    if start or stop is not None:
        tensors = tensors[start:stop]
    return (
        all(map(isinstance, tensors, itertools.repeat(torch.Tensor)))
        and list(map(_DTYPE, tensors)) == plan.dtypes[start:stop]
        and list(map(_SHAPE, tensors)) == plan.shapes[start:stop]
    )


def _grouped(plan: GatherPlan, tensors: tuple[torch.Tensor, ...]) -> dict[torch.dtype, list[torch.Tensor]]:
    out: dict[torch.dtype, list[torch.Tensor]] = {}
    for dtype, start, stop, large in plan.groups:
        group = list(tensors[start:stop])
        for index in large:
            group[index] = group[index].reshape(-1)
        out[dtype] = group
    return out


def gather_tensors(
    plan: GatherPlan, state: Mapping[str, torch.Tensor]
) -> dict[torch.dtype, list[torch.Tensor]] | None:
    """The update's tensors per dtype group in layout order, checked in the same pass (names, dtypes,
    shapes) against ``plan`` (made once per round from the layout); None when they do not match
    (:meth:`FlatLayout.check` then says how). Tensors above :data:`SMALL_TENSOR` elements are
    flattened, smaller ones kept in their shape."""
    tensors = _taken(plan, state)
    if tensors is None or not _matches(plan, tensors):
        return None
    return _grouped(plan, tensors)


def unchecked_inline_sources(
    plan: GatherPlan, weighted_sum: WeightedSum, state: object
) -> tuple[Sources, Callable[[], None]] | None:
    """For a caller that discards the round if the update turns out bad (see ``Aggregator.add``): the
    sources of a small model's update that folds inline, *before* its dtypes and shapes are checked,
    and that check (raises :class:`UpdateValidationError`), to run beside the fold
    (:func:`~.segments.fold_inline`). None where the update would not fold inline (names not the
    model's, a group that may be one flat range, a group too large): the caller then checks first."""
    if not isinstance(state, Mapping) or not plan.pairs or not weighted_sum.inline.issuperset(plan.pairs):
        return None
    layout = weighted_sum.layout
    tensors = _taken(plan, state)
    if tensors is None or not plan.apart(state):
        return None  # (a group perhaps one flat range folds as a flat view: other kernels, other bits)
    sources: Sources = {}
    for dtype, start, stop, _ in plan.groups:
        if dtype in plan.pairs:
            sources[dtype] = list(tensors[start:stop])  # all small (inline): none to flatten
            continue
        # A group of one tensor (or none with elements) is a flat view, as gather_tensors' caller
        # makes it: checked now (one tensor), the fold then gives the bits of the checked path.
        view = layout.flat_view(state, dtype) if _matches(plan, tensors, start, stop) else None
        if view is None:
            return None
        sources[dtype] = view

    def check() -> None:
        if not _matches(plan, tensors):
            layout.check(state)  # raises, saying what differs
            raise UpdateValidationError("the update does not match the model")

    return sources, check


def fold_views(layout: FlatLayout, flat: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Views of a group's flat buffer per slot, shaped as :func:`gather_tensors` shapes an update's."""
    return [
        flat[s.offset : s.offset + s.numel]
        if s.numel > SMALL_TENSOR
        else flat[s.offset : s.offset + s.numel].view(s.shape)
        for s in layout.groups[dtype]
    ]


@dataclass
class Update:
    """One added update: its tensors per dtype group (one flat view, or per-tensor 1-D views)."""

    sources: Sources
    weight: float
    clip: float  # DP clipping factor applied to floating groups (1.0 without DP)
    nbytes: int
    wire: bytes | None = None  # the immutable bytes every source views (decoded zero-copy), else None
    release: Release | None = None  # called on the flat sources' bytes as they are folded
    stable: bool = False  # the caller keeps the bytes unchanged and alive until they are folded
    bound: DeferredBound | None = None  # its share of the order bound, taken as it is folded


def owned_pending_bytes(pending: list[Update]) -> int:
    """Bytes of pending updates that only the aggregator keeps alive.

    A pending update decoded zero-copy from ``bytes`` that someone else keeps in memory anyway (the
    server's upload buffers, a list of blobs) costs nothing to hold, so such updates wait until
    ``max_fold`` of them fold in one pass over the accumulator. The newest update always counts (its
    caller still holds it during ``add``), and one whose bytes the caller has let go counts from
    the next ``add`` on: a stream of freshly received or loaded updates keeps the 2-model bound.
    """
    if not pending:
        return 0
    holders = Counter(id(u.wire) for u in pending if u.wire is not None)
    newest = pending[-1]
    return sum(
        u.nbytes
        for u in pending
        if not u.stable and (u is newest or u.wire is None or not held_elsewhere(u.wire, holders[id(u.wire)]))
    )


class WeightedSum:
    """Running ``Σ coef_i · update_i`` over some dtype groups, in flat buffers.

    ``fold`` adds several updates per pass over the accumulator (see :func:`fold_flat`): memory
    traffic per update falls from 3 passes (read update, read + write accumulator) towards 1.
    Updates whose group is not one contiguous range (separate tensors) are folded the same way, slot
    by slot (:func:`fold_segments`), several updates per pass too; in a small group (``inline``, see
    :data:`INLINE_FOLD_BYTES`) in the caller's thread (:func:`fold_inline`).
    Buffers start uninitialised (``fresh``): the first fold writes them instead of adding to zeros.
    """

    def __init__(
        self, layout: FlatLayout, dtypes: Iterable[torch.dtype], accumulate: torch.dtype, chunk: int
    ):
        self.layout = layout
        self.chunk = chunk
        self.acc: dict[torch.dtype, torch.Tensor] = {
            d: new_buffer(layout.numel[d], accumulator_dtype(d, accumulate)) for d in dtypes
        }
        self.fresh: set[torch.dtype] = set(self.acc)
        self.means: set[torch.dtype] = set()  # groups already divided by the total weight (see fold)
        #: groups of ``means`` whose values were proven finite as they were divided (their sum, read
        #: in cache right after the division, is finite): ``finish`` skips its finiteness pass on them
        self.finite: set[torch.dtype] = set()
        #: groups whose last fold ran whole-tensor kernels (torch's threads): divided by those too
        self.whole: set[torch.dtype] = set()
        self._acc_views: dict[torch.dtype, list[torch.Tensor]] = {}
        self.shaped: dict[torch.dtype, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # see take()
        self._inline_bounds: dict[torch.dtype, list[int]] = {}  # fold_inline's pieces of _acc_views
        self._acc_chunks: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}
        #: groups that fold separate tensors inline (see INLINE_FOLD_BYTES)
        self.inline: frozenset[torch.dtype] = frozenset(
            d
            for d, acc in self.acc.items()
            if acc.numel() * acc.element_size() <= INLINE_FOLD_BYTES
            and all(slot.numel <= SMALL_TENSOR for slot in layout.groups[d])
        )

    def folds_inline(self, sources: Sources) -> bool:
        """Whether an update of these sources folds inline in every group (separate small tensors)."""
        return all(dtype in self.inline and isinstance(sources[dtype], list) for dtype in self.acc)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acc.values())

    def fold(
        self,
        items: list[tuple[Update, dict[torch.dtype, float]]],
        total: float | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        """Add ``Σ coefs[dtype] · update.sources[dtype]`` for every group.

        ``total`` (the total weight) marks the round's last fold: floating groups summed in their own
        dtype become the mean in the same pass (listed in ``means``): each slice of the accumulator is
        divided by ``total`` right after its sources are added, while in cache (the very values of
        dividing afterwards, without another pass), and summed there too: a finite sum lists the
        group in ``finite``. ``check``: the check of an update folded inline before it was checked
        (:func:`unchecked_inline_sources`), run beside the fold of its largest group, which goes first.
        """
        groups = list(self.acc.items())
        if check is not None:
            groups.sort(key=lambda group: -group[1].numel() * group[1].element_size())
        for dtype, acc in groups:
            # The total to divide by, when this group becomes the mean in this fold (else None).
            divisor = total if dtype.is_floating_point and acc.dtype == dtype else None
            active = [(update.sources[dtype], coefs[dtype]) for update, coefs in items if coefs[dtype] != 0.0]
            if not active:
                continue
            sources = [source for source, _ in active]
            fresh = dtype in self.fresh
            if all(isinstance(source, torch.Tensor) for source in sources):
                chunk = fold_chunk(acc.dtype)
                chunks = self._acc_chunks.get(dtype)
                if chunks is None:
                    chunks = self._acc_chunks[dtype] = acc.split(chunk)
                checked = fold_flat(
                    acc,
                    cast(list[torch.Tensor], sources),
                    [coef for _, coef in active],
                    chunk=chunk,
                    acc_chunks=chunks,
                    init=fresh,
                    divisor=divisor,
                    releases=[update.release for update, coefs in items if coefs[dtype] != 0.0],
                    observers=[
                        update.bound.observer(dtype) if update.bound is not None else None
                        for update, coefs in items
                        if coefs[dtype] != 0.0
                    ],
                )
                self.whole.discard(dtype)
            else:
                # Separate tensors (a caller's state dicts), possibly next to flat updates: every
                # update of the fold is added per slot while the slot's slice is in cache.
                targets = self._acc_views.get(dtype)
                if targets is None:
                    targets = self._acc_views[dtype] = fold_views(self.layout, acc, dtype)
                per_slot = [
                    fold_views(self.layout, source, dtype) if isinstance(source, torch.Tensor) else source
                    for source in sources
                ]
                coefs = [coef for _, coef in active]
                if len(sources) == 1 and dtype not in self.inline and divisor is None:
                    # One update per pass (a stream of a caller's state dicts): whole-tensor kernels
                    # in the caller's thread, what a plain loop runs (torch's threads split each).
                    fold_whole(targets, per_slot[0], coefs[0], init=fresh)
                    checked = None
                    self.whole.add(dtype)
                else:
                    if dtype in self.inline and len(sources) == 1:
                        bounds = self._inline_bounds.get(dtype)
                        if bounds is None:
                            bounds = self._inline_bounds[dtype] = inline_pieces(targets)
                        checked = fold_inline(
                            targets, per_slot, coefs, fresh, divisor, flat=acc, bounds=bounds, check=check
                        )
                        check = None
                    else:
                        checked = fold_segments(
                            targets, per_slot, coefs, init=fresh, divisor=divisor, flat=acc
                        )
                    self.whole.discard(dtype)
            self.fresh.discard(dtype)
            if divisor is not None:
                self.means.add(dtype)
                if checked is not None and math.isfinite(checked):
                    self.finite.add(dtype)
        if check is not None:
            check()  # (no group folded inline: unreachable for unchecked_inline_sources' updates)
        for update, _ in items:
            if update.bound is not None:  # its order-bound share, taken as it was folded
                update.bound.complete()

    def divide(self, total: float, chunk: int) -> None:
        """Make every group summed in its own floating dtype that no fold divided yet the mean (listed
        in ``means``), summed in the same read (``finite`` when the sum is): the division :meth:`fold`
        fuses into a round's last fold, for groups that fold did not reach (a small model folded update
        by update as added, or a stream's last pass taken with its last update). Division is correctly
        rounded: the very values of dividing in the fold."""
        for dtype, acc in self.acc.items():
            if dtype.is_floating_point and acc.dtype == dtype and dtype not in self.fresh | self.means:
                self.means.add(dtype)
                if divide_checked(acc, total, chunk, threads=dtype not in self.whole):
                    self.finite.add(dtype)

    def scale(self, factor: float) -> None:
        for dtype, buffer in self.acc.items():
            if dtype not in self.fresh:
                buffer.mul_(factor)

    def take(self) -> dict[torch.dtype, torch.Tensor]:
        """The sums (zeros for a group nothing was folded into); the object is empty afterwards, but
        for ``shaped``: per inline group, its buffer and the views of it shaped as the model's tensors
        (made for the folds; a result in that buffer reuses them instead of making its own)."""
        for dtype in self.fresh:
            self.acc[dtype].zero_()
        self.shaped = {d: (self.acc[d], views) for d, views in self._acc_views.items() if d in self.inline}
        acc, self.acc, self._acc_views, self._acc_chunks, self.fresh, self.means, self.finite = (
            self.acc,
            {},
            {},
            {},
            set(),
            set(),
            set(),
        )
        self.whole, self._inline_bounds = set(), {}
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
