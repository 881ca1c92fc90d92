"""How uvicorn serves flplatform's websockets, in one place for ``flplatform serve``, the embedded
servers and the test and benchmark harnesses (in-process ``uvicorn.Config`` or ``python -m uvicorn``).

* ``websockets-sansio``: the supported implementation on top of the ``websockets`` package. uvicorn's
  ``websockets`` choice runs ``websockets.legacy``, deprecated since websockets 14 and due to go;
  ``auto`` has meant sansio only since uvicorn 0.50, so it is named here rather than left to a default.
* ``ws_max_size`` 64 MiB: broker frames above ``FLP_BROKER_MAX_MESSAGE_BYTES`` (10 MiB) get an error
  ack from the broker, which needs them to reach it; only frames above this limit close the socket
  (1009). uvicorn's default of 16 MiB would close on 16-64 MiB frames instead.
* Keepalive: a ping every 20 s and 20 s to answer it, so a consumer whose host vanished (no TCP close)
  is disconnected and the broker's leave bookkeeping runs (dasf-protocol.md §3). These are uvicorn's
  defaults, named because the broker relies on them (sansio has had them since uvicorn 0.44).
"""

from __future__ import annotations

from typing import Any

WS_IMPLEMENTATION = "websockets-sansio"
WS_MAX_SIZE = 64 * 1024**2
WS_PING_INTERVAL = 20.0
WS_PING_TIMEOUT = 20.0


def uvicorn_ws_options(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` / ``uvicorn.run``."""
    return {
        "ws": WS_IMPLEMENTATION,
        "ws_max_size": WS_MAX_SIZE,
        "ws_ping_interval": WS_PING_INTERVAL,
        "ws_ping_timeout": WS_PING_TIMEOUT,
        **overrides,
    }


def uvicorn_ws_cli_args() -> list[str]:
    """The same settings as ``python -m uvicorn`` options."""
    return [
        "--ws",
        WS_IMPLEMENTATION,
        "--ws-max-size",
        str(WS_MAX_SIZE),
        "--ws-ping-interval",
        str(WS_PING_INTERVAL),
        "--ws-ping-timeout",
        str(WS_PING_TIMEOUT),
    ]
