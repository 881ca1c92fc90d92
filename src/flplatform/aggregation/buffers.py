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

A process may also :func:`reserve` a buffer ahead of need (faulted in at once, in a worker thread):
the next :func:`new_buffer` it fits takes it instead of fresh memory. On a VM whose balloon takes
freed memory back (virtio free page reporting), a fresh buffer's first touch faults every page in
from the host: ≈ 100–200 ms for a 136 MB float64 sum, which a server's first round otherwise pays
in its first fold, during the upload burst (docs/performance.md, "Real-size rounds").
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading

import torch

#: Buffers from this many bytes up ask for huge pages (one huge page: smaller ones cannot use any).
HUGE_PAGE_MIN_BYTES = 2 << 20
#: Ask for transparent huge pages (see the module docstring: off, as plain torch tensors are).
USE_HUGE_PAGES = False
_MADV_HUGEPAGE = 14  # linux/mman.h
_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14+: fault pages in writable without writing them

_reserve_lock = threading.Lock()
_reserved: torch.Tensor | None = None  # uint8, faulted in; see reserve()


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


def _advise(buffer: torch.Tensor, advice: int) -> bool:
    madvise = _madvise()
    if madvise is None:
        return False
    # the pages the buffer touches: a hint changes no byte, so a neighbour sharing a page is safe
    page = mmap.PAGESIZE
    start = buffer.data_ptr() // page * page
    stop = -(-(buffer.data_ptr() + buffer.numel() * buffer.element_size()) // page) * page
    return madvise(start, stop - start, advice) == 0


def new_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(numel, dtype=dtype)``, its whole pages marked for transparent huge pages when it
    is at least :data:`HUGE_PAGE_MIN_BYTES` (a refusal is ignored: the buffer is then plain); the
    :func:`reserve`-d buffer instead when this one needs between half of it and all of it."""
    nbytes = numel * dtype.itemsize
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        spare = _take_reserved(nbytes)
        if spare is not None:
            return spare[:nbytes].view(dtype)
    buffer = torch.empty(numel, dtype=dtype)
    if USE_HUGE_PAGES and nbytes >= HUGE_PAGE_MIN_BYTES:
        _advise(buffer, _MADV_HUGEPAGE)
    return buffer


def reserve(nbytes: int) -> None:
    """Fault in a buffer of ``nbytes`` now (blocking: call from a worker thread, ahead of need) for
    the next :func:`new_buffer` it fits. One per process: a smaller reservation is replaced, a
    larger one kept. :func:`release_reserved` gives it back."""
    global _reserved
    if nbytes < HUGE_PAGE_MIN_BYTES:
        return
    with _reserve_lock:
        if _reserved is not None and _reserved.numel() >= nbytes:
            return
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if USE_HUGE_PAGES:
        _advise(buffer, _MADV_HUGEPAGE)
    if not _advise(buffer, _MADV_POPULATE_WRITE):  # an older kernel: touch every page instead
        buffer.zero_()
    with _reserve_lock:
        if _reserved is None or _reserved.numel() < nbytes:
            _reserved = buffer


def _take_reserved(nbytes: int) -> torch.Tensor | None:
    global _reserved
    with _reserve_lock:
        spare = _reserved
        if spare is None or not nbytes <= spare.numel() <= 2 * nbytes:
            return None  # (a buffer far smaller than the reservation would pin it for little)
        _reserved = None
        return spare


def release_reserved() -> int:
    """Drop this process's reservation, if any (its memory returns to the system); its size."""
    global _reserved
    with _reserve_lock:
        spare, _reserved = _reserved, None
    return 0 if spare is None else spare.numel()


def reserved_bytes() -> int:
    with _reserve_lock:
        return 0 if _reserved is None else _reserved.numel()
