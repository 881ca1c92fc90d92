"""Folds of state dicts whose tensors lie apart in memory (a caller's own tensors).

:func:`fold_segments` adds several updates per pass over the accumulator, in batches of about
:data:`SEGMENT_BATCH_BYTES` taken by the fold threads (:mod:`.kernels`); :func:`fold_inline` folds a
small model update by update in the caller's thread. Per element both compute what a plain loop does (``acc = w₀·x₀``, ``acc.add_(x, alpha=w)`` per update in
order, ``div_``), so they give the same values. With a ``divisor`` (a round's last fold) both return
the sum of the mean's values, read while they are in cache: a finite sum proves every value finite
(see :func:`~.kernels.all_finite`), which spares the separate finiteness pass over the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .kernels import (
    PIECES_PER_WORKER,
    _fold_workers,
    _openmp_runtime,
    _run_pieces,
    fold_chunk,
    run_beside,
    scaled_into,
)

#: Bytes of accumulator per batch of :func:`fold_segments` (state dicts of separate tensors): every
#: update is added to a batch with one ``torch._foreach_add_`` call, whose cost (Python, the GIL taken
#: back, one ATen call per tensor) is paid per batch and update. 2 MiB batches fold 20 × 10 × 1M
#: float32 ≈ 15 % faster than 512 KiB ones (measured interleaved): past a core's L2 the batch stays
#: in the shared L3, which adds little to reading the updates from memory.
SEGMENT_BATCH_BYTES = 2 << 20


def segment_chunk(dtype: torch.dtype) -> int:
    """Coordinates of accumulator per batch of :func:`fold_segments` for an accumulator of ``dtype``:
    :data:`SEGMENT_BATCH_BYTES` with fold threads that run kernels inline, else :func:`fold_chunk`."""
    if _openmp_runtime() is None:
        return fold_chunk(dtype)
    return SEGMENT_BATCH_BYTES // torch.empty((), dtype=dtype).element_size()


def fold_segments(
    targets: list[torch.Tensor],
    sources: list[list[torch.Tensor]],
    coefs: list[float],
    chunk: int | None = None,
    init: bool = False,
    divisor: float | None = None,
    flat: torch.Tensor | None = None,
) -> float | None:
    """:func:`fold_flat` over many targets at once: ``targets[i] += Σ coefs[k] · sources[k][i]``.

    For updates whose tensors lie apart in memory (a caller's state dicts): ``targets`` are the
    accumulator's slot views, ``sources[k]`` update k's tensors in the same order and shapes. The
    targets are cut into batches of ≈ ``chunk`` coordinates (large targets into ``chunk``-sized
    slices, small ones whole, several per batch); for each batch every update of the call is added
    while the batch is in cache, one ``torch._foreach_add_`` per update over the whole batch (the
    update's weight as ``alpha``), so the accumulator is read and written once per call instead of
    once per update, with one thread hand-off per call. Per element the values are those of a plain
    loop: ``target = coefs[0] · sources[0]`` (with ``init``, as :func:`scaled_into`), then
    ``target.add_(sources[k], alpha=coefs[k])`` in the order of ``sources``, then ``div_(divisor)``.
    ``init`` as in :func:`fold_flat`; ``divisor`` divides each target by it after the sources are
    added, while its batch is still in cache (a round's last fold turning the sum into the mean).
    ``chunk`` defaults to :func:`segment_chunk`. Targets above ``chunk`` elements must be 1-D (as
    must their sources), smaller ones any shape. With ``divisor``, returns the sum of the targets'
    new values (each batch summed right after its division, in cache; ``flat``: the buffer the targets
    tile in order, summed one range per batch), else None.
    """
    if not sources or not targets:
        return 0.0 if divisor is not None else None
    if chunk is None:
        # at most SEGMENT_BATCH_BYTES, and small enough for PIECES_PER_WORKER pieces per fold worker
        # (taken dynamically: a worker the OS deschedules leaves its share to the others)
        total = sum(target.numel() for target in targets)
        pieces = _fold_workers() * PIECES_PER_WORKER
        chunk = max(
            fold_chunk(targets[0].dtype) // 4, min(segment_chunk(targets[0].dtype), -(-total // pieces))
        )
    batches = _segment_batches(targets, chunk)
    if not batches:
        return 0.0 if divisor is not None else None
    rest, rest_coefs = (sources[1:], coefs[1:]) if init else (sources, coefs)
    first = sources[0]
    sums = [0.0] * len(batches)

    def parts_of(source: list[torch.Tensor], units: list[tuple[int, int, int, bool]]) -> list[torch.Tensor]:
        return [source[i] if whole else source[i][start:stop] for i, start, stop, whole in units]

    def run(lo: int, hi: int) -> None:
        for position in range(lo, hi):
            batch_targets, units, done = batches[position]
            if init and len(units) <= 2:  # slices of large targets: one kernel, no second pass
                for target, part in zip(batch_targets, parts_of(first, units), strict=True):
                    scaled_into(target, part, coefs[0])
            elif init:
                # as scaled_into: the product formed in the target's dtype (a copy is exact), for many
                # small targets in two C++ calls instead of one Python call each
                torch._foreach_copy_(batch_targets, parts_of(first, units))
                torch._foreach_mul_(batch_targets, coefs[0])
            for source, coef in zip(rest, rest_coefs, strict=True):
                torch._foreach_add_(batch_targets, parts_of(source, units), alpha=coef)
            if divisor is not None:
                torch._foreach_div_(batch_targets, divisor)
                sums[position] = _batch_sum(
                    batch_targets, flat, batches[position - 1][2] if position else 0, done
                )

    total = batches[-1][2]
    workers = min(
        _fold_workers(), len(batches), max(1, total * len(sources) // (4 * fold_chunk(targets[0].dtype)))
    )
    if workers <= 1:
        run(0, len(batches))
        return math.fsum(sums) if divisor is not None else None
    # pieces of about equal numbers of coordinates (batches range from a few to ``chunk`` coordinates)
    pieces = min(len(batches), workers * PIECES_PER_WORKER)
    bounds, piece = [0], 1
    for position, (_, _, done) in enumerate(batches[:-1], start=1):
        if done * pieces >= total * piece:
            bounds.append(position)
            piece += 1
    bounds.append(len(batches))
    _run_pieces(run, bounds, workers)
    return math.fsum(sums) if divisor is not None else None


def _batch_sum(targets: list[torch.Tensor], flat: torch.Tensor | None, start: int, stop: int) -> float:
    """Sum of a batch's targets: one range of ``flat`` when the targets tile it, else target by target."""
    if flat is not None:
        return float(flat[start:stop].sum())
    return math.fsum(float(target.sum()) for target in targets)


def _segment_batches(
    targets: list[torch.Tensor], chunk: int
) -> list[tuple[list[torch.Tensor], list[tuple[int, int, int, bool]], int]]:
    """``targets`` cut into batches of ≈ ``chunk`` coordinates: (target views, their units as
    (target index, start, stop, whole), coordinates up to the batch's end)."""
    batches: list[tuple[list[torch.Tensor], list[tuple[int, int, int, bool]], int]] = []
    views: list[torch.Tensor] = []
    units: list[tuple[int, int, int, bool]] = []
    batched = done = 0
    for index, target in enumerate(targets):
        n = target.numel()
        # equal slices of at most ``chunk`` (1M by 512k: 2 × 500k, not 512k and a 488k remainder
        # that shares a batch with the next tensor's first slice: batches of twice the size)
        step = -(-n // -(-n // chunk)) if n > chunk else chunk
        for start in range(0, n, step):
            stop = min(n, start + step)
            whole = start == 0 and stop == n
            views.append(target if whole else target[start:stop])
            units.append((index, start, stop, whole))
            batched += stop - start
            done += stop - start
            if batched >= chunk:
                batches.append((views, units, done))
                views, units, batched = [], [], 0
    if units:
        batches.append((views, units, done))
    return batches


def fold_whole(
    targets: list[torch.Tensor], source: list[torch.Tensor], coef: float, init: bool = False
) -> None:
    """``targets[i] (+)= coef · source[i]`` for one update, tensor by tensor in the calling thread:
    the kernels a plain loop runs (``torch.mul``/``add_`` over whole tensors, each split by torch's
    own threads), the same values as :func:`fold_segments` per element."""
    for target, tensor in zip(targets, source, strict=True):
        if init:
            scaled_into(target, tensor, coef)
        else:
            target.add_(tensor, alpha=coef)


#: An inline fold of at least this many bytes of accumulator is shared between the caller's thread and
#: one fold thread (:func:`~.kernels.run_beside`): each kernel is below ATen's grain size, so one core
#: runs a plain loop's every ``add_``; two fold 100 × 10k float32 per update in ≈ 0.5 ms instead of 0.7
#: (measured 2026-12-06), where waking the fold thread costs some 30 µs.
INLINE_SHARED_MIN_BYTES = 1 << 20
#: Accumulator bytes per piece of a shared inline fold (pieces are taken in turn by both threads).
INLINE_PIECE_BYTES = 512 << 10


def fold_inline(
    targets: list[torch.Tensor],
    sources: list[list[torch.Tensor]],
    coefs: list[float],
    init: bool = False,
    divisor: float | None = None,
    flat: torch.Tensor | None = None,
    bounds: list[int] | None = None,
    check: Callable[[], None] | None = None,
) -> float | None:
    """:func:`fold_segments` for small targets, without the batches: one ``torch._foreach_add_`` per
    source over every target (one C++ call per update instead of one kernel call per tensor from
    Python), in the caller's thread, shared with one fold thread from
    :data:`INLINE_SHARED_MIN_BYTES`. The same kernels in the same order per element as
    :func:`fold_segments`, so the same values. Only for targets below ATen's grain size (32768
    elements: no OpenMP team starts in either thread) whose accumulator stays in cache from one
    update to the next (see ``accumulator.INLINE_FOLD_BYTES``). Returns the sum of the new values
    with ``divisor`` (``flat``: the buffer the targets view, in order, summed in pieces), else None.
    ``bounds``: :func:`inline_pieces` of the targets, if the caller keeps them from fold to fold.
    ``check``: the sources' check, for a caller that discards the accumulator if it raises: run beside
    the fold where the fold is shared (:func:`~.kernels.run_beside`; the caller's thread then takes
    a first piece twice the size, to fold while the check runs), else before it.
    """
    if bounds is None:
        bounds = inline_pieces(targets)
    if check is not None and len(bounds) <= 2:
        check()
        check = None
    if not sources or not targets:
        return 0.0 if divisor is not None else None
    if check is not None and len(bounds) > 3:
        bounds = [bounds[0], *bounds[2:]]
    sums = [0.0] * (len(bounds) - 1)

    def run(lo: int, hi: int) -> None:
        part = targets[bounds[lo] : bounds[hi]]
        rest, rest_coefs = sources, coefs
        if init:
            # as scaled_into (the product formed in the target's dtype; a copy is exact), 2 C++ calls
            torch._foreach_copy_(part, sources[0][bounds[lo] : bounds[hi]])
            torch._foreach_mul_(part, coefs[0])
            rest, rest_coefs = sources[1:], coefs[1:]
        for update, coef in zip(rest, rest_coefs, strict=True):
            torch._foreach_add_(part, update[bounds[lo] : bounds[hi]], alpha=coef)
        if divisor is not None:
            torch._foreach_div_(part, divisor)
            if flat is None:
                sums[lo] = math.fsum(float(target.sum()) for target in part)
            else:
                # (storage offsets, not addresses: an empty view's data_ptr() is 0)
                start = part[0].storage_offset() - flat.storage_offset()
                stop = part[-1].storage_offset() - flat.storage_offset() + part[-1].numel()
                sums[lo] = small_sum(flat[start:stop])

    if len(bounds) > 2:
        run_beside(run, list(range(len(bounds))), check)
    else:
        run(0, 1)
    return math.fsum(sums) if divisor is not None else None


def inline_pieces(targets: list[torch.Tensor]) -> list[int]:
    """Bounds cutting ``targets`` into pieces of about :data:`INLINE_PIECE_BYTES` for
    :func:`fold_inline` (one piece below :data:`INLINE_SHARED_MIN_BYTES` in all, or with one core)."""
    itemsize = targets[0].element_size() if targets else 1
    sizes = [target.numel() * itemsize for target in targets]
    total = sum(sizes)
    if total < INLINE_SHARED_MIN_BYTES or len(targets) < 2 or _fold_workers() < 2:
        return [0, len(targets)]
    pieces = min(len(targets), -(-total // INLINE_PIECE_BYTES))
    bounds, done, edge = [0], 0, 1
    for index, size in enumerate(sizes[:-1], start=1):
        done += size
        if done * pieces >= total * edge:
            bounds.append(index)
            edge += 1
    bounds.append(len(targets))
    return bounds


#: Elements per sum in the caller's thread: below ATen's grain size (32768), so never an OpenMP team.
SMALL_SUM_PIECE = 1 << 14


def small_sum(flat: torch.Tensor) -> float:
    """``float(flat.sum())`` in the calling thread, in pieces below ATen's grain size (no OpenMP team:
    on a busy machine a team member descheduled stalls every barrier)."""
    return math.fsum(float(piece.sum()) for piece in flat.split(SMALL_SUM_PIECE))
