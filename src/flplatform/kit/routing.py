"""``APIRouter`` that refuses a request from its path prefix alone.

FastAPI (0.165) matches a request against the routers included in the app one after the other,
and inside each against every route, one regular expression per route, until one matches: a
request for the last router included tries every route of every router before it (≈ 100 regular
expressions for ``/api/users/…``, ≈ 1 ms of CPU per request on this project's 2-core VMs). Every
route of a router with a prefix starts with it, so a path that does not start with the prefix's
literal part (up to its first ``{parameter}``) cannot match any of them: this router answers "no
match" after one string comparison. Routers included with a further prefix
(``include_router(router, prefix=…)``) must not use it (this project includes none so).
"""

from __future__ import annotations

from fastapi import APIRouter as FastAPIRouter
from starlette.routing import Match
from starlette.types import Scope


def route_path(scope: Scope) -> str:
    """The request's path below the app's ``root_path`` (what Starlette matches routes against)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


class APIRouter(FastAPIRouter):
    """``fastapi.APIRouter``, refusing without trying its routes a path outside its prefix."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        literal = self.prefix.partition("{")[0]
        if literal and scope["type"] in ("http", "websocket") and not route_path(scope).startswith(literal):
            return Match.NONE, {}
        return super().matches(scope)
