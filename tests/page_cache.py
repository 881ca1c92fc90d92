"""How much of a file is in the page cache (Linux ``mincore`` on a mapping that is never touched),
and whether this filesystem lets ``posix_fadvise(DONTNEED)`` drop a file's clean pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from pathlib import Path

import numpy

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def resident_pages(path: Path) -> int:
    """Pages of ``path`` now in the page cache (mapping the file reads none of them)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        view = numpy.frombuffer(mapping, dtype=numpy.uint8)  # only its address is used
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        failed = _libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vector)
        del view
        if failed:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vector)
    finally:
        mapping.close()


def page_cache_can_be_dropped(directory: Path) -> bool:
    """Whether a file written, fsynced and read in ``directory`` leaves the page cache on
    ``posix_fadvise(DONTNEED)`` (not on tmpfs, nor off Linux)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        return False
    probe = directory / "page-cache-probe"
    probe.write_bytes(os.urandom(4 * mmap.PAGESIZE))
    try:
        with open(probe, "rb+") as file:
            os.fsync(file.fileno())
            file.read()
            if resident_pages(probe) == 0:
                return False
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return resident_pages(probe) == 0
    finally:
        probe.unlink()
