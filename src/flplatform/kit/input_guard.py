"""The text rule (``kit.schemas.check_text``) for what arrives outside a body: the path, the
query string and header values, of every HTTP request and websocket handshake, before routing.

One ASGI middleware instead of one annotation per parameter, so a route added tomorrow is covered
too: a NUL (``%00``) in a path or query answered 500 on PostgreSQL (slugs, periods, names are
looked up in the database). HTTP gets a 422 in the error shape; a websocket handshake is refused
(HTTP 403, as for any refused handshake).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from flplatform.errors import Unprocessable, error_response
from flplatform.kit.schemas import text_problem


def require_text(value: str, where: str) -> str:
    """The text rule for values parsed by hand (credentials): a 422 in the error shape."""
    problem = text_problem(value)
    if problem:
        raise Unprocessable(f"{where} {problem}.", code="invalid_text")
    return value


def scope_problem(scope: Scope) -> tuple[list[str], str] | None:
    """``(loc, message)`` for the first offending part of the request line or headers."""
    problem = text_problem(scope.get("path", ""))
    if problem:
        return ["path"], f"The path {problem}."
    query = scope.get("query_string", b"")
    if query:
        for name, value in parse_qsl(
            query.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="replace"
        ):
            for part in (name, value):
                problem = text_problem(part)
                if problem:
                    return ["query", name], f"Query parameter {name!r} {problem}."
    for name, value in scope.get("headers", ()):
        if b"\x00" in value:
            header = name.decode("latin-1")
            return ["header", header], f"Header {header!r} contains a NUL character."
    return None


class InputGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            found = scope_problem(scope)
            if found is not None:
                loc, message = found
                if scope["type"] == "websocket":
                    await receive()  # websocket.connect
                    await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
                    return
                response = error_response(
                    422,
                    message,
                    "validation_error",
                    errors=[{"loc": loc, "msg": message, "type": "invalid_text"}],
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
