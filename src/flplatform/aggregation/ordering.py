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

A group whose accumulator has the model's own dtype (float64 models) has no finer rounding to hide
the order in: it is recomputed whole.
"""

from __future__ import annotations

import threading

import torch

from .codec import FlatLayout, chunk_ranges
from .kernels import RELEASE_BYTES, Release, as_dtype, piece_bounds, release_range, run_in_order, run_pieces

#: Coordinates per bound block (a multiple divides every fold chunk).
BLOCK = 64
#: Slack on the error bound (covers the bound's own rounding and the comparisons').
SLACK = 1.01


def _unit(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def _block_max(flat: torch.Tensor, out: torch.Tensor, chunk: int, release: Release | None = None) -> None:
    """``out[b] = max |flat[b·BLOCK : (b+1)·BLOCK]|`` (float64), chunk by chunk in the fold threads
    (an OpenMP team in the caller's thread stalls on a busy machine; see :mod:`.kernels`); ``release``
    is called on each chunk of ``flat`` once it is read."""
    n = flat.numel()
    full = n - n % BLOCK
    step = max(BLOCK, chunk - chunk % BLOCK)
    ranges = list(chunk_ranges(full, step))

    def run(lo: int, hi: int) -> None:
        for start, stop in ranges[lo:hi]:
            part = flat[start:stop]
            if not part.is_floating_point():
                part = part.to(torch.float64)
            out[start // BLOCK : stop // BLOCK].copy_(part.view(-1, BLOCK).abs().amax(1))
            release_range(release, flat, start, stop, ranges[lo][0])

    run_pieces(run, ranges)
    if full < n:
        out[-1] = float(flat[full:].to(torch.float64).abs().max())
    release_range(release, flat, 0, n)  # once more, whole (see kernels.fold_flat)


class OrderBound:
    """``Σ w_i · max|x_i|`` per block of every summed group, and the number of terms."""

    def __init__(self, layout: FlatLayout, dtypes: list[torch.dtype], chunk: int):
        self.layout = layout
        self.chunk = chunk
        self.bound = {d: torch.zeros(-(-layout.numel[d] // BLOCK), dtype=torch.float64) for d in dtypes}
        self.terms = 0
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def add(
        self,
        sources: dict[torch.dtype, torch.Tensor | list[torch.Tensor]],
        weight: float,
        release: Release | None = None,
    ) -> None:
        self.terms += 1
        for dtype, bound in self.bound.items():
            source = sources[dtype]
            scratch = self._scratch.get(dtype)
            if scratch is None:
                scratch = self._scratch[dtype] = torch.empty_like(bound)
            if isinstance(source, torch.Tensor):
                _block_max(source.reshape(-1), scratch, self.chunk, release)
            else:  # separate tensors: each tensor's max over the blocks it touches (coarser, still a bound)
                scratch.zero_()
                for slot, tensor in zip(self.layout.groups[dtype], source, strict=True):
                    if not slot.numel:
                        continue
                    peak = float(tensor.reshape(-1).to(torch.float64).abs().max())
                    lo, hi = slot.offset // BLOCK, (slot.offset + slot.numel - 1) // BLOCK + 1
                    scratch[lo:hi].clamp_(min=peak)
            bound.add_(scratch, alpha=weight)

    def scale(self, factor: float) -> None:
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``acc / divisor`` in ``out_dtype``, written into the accumulator's own memory as
    :func:`~.kernels.finalize_inplace` does, and the indices of the coordinates whose value another
    order of the sum could change (to recompute with :class:`Redo`), in one pass in the fold threads.

    Per block, the quotients of any two orders lie within ``(2(K+1) + 3)·u·A/divisor`` of each other
    (``A`` the block's bound of ``Σ|w_i x_i|``, which also bounds ``|acc|``; the ``3u`` covers the
    divisions). Rounding to the model's dtype is monotonic, so a coordinate is safe when both ends of
    that interval round to the same value. The ends are computed as ``acc · (1/divisor) ± Δ`` in one
    fused kernel each, converted on the store; ``Δ`` carries ``7u·A/divisor`` more to cover that
    product's and sum's own roundings.

    The result overwrites the accumulator's bytes (``out[i]`` lies over ``acc[i·o/a]``, o and a the
    item sizes), so pieces run in parallel as follows: a piece converts its coordinates into a
    temporary, says it has read them, then waits until every piece whose coordinates its output
    covers has read them (lower pieces only: taken earlier, and their reads never wait) and copies."""
    unit = _unit(acc.dtype)
    scale = SLACK * (2 * (terms + 1) + 3 + 7) * unit / divisor
    deltas = (bound * scale).to(acc.dtype)
    inverse = torch.tensor(1.0 / divisor, dtype=acc.dtype)
    out = acc if out_dtype == acc.dtype else as_dtype(acc, out_dtype)
    ratio = acc.element_size() // out.element_size()
    step = max(BLOCK, chunk - chunk % BLOCK)
    ranges = list(chunk_ranges(acc.numel(), step))
    pieces = piece_bounds(len(ranges))
    starts = [ranges[b][0] if b < len(ranges) else acc.numel() for b in pieces]
    read = [threading.Event() for _ in range(len(pieces) - 1)]
    found: list[torch.Tensor] = []
    direct = out_dtype.is_floating_point

    def ends(part: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if direct:  # the sum's rounding to out_dtype happens on the store
            high = torch.empty(part.shape, dtype=out_dtype)
            low = torch.empty(part.shape, dtype=out_dtype)
            torch.addcmul(delta, part, inverse, out=high)
            torch.addcmul(delta, part, inverse, value=-1.0, out=low)
            low.neg_()  # -(Δ - acc/d) = acc/d - Δ, rounded as it (negation is exact)
            return high, low
        mean = part * inverse
        return _convert(mean + delta, out_dtype), _convert(mean - delta, out_dtype)

    def piece(index: int) -> None:
        lo, hi = starts[index], starts[index + 1]
        converted = torch.empty(hi - lo, dtype=out_dtype) if out is not acc else None
        try:
            read_piece(index, lo, converted)
        finally:
            read[index].set()  # also on an error: no piece waits forever
        if converted is not None:
            covered = -(-hi // ratio)  # acc coordinates under out[lo:hi] end before this
            for other in range(index):
                if starts[other] < covered:
                    read[other].wait()
            out[lo:hi].copy_(converted)

    def read_piece(index: int, lo: int, converted: torch.Tensor | None) -> None:
        for start, stop in ranges[pieces[index] : pieces[index + 1]]:
            part = acc[start:stop]
            blocks = deltas[start // BLOCK : -(-stop // BLOCK)]
            if (stop - start) % BLOCK == 0:
                high, low = ends(part.view(-1, BLOCK), blocks.view(-1, 1))
            else:  # the group's last, partial block
                high, low = ends(part, blocks.repeat_interleave(BLOCK)[: stop - start])
            if not torch.equal(high, low):
                found.append(torch.ne(high, low).view(-1).nonzero().view(-1).add_(start))  # atomic append
            mean = _convert(part / divisor, out_dtype)
            (out[start:stop] if converted is None else converted[start - lo : stop - lo]).copy_(mean)

    def run(lo_index: int, hi_index: int) -> None:
        for index in range(lo_index, hi_index):
            piece(index)

    run_in_order(run, len(pieces) - 1)
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
