"""Fresh accumulator buffers, and one reserved ahead of need per process.

A fresh accumulator is written once before anything reads it, and every 4 KiB page of it costs a page
fault on that first write. Transparent huge pages (``madvise(MADV_HUGEPAGE)``, :data:`USE_HUGE_PAGES`)
make that one fault per 2 MiB, and once measured faster (10M float32 written by ``torch.mul`` into a
fresh buffer: 19.3 ms with 4 KiB pages, 6.5 ms with huge pages, 2026-12-05), but on another VM of the
same kind a day later far slower (67 ms with huge pages against 11 ms with 4 KiB pages, where a plain
torch loop's own fresh tensors took 10.6 ms: the first fold of ``fedavg`` cost 6× the loop's). Huge
pages are therefore off by default: buffers are allocated as plain torch tensors are, so a fold is
never slower than the loop it replaces for want of them. Only the allocation changes: the values
computed in the buffer are the same either way.

Buffers of :data:`HUGE_PAGE_MIN_BYTES` and more are anonymous memory maps lent out as tensors, and a
process keeps one of them faulted in for the next buffer that fits (:func:`new_buffer` takes it when
it needs between half of it and all of it):

* a buffer given back: when the last tensor viewing a lent buffer is freed (a round's result written
  and dropped, a ``fedavg`` caller's previous mean let go), its memory becomes the kept one, if it
  is larger than the one kept. Only the faults are saved, never a value: a buffer starts with
  whatever it holds, as ``torch.empty``, and is written before anything reads it. A fresh
  accumulator's first write costs a page fault per 4 KiB: 40 MB took 10–12 ms in fresh memory and
  4 ms in a kept buffer on this VM (2026-12-06), where a plain loop's own fresh tensors pay it too.
* a buffer :func:`reserve`-d ahead of need (faulted in at once, in a worker thread). On a VM whose
  balloon takes freed memory back (virtio free page reporting), a fresh buffer's first touch faults
  every page in from the host: ≈ 100–200 ms for a 136 MB float64 sum, which a server's first round
  otherwise pays in its first fold, during the upload burst (docs/performance.md, "Real-size rounds").

:func:`release_reserved` gives the kept buffer back to the system.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading
import weakref

import torch

#: Buffers from this many bytes up ask for huge pages (one huge page: smaller ones cannot use any).
HUGE_PAGE_MIN_BYTES = 2 << 20
#: Ask for transparent huge pages (see the module docstring: off, as plain torch tensors are).
USE_HUGE_PAGES = False
_MADV_HUGEPAGE = 14  # linux/mman.h
_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14+: fault pages in writable without writing them

# re-entrant: a lent buffer comes back from a finalizer, which may run in any code that frees memory
_reserve_lock = threading.RLock()
_reserved: mmap.mmap | None = None  # faulted in; see reserve() and the module docstring


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _advise_range(address: int, nbytes: int, advice: int) -> bool:
    madvise = _madvise()
    if madvise is None:
        return False
    # whole pages (a memory map starts on one): a hint changes no byte
    page = mmap.PAGESIZE
    start = address // page * page
    stop = -(-(address + nbytes) // page) * page
    return madvise(start, stop - start, advice) == 0


def new_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(numel, dtype=dtype)``; from :data:`HUGE_PAGE_MIN_BYTES` a lent memory map (the
    kept one when this buffer needs between half of it and all of it), given back when freed."""
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE_MIN_BYTES:
        return torch.empty(numel, dtype=dtype)
    memory = _take_reserved(nbytes)
    if memory is None:
        memory = _new_map(nbytes)
    return _lend(memory, numel, dtype)


def reserve(nbytes: int) -> None:
    """Fault in a buffer of ``nbytes`` now (blocking: call from a worker thread, ahead of need) for
    the next :func:`new_buffer` it fits. One per process: a smaller one kept is replaced, a larger
    one kept as it is. :func:`release_reserved` gives it back."""
    if nbytes < HUGE_PAGE_MIN_BYTES:
        return
    with _reserve_lock:
        if _reserved is not None and len(_reserved) >= nbytes:
            return
    memory = _new_map(nbytes)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    if not _advise_range(address, nbytes, _MADV_POPULATE_WRITE):  # an older kernel: touch every page
        ctypes.memset(address, 0, nbytes)
    _keep(memory)


def _new_map(nbytes: int) -> mmap.mmap:
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if USE_HUGE_PAGES:
        _advise_range(ctypes.addressof(ctypes.c_char.from_buffer(memory)), nbytes, _MADV_HUGEPAGE)
    return memory


@functools.lru_cache(maxsize=64)
def _lease_type(nbytes: int) -> type[ctypes.Array[ctypes.c_char]]:
    # a subclass: instances of a ctypes array type itself take no weak references
    return type("_Lease", (ctypes.c_char * nbytes,), {})


def _lend(memory: mmap.mmap, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``memory``; the memory comes back (:func:`_keep`) when the last view is freed."""
    lease = _lease_type(len(memory)).from_buffer(memory)
    weakref.finalize(lease, _keep, memory)  # the tensor's storage holds the lease, nothing else does
    return torch.frombuffer(lease, dtype=dtype, count=numel)


def _keep(memory: mmap.mmap) -> None:
    """Keep ``memory`` (faulted in) for the next buffer, unless a larger one is kept already."""
    global _reserved
    with _reserve_lock:
        if _reserved is None or len(_reserved) < len(memory):
            _reserved = memory


def _take_reserved(nbytes: int) -> mmap.mmap | None:
    global _reserved
    with _reserve_lock:
        spare = _reserved
        if spare is None or not nbytes <= len(spare) <= 2 * nbytes:
            return None  # (a buffer far smaller than the one kept would pin it for little)
        _reserved = None
        return spare


def release_reserved() -> int:
    """Drop this process's reservation, if any (its memory returns to the system); its size."""
    global _reserved
    with _reserve_lock:
        spare, _reserved = _reserved, None
    return 0 if spare is None else len(spare)


def reserved_bytes() -> int:
    with _reserve_lock:
        return 0 if _reserved is None else len(_reserved)
