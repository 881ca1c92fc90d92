"""Debug timelines of a multi-step operation (a round's close): named marks with wall-clock times,
logged as one DEBUG line per operation on the ``flplatform.timeline`` logger. Off unless that
logger is enabled for DEBUG (then every call is one ``isEnabledFor`` check); ``bench/round_bench.py
--phases`` enables it and reads the lines back.

Marks taken before the operation begins (the last upload's commit, its fold on arrival, the claim)
are :func:`note`\\ d under a key (the training); :func:`opened` starts the operation's timeline with
them, and :func:`mark` adds marks from wherever the operation runs (worker threads included: the
timeline is a context variable, which ``asyncio.to_thread`` carries). Wall-clock times (not
monotonic) so that the bench process can line them up with its own."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Hashable, Iterator

log = logging.getLogger("flplatform.timeline")

_MAX_PENDING = 256
_pending: dict[Hashable, dict[str, float]] = {}
_current: contextvars.ContextVar[list[tuple[str, float]] | None] = contextvars.ContextVar(
    "flplatform_timeline", default=None
)


def enabled() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def note(key: Hashable, name: str) -> None:
    """Record ``name`` now for the operation ``key`` that has not begun yet (the last one wins)."""
    if not enabled():
        return
    if key not in _pending and len(_pending) >= _MAX_PENDING:
        _pending.pop(next(iter(_pending)))
    _pending.setdefault(key, {})[name] = time.time()


def mark(name: str) -> None:
    """Record ``name`` now in the current operation's timeline (nothing outside one)."""
    marks = _current.get()
    if marks is not None:
        marks.append((name, time.time()))


@contextlib.contextmanager
def opened(key: Hashable, what: str) -> Iterator[None]:
    """The operation ``what`` (its timeline starts with the marks noted under ``key``); logged at
    its end as ``timeline <what> <JSON list of [name, epoch seconds]>``, in time order."""
    if not enabled():
        yield
        return
    marks = sorted(((n, t) for n, t in _pending.pop(key, {}).items()), key=lambda m: m[1])
    token = _current.set(marks)
    try:
        yield
    finally:
        _current.reset(token)
        marks.sort(key=lambda m: m[1])
        log.debug("timeline %s %s", what, json.dumps([[n, round(t, 6)] for n, t in marks]))
