"""Order-independent rounding of a streamed weighted mean: the same bits whatever the arrival order.

A streamed mean adds ``w_i · x_i`` into an accumulator (float64 for floating groups) in the order
the updates arrive. Each term is rounded the same way wherever it comes (products are formed in the
accumulator's dtype: a float32 value times an integer sample size below 2**29 is even exact in
float64), so the only order dependence is the rounding of the additions. Any two summation orders
give sums within ``2(K+1)·u·Σ|w_i x_i|`` of each other (K terms, u the accumulator's unit roundoff;
the classic recursive-summation bound, Higham, *Accuracy and Stability of Numerical Algorithms*
§4.2, counting the products' own rounding), and their quotients by the total weight (the same number
in every order: :func:`math.fsum` of the weights) within that over the total plus ``3u·|q|``.

The result is the quotient rounded to the model's dtype (floats to nearest even, integers half to
even, booleans ``≥ 0.5``). Two orders can disagree only on a coordinate whose quotient lies within
that distance of a rounding boundary (a float midpoint, a half-integer, 0.5). :class:`OrderBound`
keeps a cheap bound of ``Σ|w_i x_i|`` per block of :data:`BLOCK` coordinates (``Σ w_i · max|x_i|``
over the block: 8 bytes per 64 coordinates); :func:`finalize_checked` forms the mean and lists the
coordinates it cannot vouch for; :class:`Redo` recomputes just those from the updates, read again in
the caller's fixed order. Every coordinate of the result is then the fixed-order computation's:
a listed one by construction, any other because no boundary lies between that computation and
the quotient at hand (both are within the bound of the exact sum). Exact zeros of a block that holds
other values are listed too (a cancellation may leave a tiny sum), so models with many exact zeros
next to nonzero values recompute more; typically a handful of coordinates per million are listed.

Most sums are exact, though, and an exact sum is the same in every order. A term ``w · x`` with an
integer weight ``1 ≤ w < 2**29`` and ``x`` of at most 24 significant bits (float32 and narrower,
integers) is a multiple of ``x``'s own spacing, which exceeds ``m · 2**-24`` for ``m`` the smallest
nonzero ``|x|`` of the block (over every update); so when ``Σ|w_i x_i| < 2**29 · m`` every partial
sum is a multiple of that spacing below ``2**53`` of it, exactly representable in float64. Such a
block's coordinates are never listed: :class:`OrderBound` also keeps ``m`` per block (a block with an
exact zero, a weight that is not such an integer, or a clipped update falls back to the bound).
Without this, updates that differ little (as clients' weights of one round do) listed 10–35 % of
the coordinates: sums of 8 float32 values in float64 are exact and their means land on float32
midpoints, which the bound alone cannot tell from near misses.

A group whose accumulator has the model's own dtype (float64 models) has no finer rounding to hide
the order in: it is recomputed whole.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import cast

import torch

from .codec import FlatLayout, chunk_ranges
from .kernels import RELEASE_BYTES, Release, as_dtype, release_range, run_in_order, run_pieces

#: Coordinates per bound block (a multiple divides every fold chunk).
BLOCK = 64
#: Slack on the error bound (covers the bound's own rounding and the comparisons').
SLACK = 1.01


def _unit(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


#: A block's float64 sums are exact when ``Σ|w_i x_i| < EXACT_RATIO · min|x|`` (see the module
#: docstring: ``2**29``, halved to cover the rounding of the bound's own float64 sum).
EXACT_RATIO = 2.0**28
#: Integer weights below this keep ``w · x`` exact in float64 for ``x`` of 24 significant bits.
EXACT_WEIGHT_LIMIT = 2.0**29

#: Sources whose values have at most 24 significant bits (and are exact in float64).
EXACT_SOURCES = frozenset(
    {torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8, torch.int16}
)

_abs_scratch = threading.local()  # per fold thread: |chunk| for the block reductions, by dtype


def _magnitude_buffer(dtype: torch.dtype, count: int) -> torch.Tensor:
    """This fold thread's buffer for ``count`` magnitudes (reused: a fresh temporary per chunk
    fragments the threads' malloc arenas, see :func:`finalize_checked`)."""
    held: dict[torch.dtype, torch.Tensor] = _abs_scratch.__dict__.setdefault("held", {})
    buffer = held.get(dtype)
    if buffer is None or buffer.numel() < count:
        buffer = held[dtype] = torch.empty(count, dtype=dtype)
    return buffer[:count]


def _block_range(
    flat: torch.Tensor, out: torch.Tensor, start: int, stop: int, low: torch.Tensor | None = None
) -> None:
    """:func:`_block_max` of ``flat[start:stop]`` alone (``start`` a multiple of :data:`BLOCK`,
    ``stop`` one too or the end of ``flat``), in the calling thread."""
    full = stop - (stop - start) % BLOCK
    if full > start:
        part = flat[start:full]
        wide = torch.float64 if not flat.is_floating_point() else flat.dtype
        magnitude = torch.abs(part.to(wide), out=_magnitude_buffer(wide, part.numel())).view(-1, BLOCK)
        out[start // BLOCK : full // BLOCK].copy_(magnitude.amax(1))
        if low is not None:
            floor = low[start // BLOCK : full // BLOCK]
            torch.minimum(floor, magnitude.amin(1), out=floor)
    if full < stop:  # the last, partial block
        tail = flat[full:stop].to(torch.float64).abs()
        out[full // BLOCK] = float(tail.max())
        if low is not None:
            low[full // BLOCK] = min(float(low[full // BLOCK]), float(tail.min()))


def _block_max(
    flat: torch.Tensor,
    out: torch.Tensor,
    chunk: int,
    release: Release | None = None,
    low: torch.Tensor | None = None,
) -> None:
    """``out[b] = max |flat[b·BLOCK : (b+1)·BLOCK]|`` (float64), and with ``low`` (a running minimum)
    ``low[b] = min(low[b], min |x| over the block)`` as well, chunk by chunk in the fold threads (an OpenMP team in the caller's thread
    stalls on a busy machine; see :mod:`.kernels`); ``release`` is called on each chunk of ``flat``
    once it is read."""
    n = flat.numel()
    full = n - n % BLOCK
    step = max(BLOCK, chunk - chunk % BLOCK)
    ranges = list(chunk_ranges(full, step))

    def run(lo: int, hi: int) -> None:
        for start, stop in ranges[lo:hi]:
            _block_range(flat, out, start, stop, low)
            release_range(release, flat, start, stop, ranges[lo][0])

    run_pieces(run, ranges)
    if full < n:
        _block_range(flat, out, full, n, low)
    release_range(release, flat, 0, n)  # once more, whole (see kernels.fold_flat)


class DeferredBound:
    """One update's share of an :class:`OrderBound`, taken by the fold itself: the fold reports
    each range of the update's flat sources right after adding it (:meth:`observer`), while it is
    in cache, instead of a pass of its own over the update before the fold; :meth:`complete` adds
    it to the bound once the fold is done (reading whatever the fold did not report)."""

    def __init__(self, order: OrderBound, sources: dict[torch.dtype, torch.Tensor], weight: float):
        self.order, self.weight = order, weight
        self.sources = {d: sources[d].reshape(-1) for d in order.bound}
        self.scratch = {d: torch.empty_like(b) for d, b in order.bound.items()}
        self.seen: dict[torch.dtype, list[int]] = {d: [] for d in order.bound}

    def observer(self, dtype: torch.dtype) -> Callable[[int, int], None] | None:
        if dtype not in self.scratch:
            return None
        source, out, seen = self.sources[dtype], self.scratch[dtype], self.seen[dtype]
        low, step = self.order.exact_floor(dtype), max(BLOCK, self.order.chunk - self.order.chunk % BLOCK)

        def observe(start: int, stop: int) -> None:
            if start % BLOCK == 0 and (stop % BLOCK == 0 or stop == source.numel()):
                for lo in range(start, stop, step):  # (bounded magnitude buffers: see _block_max)
                    _block_range(source, out, lo, min(stop, lo + step), low)
                seen.append(stop - start)  # (list.append: safe from several fold threads)

        return observe

    def complete(self) -> None:
        for dtype, bound in self.order.bound.items():
            source, scratch = self.sources[dtype], self.scratch[dtype]
            if sum(self.seen[dtype]) != source.numel():  # not folded through fold_flat (or not whole)
                _block_max(source, scratch, self.order.chunk, None, self.order.exact_floor(dtype))
            bound.add_(scratch, alpha=self.weight)
        self.scratch.clear()  # (the update may wait a little longer to be dropped)


class OrderBound:
    """``Σ w_i · max|x_i|`` per block of every summed group, the number of terms, and for the
    exactness test the smallest ``|x_i|`` per block over every term (see the module docstring)."""

    def __init__(self, layout: FlatLayout, dtypes: list[torch.dtype], chunk: int):
        self.layout = layout
        self.chunk = chunk
        self.bound = {d: torch.zeros(-(-layout.numel[d] // BLOCK), dtype=torch.float64) for d in dtypes}
        self.floor = {d: torch.full_like(b, math.inf) for d, b in self.bound.items() if d in EXACT_SOURCES}
        self.terms = 0
        self.exact_terms = True  # every weight an integer in [1, 2**29), no update clipped
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def add(
        self,
        sources: dict[torch.dtype, torch.Tensor | list[torch.Tensor]],
        weight: float,
        release: Release | None = None,
        *,
        unclipped: bool = True,
        defer: bool = False,
    ) -> DeferredBound | None:
        """Add one update's terms now, or with ``defer`` (flat sources only) return the
        :class:`DeferredBound` its fold takes them with."""
        self.terms += 1
        self.exact_terms = (
            self.exact_terms and unclipped and weight.is_integer() and 1 <= weight < EXACT_WEIGHT_LIMIT
        )
        if defer:
            return DeferredBound(self, cast(dict[torch.dtype, torch.Tensor], sources), weight)
        for dtype, bound in self.bound.items():
            source = sources[dtype]
            scratch = self._scratch.get(dtype)
            if scratch is None:
                scratch = self._scratch[dtype] = torch.empty_like(bound)
            floor = self.floor.get(dtype) if self.exact_terms else None
            if isinstance(source, torch.Tensor):
                _block_max(source.reshape(-1), scratch, self.chunk, release, floor)  # floor: in place
            else:  # separate tensors: each tensor's max over the blocks it touches (coarser, still a bound)
                scratch.zero_()
                for slot, tensor in zip(self.layout.groups[dtype], source, strict=True):
                    if not slot.numel:
                        continue
                    peak = float(tensor.reshape(-1).to(torch.float64).abs().max())
                    lo, hi = slot.offset // BLOCK, (slot.offset + slot.numel - 1) // BLOCK + 1
                    scratch[lo:hi].clamp_(min=peak)
                if floor is not None:
                    floor.zero_()  # no per-block minimum taken: no block is known exact
            bound.add_(scratch, alpha=weight)
        return None

    def exact_floor(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The smallest ``|x|`` per block over every term, where the exactness test applies."""
        return self.floor.get(dtype) if self.exact_terms else None

    def finalize(
        self, acc: torch.Tensor, divisor: float, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`finalize_checked` of group ``out_dtype``'s sum with this bound."""
        bound, floor = self.bound[out_dtype], self.exact_floor(out_dtype)
        return finalize_checked(acc, divisor, out_dtype, bound, self.terms, self.chunk, floor)

    def scale(self, factor: float) -> None:
        self.exact_terms = False  # the rescaled sums were rounded
        for bound in self.bound.values():
            bound.mul_(factor)


def _convert(part: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """A mean's values in the model dtype, as :func:`~.kernels.finalize_inplace` converts them."""
    if out_dtype == torch.bool:
        return part >= 0.5
    if not out_dtype.is_floating_point:
        info = torch.iinfo(out_dtype)
        return part.round().clamp_(info.min, info.max)
    return part


def finalize_checked(
    acc: torch.Tensor,
    divisor: float,
    out_dtype: torch.dtype,
    bound: torch.Tensor,
    terms: int,
    chunk: int,
    floor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``acc / divisor`` in ``out_dtype``, written into the accumulator's own memory as
    :func:`~.kernels.finalize_inplace` does, and the indices of the coordinates whose value another
    order of the sum could change (to recompute with :class:`Redo`), in one pass in the fold threads.

    Per block, the quotients of any two orders lie within ``(2(K+1) + 3)·u·A/divisor`` of each other
    (``A`` the block's bound of ``Σ|w_i x_i|``, which also bounds ``|acc|``; the ``3u`` covers the
    divisions). Rounding to the model's dtype is monotonic, so a coordinate is safe when both ends of
    that interval round to the same value. The ends are computed as ``acc · (1/divisor) ± Δ`` in one
    fused kernel each, converted on the store; ``Δ`` carries ``7u·A/divisor`` more to cover that
    product's and sum's own roundings. With ``floor`` (:meth:`OrderBound.exact_floor`), ``Δ`` is 0
    in the blocks whose sums are exact (``floor`` is overwritten).

    The result overwrites the accumulator's bytes (``out[i]`` lies over ``acc[i·o/a]``, o and a the
    item sizes), so the chunks are taken in increasing order by the fold threads, and a chunk writes
    its values once every chunk under them has been read: chunk ``[s, e)`` lies over accumulator
    coordinates ``[s·o/a, e·o/a)``, below ``s`` from the second chunk on (lower chunks: taken earlier,
    and their reads never wait); those were read long before but for the first chunks of the pass.
    Only a chunk's values are ever held apart, not a piece's of several chunks: the pieces' values
    together were a second copy of the model in its own dtype (68 MB for a 68 MB model, in the
    round's close), which glibc then kept until the next trim."""
    unit = _unit(acc.dtype)
    scale = SLACK * (2 * (terms + 1) + 3 + 7) * unit / divisor
    deltas = (bound * scale).to(acc.dtype)
    exact = None
    if floor is not None:  # blocks whose sums are exact: the same in every order, none listed
        exact = bound < floor.mul_(EXACT_RATIO)  # (the floor is spent: no temporary of its size)
        deltas.masked_fill_(exact, 0.0)
        if int(exact.sum()) * 4 < exact.numel() * 3:
            exact = None  # most blocks need the test: the whole-chunk kernels are then faster
    inverse = torch.tensor(1.0 / divisor, dtype=acc.dtype)
    out = acc if out_dtype == acc.dtype else as_dtype(acc, out_dtype)
    ratio = acc.element_size() // out.element_size()
    step = max(BLOCK, chunk - chunk % BLOCK)
    ranges = list(chunk_ranges(acc.numel(), step))
    read = [threading.Event() for _ in ranges]
    found: list[torch.Tensor] = []
    direct = out_dtype.is_floating_point

    scratch = threading.local()  # per fold thread: the chunk-sized buffers it reuses

    def buffers(count: int) -> list[torch.Tensor]:
        """This thread's chunk buffers, ``count`` elements long: ``wide`` (the accumulator's dtype:
        each end of the interval, then the mean), ``high`` and ``low`` (out_dtype), ``differ``
        (bool). Reused from chunk to chunk: a fresh temporary per chunk (also the one a kernel
        makes when it casts to its ``out=`` dtype), freed and then cut into by the small index
        tensors of ``found``, left the fold threads' arenas of glibc fragmented: ≈ 100 MB kept after
        the pass for a 68 MB model (measured), until the next trim."""
        held: list[torch.Tensor] | None = getattr(scratch, "held", None)
        if held is None or held[0].numel() < count:
            dtypes = (acc.dtype, out_dtype, out_dtype, torch.bool)
            held = scratch.held = [torch.empty(count, dtype=dtype) for dtype in dtypes]
        return [buffer[:count] for buffer in held]

    def ends(part: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if direct:  # the sum's rounding to out_dtype happens on the store
            wide, high, low = (b.view(part.shape) for b in buffers(part.numel())[:3])
            high.copy_(torch.addcmul(delta, part, inverse, out=wide))
            low.copy_(torch.addcmul(delta, part, inverse, value=-1.0, out=wide))
            low.neg_()  # -(Δ - acc/d) = acc/d - Δ, rounded as it (negation is exact)
            return high, low
        mean = part * inverse
        return _convert(mean + delta, out_dtype), _convert(mean - delta, out_dtype)

    def below(index: int) -> range:
        """The other chunks whose accumulator coordinates chunk ``index``'s values overwrite."""
        start, stop = ranges[index]
        first, covered = start // ratio, -(-stop // ratio)  # acc coordinates under out[start:stop]
        return range(first // step, min(index, -(-covered // step)))

    def piece(index: int) -> None:
        start, stop = ranges[index]
        try:
            mean = read_chunk(start, stop)
        finally:
            read[index].set()  # also on an error: no chunk waits forever
        if out is not acc:
            for other in below(index):
                read[other].wait()  # set long ago, but for the first chunks of the pass
        out[start:stop].copy_(mean)

    def read_chunk(start: int, stop: int) -> torch.Tensor:
        part = acc[start:stop]
        blocks = deltas[start // BLOCK : -(-stop // BLOCK)]
        if (stop - start) % BLOCK == 0:
            if exact is not None:
                listed_in_inexact_blocks(part, blocks, start)
                return mean_of(part, start, stop)
            high, low = ends(part.view(-1, BLOCK), blocks.view(-1, 1))
        else:  # the group's last, partial block
            high, low = ends(part, blocks.repeat_interleave(BLOCK)[: stop - start])
        if not torch.equal(high, low):
            if direct:
                differ = buffers(stop - start)[3].view(high.shape)
                torch.ne(high, low, out=differ)
            else:
                differ = torch.ne(high, low)
            found.append(differ.view(-1).nonzero().view(-1).add_(start))  # atomic append
        return mean_of(part, start, stop)

    def mean_of(part: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if direct:
            return torch.div(part, divisor, out=buffers(stop - start)[0])  # converted on the store
        return _convert(part / divisor, out_dtype)

    def listed_in_inexact_blocks(part: torch.Tensor, blocks: torch.Tensor, start: int) -> None:
        """The interval test on the blocks not known exact only (Δ ≠ 0, NaN included)."""
        rows = blocks.nonzero().view(-1)
        if not rows.numel():
            return
        values = part.view(-1, BLOCK).index_select(0, rows)
        high, low = ends(values, blocks.index_select(0, rows).view(-1, 1))
        differ = torch.ne(high, low).nonzero()
        if differ.numel():
            found.append(rows[differ[:, 0]].mul_(BLOCK).add_(differ[:, 1]).add_(start))  # atomic append

    def run(lo_index: int, hi_index: int) -> None:
        for index in range(lo_index, hi_index):
            piece(index)

    run_in_order(run, len(ranges))
    index = torch.sort(torch.cat(found)).values if found else torch.empty(0, dtype=torch.int64)
    return out, index


class Redo:
    """The listed coordinates of each group recomputed from the updates, in the order they are
    given (each term ``w · x`` in the accumulator's dtype, added to a running sum from zero)."""

    def __init__(self, layout: FlatLayout):
        self.layout = layout
        self.index: dict[torch.dtype, torch.Tensor | None] = {}  # None: the whole group
        self.sums: dict[torch.dtype, torch.Tensor] = {}
        self.added = 0

    def want(self, dtype: torch.dtype, index: torch.Tensor | None, acc_dtype: torch.dtype) -> None:
        count = self.layout.numel[dtype] if index is None else index.numel()
        if count:
            self.index[dtype] = index
            self.sums[dtype] = torch.zeros(count, dtype=acc_dtype)

    @property
    def count(self) -> int:
        return sum(s.numel() for s in self.sums.values())

    def add(
        self,
        sources: dict[torch.dtype, torch.Tensor | list[torch.Tensor]],
        weight: float,
        release: Release | None = None,
    ) -> None:
        """``release`` (optional) is called on each :data:`~.kernels.RELEASE_BYTES` of a flat source
        once its listed coordinates are read: the listed coordinates lie all over an update, so
        without it a mapped update's pages would all be resident at once."""
        self.added += 1
        for dtype, sums in self.sums.items():
            source = sources[dtype]
            flat = (
                source.reshape(-1)
                if isinstance(source, torch.Tensor)
                else torch.cat([t.reshape(-1) for t in source])
            )
            index = self.index[dtype]
            if index is None:
                sums.add_(flat.to(sums.dtype).mul_(weight))
                release_range(release, flat, 0, flat.numel())
                continue
            if release is None or not isinstance(source, torch.Tensor):
                sums.add_(flat.index_select(0, index).to(sums.dtype).mul_(weight))
                continue
            # The listed coordinates are sorted: read them a window of the source at a time, and drop
            # each window's pages once read (the values and their order of addition are unchanged).
            step = max(1, RELEASE_BYTES // flat.element_size())
            edges = torch.arange(0, flat.numel() + step, step, dtype=index.dtype).clamp_(max=flat.numel())
            cuts = torch.searchsorted(index, edges).tolist()
            for window, (lo, hi) in enumerate(zip(cuts, cuts[1:], strict=False)):
                if hi > lo:
                    part = flat.index_select(0, index[lo:hi]).to(sums.dtype).mul_(weight)
                    sums[lo:hi].add_(part)
                release_range(release, flat, int(edges[window]), int(edges[window + 1]))
            release_range(release, flat, 0, flat.numel())

    def apply(self, flats: dict[torch.dtype, torch.Tensor], divisor: float) -> None:
        """Write the recomputed means into the finalized groups (if any update was redone: else the
        finalized values, those of the arrival order, stay)."""
        if not self.added:
            return
        for dtype, sums in self.sums.items():
            values = _convert(sums.div_(divisor), dtype).to(dtype)
            index = self.index[dtype]
            if index is None:
                flats[dtype].copy_(values)
            else:
                flats[dtype].index_copy_(0, index, values)
