"""The model sandbox: all TorchScript work (upload checks, weight extraction, rebuilding archives,
ensembles, inference with every uncertainty method, metadata) runs in confined worker processes,
never in the server. See docs/security.md, section "Model sandbox"."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

from flplatform.sandbox.client import SandboxFailure
from flplatform.sandbox.runner import SandboxSettings, get_pool, set_pool

__all__ = ["SandboxFailure", "SandboxSettings", "get_pool", "sandbox_component", "set_pool"]


@contextlib.asynccontextmanager
async def sandbox_component(app: Any) -> AsyncIterator[None]:
    """Lifespan component: on SIGTERM/SIGINT, calls in progress are aborted at once (their requests
    answer 503) so the server's graceful shutdown is not held up by a module that runs for its
    whole deadline; at shutdown the remaining calls are aborted too. Idle workers stay warm for
    the next app in this process and die with it."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if callable(handler):
                previous[signum] = handler

                def abort_then_chain(sig: int, frame: Any, _chained: Any = handler) -> None:
                    get_pool().kill_running()
                    _chained(sig, frame)

                signal.signal(signum, abort_then_chain)
    # Warm workers in the background: the first upload or inference should not wait for one.
    threading.Thread(target=get_pool().fill, name="sandbox-fill", daemon=True).start()
    try:
        yield
    finally:
        get_pool().kill_running()
        if threading.current_thread() is threading.main_thread():
            for number, restored in previous.items():
                signal.signal(number, restored)
