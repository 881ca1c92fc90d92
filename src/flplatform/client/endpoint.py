"""The participants' notification endpoint: a small Starlette app on uvicorn, like the DLR
client's HTTP handler. One endpoint can host several participants, each under its own path
(its ``message_endpoint`` URL).

When a participant has a signing key, the server's signature is checked before anything else:
``X-FLP-Signature`` = hex HMAC-SHA256 over ``f"{timestamp}.".encode() + body`` with the
timestamp from ``X-FLP-Timestamp`` (unsigned, badly signed or stale notifications → 401).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flplatform.client.embedded import EmbeddedServer
from flplatform.client.participant import Participant

log = logging.getLogger("flplatform.client")

SIGNATURE_HEADER = "X-FLP-Signature"
TIMESTAMP_HEADER = "X-FLP-Timestamp"
# Notifications are retried with back-off for well under this; older ones are replays.
MAX_SIGNATURE_AGE_SECONDS = 300.0


def expected_signature(key: bytes, timestamp: str, body: bytes) -> str:
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(
    key: bytes,
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    now: float | None = None,
    max_age: float = MAX_SIGNATURE_AGE_SECONDS,
) -> str | None:
    """None when ``signature`` is the server's signature of ``body``; otherwise why not."""
    if not signature or not timestamp:
        return f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header"
    try:
        sent_at = float(timestamp)
    except ValueError:
        return "malformed timestamp"
    if abs((now if now is not None else time.time()) - sent_at) > max_age:
        return "stale timestamp"
    given = signature.removeprefix("sha256=").strip().lower()
    if not hmac.compare_digest(given, expected_signature(key, timestamp, body)):
        return "bad signature"
    return None


class NotificationEndpoint:
    """``async with NotificationEndpoint(port=0) as ep: url = ep.add(participant)`` — then use
    ``url`` as the participant's ``message_endpoint``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, public_url: str | None = None):
        self._participants: dict[str, Participant] = {}
        app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])
        self._server = EmbeddedServer(app, host, port)
        self.public_url = (public_url or self._server.url).rstrip("/")

    @property
    def port(self) -> int:
        return self._server.port

    def add(self, participant: Participant, path: str | None = None) -> str:
        """Serve ``participant`` under ``path`` (default ``/<name>/``); returns its full URL."""
        path = "/" + (path if path is not None else participant.name).strip("/") + "/"
        path = "/" if path == "//" else path
        if path in self._participants:
            raise ValueError(f"path {path} is already served")
        self._participants[path] = participant
        return self.public_url + path

    async def _receive(self, request: Request) -> JSONResponse:
        path = request.url.path if request.url.path.endswith("/") else request.url.path + "/"
        participant = self._participants.get(path)
        if participant is None:
            return JSONResponse({"detail": f"no participant at {path}"}, status_code=404)
        body = await request.body()
        if participant.signing_key is not None:
            problem = verify_signature(
                participant.signing_key,
                body,
                request.headers.get(SIGNATURE_HEADER),
                request.headers.get(TIMESTAMP_HEADER),
            )
            if problem is not None:
                log.warning("%s: notification refused: %s", participant.name, problem)
                return JSONResponse({"detail": problem}, status_code=401)
        try:
            payload: Any = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"detail": "body is not JSON"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"detail": "body must be a JSON object"}, status_code=400)
        status, reason = await participant.handle_notification(payload)
        return JSONResponse({"detail": reason}, status_code=status)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    async def __aenter__(self) -> NotificationEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()
