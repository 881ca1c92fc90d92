"""glibc malloc tuned for a server that handles model-sized buffers in worker threads.

With glibc's defaults each thread that allocates gets an arena of its own (up to 8 per core), and
the threshold above which a block is ``mmap``-ed rises with every large block freed (up to 32 MiB),
so the 1–16 MiB buffers of uploads, finiteness checks and folds, freed a moment later, stay cached
in one arena per worker thread: measured on ``bench/round_bench.py`` (8 clients × 68 MB), ≈ 150 MB
of the server's resident set at idle and during the uploads (docs/performance.md, run G).

:func:`tune` (called by :func:`flplatform.app.create_app`), when enabled, caps the arenas at
:data:`ARENA_MAX` and fixes the ``mmap`` threshold at :data:`MMAP_THRESHOLD`, so a large block goes
back to the kernel when it is freed. glibc's own variables win: when ``MALLOC_ARENA_MAX`` or
``MALLOC_MMAP_THRESHOLD_`` is set in the environment, that setting is left as glibc read it.
:func:`trim` runs after every round's close (``trainings.jobs``) whatever the setting. Opt-in, ``FLP_MALLOC_TUNE=1``: in every interleaved pair measured so far the tuned
server uploaded and closed rounds more slowly than with glibc's defaults (a fresh ``mmap``, page
faults and zeroing, per buffer ≥ 256 KiB), and since the close's order check stopped fragmenting the
fold threads' arenas it saves at most ≈ 25 MB of the rounds' peak (as do a fixed 4–8 MiB threshold
or two arenas: docs/performance.md, "Peak RSS"), so it stays off by default. Elsewhere than glibc
(musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

# mallopt parameters (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

ARENA_MAX = 2
MMAP_THRESHOLD = 256 * 1024

_lock = threading.Lock()
_done = False


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune() -> dict[str, int]:
    """Applies the settings once per process; returns those it set (empty when none)."""
    global _done
    with _lock:
        if _done:
            return {}
        _done = True
        libc = _libc()
        if libc is None or os.environ.get("FLP_MALLOC_TUNE") != "1":
            return {}
        applied: dict[str, int] = {}
        if "MALLOC_ARENA_MAX" not in os.environ and libc.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1:
            applied["arena_max"] = ARENA_MAX
        if (
            "MALLOC_MMAP_THRESHOLD_" not in os.environ
            and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ):
            applied["mmap_threshold"] = MMAP_THRESHOLD
        return applied


def trim() -> bool:
    """Returns the free pages of every arena to the kernel (``malloc_trim(0)``); False elsewhere
    than glibc or when nothing was released. For after a burst of large frees."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
