"""One error shape for every 4xx/5xx response, and the exceptions services raise.

Body: ``{"detail": "<human message>", "code": "<machine code>"}``; validation errors add
``"errors": [{"loc": [...], "msg": "...", "type": "..."}]``. ``detail`` is where FastAPI
clients and the DLR clients look for the message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The error shape of every failed request."""

    detail: str
    code: str
    errors: list[ErrorItem] | None = None
    # No example here: each response carries one of its own status (flplatform.openapi).


class AppError(Exception):
    status_code: int = status.HTTP_400_BAD_REQUEST
    code: str = "bad_request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.headers = headers
        self.extra = extra  # further fields of the body, e.g. OAuth2's error/error_description


class BadRequest(AppError):
    status_code, code = 400, "bad_request"


class Unauthorized(AppError):
    status_code, code = 401, "not_authenticated"

    def __init__(self, detail: str = "Authentication credentials were not provided.", **kw: Any):
        kw.setdefault("headers", {"WWW-Authenticate": 'Token realm="api", Basic realm="api"'})
        super().__init__(detail, **kw)


class PaymentRequired(AppError):
    status_code, code = 402, "payment_required"


class Forbidden(AppError):
    status_code, code = 403, "permission_denied"


class NotFound(AppError):
    status_code, code = 404, "not_found"


class Conflict(AppError):
    status_code, code = 409, "conflict"


class PayloadTooLarge(AppError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(AppError):
    status_code, code = 415, "unsupported_media_type"


class RangeNotSatisfiable(AppError):
    """416 for a ``Range`` outside the resource; ``size`` goes into ``Content-Range: bytes */size``."""

    status_code, code = 416, "range_not_satisfiable"

    def __init__(self, detail: str, *, size: int):
        super().__init__(detail, headers={"Content-Range": f"bytes */{size}"})


class Unprocessable(AppError):
    status_code, code = 422, "validation_error"


class TooManyRequests(AppError):
    """429; ``retry_after`` seconds go into the ``Retry-After`` header."""

    status_code, code = 429, "too_many_requests"

    def __init__(self, detail: str, *, retry_after: int, code: str | None = None):
        super().__init__(detail, code=code, headers={"Retry-After": str(max(1, int(retry_after)))})


class ServiceUnavailable(AppError):
    status_code, code = 503, "service_unavailable"


_HTTP_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "too_many_requests",
}


def error_response(
    status_code: int,
    detail: str,
    code: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"detail": _encodable(detail), "code": code}
    if errors is not None:
        body["errors"] = [
            {
                **e,
                "loc": [_encodable(p) if isinstance(p, str) else p for p in e.get("loc", ())],
                "msg": _encodable(str(e.get("msg", ""))),
            }
            for e in errors
        ]
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    return JSONResponse(body, status_code=status_code, headers=headers)


def _encodable(text: str) -> str:
    """Messages may quote input; a lone surrogate in it would make the error itself a 500."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _validation_items(exc: RequestValidationError) -> list[dict[str, Any]]:
    items = []
    for err in exc.errors():
        items.append(
            {
                "loc": [p if isinstance(p, (str, int)) else str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return items


def _summary(items: list[dict[str, Any]]) -> str:
    parts = []
    for item in items[:5]:
        where = ".".join(str(p) for p in item["loc"] if p not in ("body", "query", "path", "header", "form"))
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
    return "Invalid request: " + "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, exc.code, headers=exc.headers, extra=exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        items = _validation_items(exc)
        if any(i["type"] == "json_invalid" for i in items):
            return error_response(400, "Malformed JSON body.", "malformed_json", errors=items)
        return error_response(422, _summary(items), "validation_error", errors=items)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, detail, code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error.", "internal_error")


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries in the error shape, for route decorators."""
    return {
        code: {
            "model": ErrorBody,
            "description": f"{HTTPStatus(code).phrase} (`{_HTTP_CODES.get(code, 'error')}`)",
        }
        for code in codes
    }
