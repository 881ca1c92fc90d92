"""Tensor kernels of the aggregators: the multi-threaded fold and in-place finalisation.

:func:`fold_flat` computes ``acc += Σ coef_k · source_k`` over flat 1-D buffers, cache-blocked: for
each chunk of coordinates every source is added while that slice of the accumulator is in cache, in
a pool of fold threads whose ATen kernels run inline (their OpenMP team size is set to 1 through the
OpenMP runtime itself, via ctypes, so torch's thread count elsewhere stays as it is);
the folds of separate tensors (a caller's state dicts) are in :mod:`.segments`, and the finiteness
check sums in the fold threads. The rest are
the chunked helpers every stage uses: the accumulator dtype of a group, turning a sum into a mean in
the accumulator's own memory, and a finiteness check without a model-sized temporary.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .codec import chunk_ranges

#: Coordinates per chunk: 2**18 float32 = 1 MiB, half of it per core's 1 MiB L2 with two threads.
DEFAULT_CHUNK = 1 << 18


def accumulator_dtype(model_dtype: torch.dtype, requested: torch.dtype) -> torch.dtype:
    """Accumulator dtype of a group: floats at least ``requested``; integers in a float that holds
    them exactly enough (weighted means are rounded back); booleans as float32 (majority vote)."""
    if model_dtype.is_floating_point:
        if torch.finfo(model_dtype).bits >= torch.finfo(requested).bits:
            return model_dtype
        return requested
    if model_dtype == torch.bool:
        return torch.float32
    if torch.empty((), dtype=model_dtype).element_size() <= 2:
        return torch.float32
    return torch.float64


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A view of ``tensor``'s storage (from its first byte) reinterpreted as ``dtype``, same length."""
    return torch.empty(0, dtype=dtype).set_(tensor.untyped_storage(), 0, (tensor.numel(),), (1,))


def scaled_into(target: torch.Tensor, source: torch.Tensor, coef: float) -> None:
    """``target = coef · source`` with the product formed in ``target``'s dtype (as ``addcmul_`` forms
    the later terms): ``torch.mul(float32, coef, out=float64)`` would round it to float32 first, so
    the first term of a sum would be rounded unlike the others (and the sum depend on which comes
    first)."""
    if source.dtype == target.dtype:
        torch.mul(source, coef, out=target)
    else:
        target.copy_(source).mul_(coef)


def finalize_inplace(acc: torch.Tensor, divisor: float, out_dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """``acc / divisor`` converted to ``out_dtype`` IN the accumulator's own memory (no second model).

    Integers are rounded half to even and clamped to their range; booleans become ``mean >= 0.5``.
    Chunks go front to back: chunk ``[s, e)`` is read completely before its converted values are
    written to bytes ``[s*o, e*o)`` with ``o <= acc item size``, which only holds elements ``< e``.
    """
    if out_dtype == acc.dtype:
        return acc.div_(divisor)
    out = as_dtype(acc, out_dtype)
    for start, stop in chunk_ranges(acc.numel(), chunk):
        part = acc[start:stop] / divisor
        if out_dtype == torch.bool:
            part = part >= 0.5
        elif not out_dtype.is_floating_point:
            info = torch.iinfo(out_dtype)
            part = part.round_().clamp_(info.min, info.max)
        out[start:stop].copy_(part)
    return out


def all_finite(flat: torch.Tensor, chunk: int) -> bool:
    """Whether every value is finite, without a model-sized temporary.

    ``torch.isfinite`` of a whole model builds ``abs`` and comparison temporaries worth ≈ 1.75
    models (measured), breaking the 2-model bound, and chunk by chunk it is slow (several kernels
    per chunk). A plain sum is one read pass with no temporary: NaN and ±inf always reach it
    (inf + -inf is NaN), so a finite sum proves every value finite. Only a non-finite sum (a bad
    value, or finite values so large that their sum overflows) takes the exact chunked check.
    """
    if math.isfinite(_parallel_sum(flat, chunk)):
        return True
    return all(
        bool(torch.isfinite(flat[start:stop]).all()) for start, stop in chunk_ranges(flat.numel(), chunk)
    )


def divide_checked(acc: torch.Tensor, divisor: float, chunk: int, *, threads: bool = True) -> bool:
    """``acc.div_(divisor)`` (a floating accumulator that is already in the model's dtype), and whether
    every value of the result is finite: each chunk is summed right after its division, while in cache
    (see :func:`all_finite`), instead of another read of the model afterwards. Only a non-finite sum
    takes the exact check. Division is correctly rounded, so the values are those of one ``div_``."""
    n = acc.numel()
    if not threads and n > INLINE_SUM_MAX:
        # right after whole-tensor folds (torch's own threads, as a plain loop): its OpenMP team is
        # still spinning on both cores, so the fold threads would wait for it (3.5 ms more here)
        return math.isfinite(float(acc.div_(divisor).sum())) or all_finite(acc, chunk)
    if n <= INLINE_SUM_MAX:  # small: in this thread, in pieces below ATen's grain size (no OpenMP team)
        pieces = acc.split(INLINE_SUM_PIECE)
        torch._foreach_div_(list(pieces), divisor)
        total = math.fsum(float(piece.sum()) for piece in pieces)
    else:
        # pieces of at least 1 MiB of float32: two kernels and a Python round trip per piece cost
        # more than the piece in cache saves below that (10M float32: 2.2 ms in 512 KiB pieces, 1.65
        # in 1 MiB ones, against 1.6 for an unsplit div_ and sum; measured 2026-12-06)
        chunk = max(chunk, DIVIDE_MIN_PIECE)
        count = -(-n // chunk)
        workers = min(_fold_workers(), count)
        partial = [0.0] * count

        def run(lo: int, hi: int) -> None:
            for index in range(lo, hi):
                part = acc[index * chunk : (index + 1) * chunk]
                partial[index] = float(part.div_(divisor).sum())

        if workers <= 1:
            run(0, count)
        else:
            _run_pieces(run, list(range(count + 1)), workers)
        total = math.fsum(partial)
    return math.isfinite(total) or all_finite(acc, chunk)


#: Elements per piece of :func:`divide_checked`, at least.
DIVIDE_MIN_PIECE = 1 << 18
#: Up to this many elements (8 MiB of float32) the finiteness sum runs in the caller's thread.
INLINE_SUM_MAX = 1 << 21
#: Elements per sum in the caller's thread: below ATen's grain size (32768), so never an OpenMP team.
INLINE_SUM_PIECE = 1 << 14


def _parallel_sum(flat: torch.Tensor, chunk: int) -> float:
    """``float(flat.sum())``, chunk sums computed in the fold threads (kernels inline): on a busy
    machine an OpenMP team in the caller's thread stalls at its barrier whenever a member is
    descheduled (measured at load 9 on 2 cores: 4 MB summed in 30 ms instead of 0.3 ms)."""
    if flat.numel() <= INLINE_SUM_MAX:
        # small: in this thread, in pieces below ATen's grain size (no OpenMP team, no hand-off: on a
        # busy machine waking a fold thread may wait milliseconds for a core)
        return math.fsum(float(piece.sum()) for piece in flat.split(INLINE_SUM_PIECE))
    count = -(-flat.numel() // chunk)
    workers = min(_fold_workers(), count)
    if workers <= 1:
        return float(flat.sum())
    partial = [0.0] * count

    def run(lo: int, hi: int) -> None:
        for index in range(lo, hi):
            partial[index] = float(flat[index * chunk : (index + 1) * chunk].sum())

    _run_pieces(run, list(range(count + 1)), workers)
    return math.fsum(partial)


#: Bytes of accumulator per fold kernel call: half a core's 1 MiB L2, so the slice stays in cache while
#: every source of the pass is added to it. Larger chunks mean fewer kernel launches (each costs ~1.5 µs
#: of fixed work): 512 KiB folded ≈ 25 % faster than ATen's 128 KiB GRAIN_SIZE, measured interleaved.
#: That needs fold threads that run kernels inline (see :func:`_inline_kernels`); without them, chunks
#: stay at GRAIN_SIZE, below which ATen never starts an OpenMP team.
FOLD_CHUNK_BYTES = 512 << 10
GRAIN_CHUNK_BYTES = 128 << 10
#: Coordinates per fold kernel call for a float32 accumulator (float64: half as many).
FOLD_CHUNK = FOLD_CHUNK_BYTES // 4
#: Pieces of coordinates per fold worker, taken dynamically (see :func:`fold_flat`).
PIECES_PER_WORKER = 4
#: Bytes of a source read between two calls of its release hook (see :data:`Release`).
RELEASE_BYTES = 4 << 20

#: A hook called with ``(address, nbytes)`` of a source's memory that the fold has finished reading
#: (e.g. to drop a memory-mapped update's pages behind it: ``blobs.mapped.PageReleaser``). A plain
#: callable, so that this package knows nothing of where the bytes come from.
Release = Callable[[int, int], None]


#: The page cache maps large folios (up to 2 MiB) at once: a read just past a released range maps
#: its last folio again, so each release also covers this much before its range.
FOLIO_BYTES = 2 << 20


def release_range(
    release: Release | None, source: torch.Tensor, start: int, stop: int, first: int = 0
) -> None:
    """Call ``release`` (if any) on elements ``[start, stop)`` of a contiguous 1-D ``source``, and on
    :data:`FOLIO_BYTES` before them (not before element ``first``)."""
    if release is not None and stop > start:
        itemsize = source.element_size()
        start = max(first, start - FOLIO_BYTES // itemsize)
        release(source.data_ptr() + start * itemsize, (stop - start) * itemsize)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _fold_workers() -> int:
    return max(1, torch.get_num_threads())


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's kernels use (torch's wheels bundle it in ``torch/lib``), or None."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib"):
        for path in sorted(lib_dir.glob(pattern)):
            try:
                runtime = ctypes.CDLL(str(path))  # already loaded by torch: the same handle
                runtime.omp_set_num_threads.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                continue
            return runtime
    return None


def _inline_kernels() -> bool:
    """Make ATen run kernels inline in the *calling* thread (no OpenMP team); True if it took.

    OpenMP keeps the team size per thread, but ``torch.set_num_threads`` also changes the default of
    every thread that starts using torch later (inference in the server's worker threads would run
    single-threaded), so the fold threads set their own size in the OpenMP runtime directly. ATen
    initialises a thread's setting on its first call, so that call comes first.
    """
    torch.get_num_threads()
    runtime = _openmp_runtime()
    if runtime is None:
        return False
    runtime.omp_set_num_threads(1)
    return torch.get_num_threads() == 1


def fold_chunk(dtype: torch.dtype) -> int:
    """Coordinates per fold kernel call for an accumulator of ``dtype``."""
    budget = FOLD_CHUNK_BYTES if _openmp_runtime() is not None else GRAIN_CHUNK_BYTES
    return budget // torch.empty((), dtype=dtype).element_size()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            # Kernels in the fold threads run inline: OpenMP teams inside our own threads would
            # oversubscribe the cores, and on a busy machine a descheduled member stalls every barrier.
            _POOL = ThreadPoolExecutor(
                max_workers=max(2, _fold_workers()),
                thread_name_prefix="flp-fold",
                initializer=_inline_kernels,
            )
        return _POOL


def fold_flat(
    acc: torch.Tensor,
    sources: list[torch.Tensor],
    coefs: list[float],
    chunk: int | None = None,
    acc_chunks: tuple[torch.Tensor, ...] | None = None,
    init: bool = False,
    divisor: float | None = None,
    releases: list[Release | None] | None = None,
    observers: list[Callable[[int, int], None] | None] | None = None,
) -> float | None:
    """``acc += Σ coefs[k] · sources[k]`` (1-D, same length), cache-blocked and multi-threaded.

    With ``init=True`` it is ``acc = Σ coefs[k] · sources[k]`` instead: ``acc`` may hold anything
    (``torch.empty``), which spares zero-filling a fresh accumulator and reading those zeros back.
    With ``divisor`` it is ``acc = (acc + Σ …) / divisor``, each chunk divided right after its sources
    are added, while it is in cache (a round's last pass turning the sum into the mean without another
    pass over the accumulator; the same values as dividing afterwards).
    For each ``chunk`` of coordinates every source is added while that slice of the accumulator is in
    cache, so the accumulator is read and written once per call instead of once per source. One
    ``torch._foreach_addcmul_`` call per piece does its chunks × sources in C++ with the GIL released
    (``addcmul`` with a broadcast one carries a per-source weight). The coordinates are cut into a few
    pieces per worker that the fold threads take in turn, so a thread the OS descheduled (the machine
    is shared) does not stall the others at a fixed split; the caller waits.
    Any source dtype works (promoted chunk by chunk, never a model-sized temporary). ``chunk``
    defaults to :func:`fold_chunk` of the accumulator's dtype; ``acc_chunks`` may pass
    ``acc.split(chunk)`` made once per round (hundreds of views per call).
    ``releases[k]`` (optional) is called on each :data:`RELEASE_BYTES` or so of ``sources[k]`` once it
    is folded (the same kernels on the same chunks in the same order: the same values);
    ``observers[k]`` (optional) is called with each range ``[start, stop)`` of coordinates of
    ``sources[k]`` right after it is folded, while in cache (the order bound's block maxima).
    With ``divisor``, returns the sum of ``acc``'s new values, each chunk summed right after its
    division while in cache (a finite sum proves every value finite, see :func:`all_finite`: the
    round's finiteness check without another read of the model); else None.
    """
    if not sources:
        return None
    n = acc.numel()
    if chunk is None:
        chunk = fold_chunk(acc.dtype)
    if acc_chunks is None:
        acc_chunks = acc.split(chunk)
    one = torch.ones(1, dtype=acc.dtype)
    per_chunk = len(sources)
    hooks = [(s, r) for s, r in zip(sources, releases or [], strict=False) if r is not None]
    watchers = [o for o in observers or [] if o is not None]
    # (observed per RELEASE_BYTES too: a smaller window, though more often in L2, costs more in
    # kernel calls and GIL hand-offs between the fold threads than it saves)
    step = max(1, RELEASE_BYTES // (chunk * max(s.element_size() for s in sources)))
    sums = [0.0] * len(acc_chunks) if divisor is not None else []

    def run(lo: int, hi: int) -> None:
        if not hooks and not watchers:
            fold(lo, hi)
            return
        for start in range(lo, hi, step):  # a few chunks at a time, each source's pages released behind
            stop = min(hi, start + step)
            fold(start, stop)
            for observe in watchers:
                observe(start * chunk, min(n, stop * chunk))
            for source, release in hooks:
                release_range(release, source, start * chunk, min(n, stop * chunk), lo * chunk)

    def fold(lo: int, hi: int) -> None:
        # The sources' chunk views are made here, per piece, not all up front: making views holds the
        # GIL (~1 ms per 100 MB source), and here it overlaps the other workers' kernels, which don't.
        source_chunks = [source[lo * chunk : hi * chunk].split(chunk) for source in sources]
        if init or divisor is not None:
            # chunk by chunk, so the freshly written slice is still in cache for the sources and the division
            rest, rest_coefs = (source_chunks[1:], coefs[1:]) if init else (source_chunks, coefs)
            ones = [one] * len(rest)
            for index in range(hi - lo):
                target = acc_chunks[lo + index]
                if init:
                    scaled_into(target, source_chunks[0][index], coefs[0])
                if rest:
                    torch._foreach_addcmul_([target] * len(rest), [c[index] for c in rest], ones, rest_coefs)
                if divisor is not None:
                    target.div_(divisor)
                    sums[lo + index] = float(target.sum())
            return
        targets: list[torch.Tensor] = []
        tensors: list[torch.Tensor] = []
        for index in range(hi - lo):
            targets.extend([acc_chunks[lo + index]] * per_chunk)
            tensors.extend(chunks[index] for chunks in source_chunks)
        torch._foreach_addcmul_(targets, tensors, [one] * len(targets), coefs * (hi - lo))

    count = len(acc_chunks)
    workers = min(_fold_workers(), count, max(1, n * per_chunk // (4 * chunk)))
    if workers <= 1:
        run(0, count)
    else:
        pieces = min(count, workers * PIECES_PER_WORKER)
        _run_pieces(run, [count * i // pieces for i in range(pieces + 1)], workers)
    for source, release in hooks:
        # once more over the whole source: a piece's first read may have mapped again the last
        # folio of the piece before it
        release_range(release, source, 0, n)
    return math.fsum(sums) if divisor is not None else None


def piece_bounds(count: int, pieces_per_worker: int = PIECES_PER_WORKER) -> list[int]:
    """Bounds cutting ``range(count)`` into a few pieces per fold worker."""
    pieces = max(1, min(count, _fold_workers() * pieces_per_worker))
    return [count * i // pieces for i in range(pieces + 1)]


def run_pieces(run: Callable[[int, int], None], items: list) -> None:
    """``run(lo, hi)`` over ``range(len(items))`` cut into pieces taken in turn by the fold threads
    (kernels inline); in the caller's thread when there is one worker or one item."""
    count = len(items)
    workers = min(_fold_workers(), count)
    if workers <= 1:
        run(0, count)
        return
    _run_pieces(run, piece_bounds(count), workers)


def run_in_order(run: Callable[[int, int], None], pieces: int) -> None:
    """``run(i, i + 1)`` for ``i`` in ``range(pieces)``, taken in increasing order by the fold
    threads (a piece may wait for lower ones), even with one worker (then in order, in one thread)."""
    workers = max(1, min(_fold_workers(), pieces))
    _run_pieces(run, list(range(pieces + 1)), workers)


def _run_pieces(run: Callable[[int, int], None], bounds: list[int], workers: int) -> None:
    """``run(bounds[i], bounds[i + 1])`` for every piece, taken in turn by the caller's thread (its
    kernels inline for the time, see :func:`_inline_kernels`) and ``workers - 1`` fold threads.

    The caller works rather than waits: its core is awake, where a fold thread's may not be (on a VM
    a halted virtual CPU took 2-5 ms to run a woken fold thread: a fold of 10 ms then took 16), and a
    fold thread slow to start only leaves the others more pieces."""
    pieces = len(bounds) - 1
    taken = itertools.count()  # next() on it is atomic under the GIL
    # The pool reaches the sources only through this holder, cleared after the join: a pool thread
    # keeps its finished work item a moment after the result is set, and a cancelled work item
    # waits in the queue, so a closure over ``run`` would keep the updates alive past the call.
    holder = {"run": run}
    stop: list[bool] = []  # a piece failed: the call raises, the others take no more

    def drain() -> None:
        work = holder.get("run")
        try:
            while work is not None and not stop and (piece := next(taken)) < pieces:
                work(bounds[piece], bounds[piece + 1])
        except BaseException:
            stop.append(True)
            raise

    runtime = _openmp_runtime()
    futures = [_pool().submit(drain) for _ in range(workers - 1 if runtime is not None else workers)]
    try:
        if runtime is not None:
            team = torch.get_num_threads()
            runtime.omp_set_num_threads(1)  # this thread's kernels inline, as the fold threads'
            try:
                drain()
            finally:
                runtime.omp_set_num_threads(team)
    finally:
        try:
            for future in futures:
                if not future.cancel():
                    future.result()
        finally:
            holder.clear()


def run_beside(
    run: Callable[[int, int], None], bounds: list[int], check: Callable[[], None] | None = None
) -> None:
    """``run(bounds[i], bounds[i + 1])`` for every piece, taken in turn by the caller's thread and one
    fold thread, for work whose kernels run inline in any thread (tensors below ATen's grain size):
    the caller works instead of waiting, so a fold thread that is slow to wake (a busy machine) only
    leaves it more pieces, never a wait for its start.

    ``check`` (optional; for a caller that discards the work if it raises) runs in the fold thread
    before it takes pieces, while the caller's thread already runs them: the check's Python holds
    the GIL while the caller's kernels do not need it. The caller's thread runs it after its pieces
    if the fold thread has not begun it. Its exception is raised in preference to any the pieces
    raised (an unchecked input's kernels may fail on what the check explains)."""
    pieces = len(bounds) - 1
    taken = itertools.count()
    claims = itertools.count()  # who takes 0 runs the check
    stop: list[bool] = []  # set when either side failed: no more pieces
    holder = {"run": run}  # cleared after the join, as in _run_pieces

    def drain() -> None:
        work = holder.get("run")
        while work is not None and not stop and (piece := next(taken)) < pieces:
            work(bounds[piece], bounds[piece + 1])

    def helper() -> None:
        if check is not None and next(claims) == 0:
            try:
                check()
            except BaseException:
                stop.append(True)
                raise
        drain()

    future = _pool().submit(helper)
    failure: BaseException | None = None
    try:
        drain()
    except BaseException as error:
        stop.append(True)
        failure = error
    try:
        if not future.cancel():
            future.result()
        if check is not None and next(claims) == 0:
            check()
    finally:
        holder.clear()
    if failure is not None:
        raise failure
