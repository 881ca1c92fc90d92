"""Finishing touches on the generated OpenAPI document, so that Swagger UI and ReDoc show what the
server really answers.

Every 4xx/5xx response of every operation is documented in the project's error shape
(``ErrorBody``, see ``errors.py``) with an example of *its* status — FastAPI's automatic 422
(``HTTPValidationError``, a shape this server never sends) included. An operation that declares
its own example keeps it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

ERROR_SCHEMA_REF = "#/components/schemas/ErrorBody"

ERROR_EXAMPLES: dict[int, dict[str, Any]] = {
    400: {"detail": "Malformed JSON body.", "code": "malformed_json"},
    401: {"detail": "Authentication credentials were not provided.", "code": "not_authenticated"},
    402: {
        "detail": "Insufficient balance: the round needs 1.20 USD, 0.35 USD is available.",
        "code": "payment_required",
    },
    403: {
        "detail": "Only the training's actor (or an organisation admin) may do this.",
        "code": "permission_denied",
    },
    404: {"detail": "Model 5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10 not found.", "code": "not_found"},
    405: {"detail": "Method Not Allowed", "code": "method_not_allowed"},
    406: {"detail": "Not Acceptable", "code": "not_acceptable"},
    409: {"detail": "A user with username 'client-1' already exists.", "code": "conflict"},
    413: {"detail": "Request body larger than 2147483648 bytes.", "code": "payload_too_large"},
    415: {
        "detail": "Only Content-Type 'multipart/form-data' is supported.",
        "code": "unsupported_media_type",
    },
    416: {"detail": "The range starts past the end (10240 bytes).", "code": "range_not_satisfiable"},
    422: {
        "detail": "Invalid request: target_num_updates: Input should be greater than or equal to 1",
        "code": "validation_error",
        "errors": [
            {
                "loc": ["body", "target_num_updates"],
                "msg": "Input should be greater than or equal to 1",
                "type": "greater_than_equal",
            }
        ],
    },
    429: {"detail": "Too many requests; retry later.", "code": "too_many_requests"},
    500: {"detail": "Internal server error.", "code": "internal_error"},
    503: {"detail": "The database is not reachable.", "code": "service_unavailable"},
}

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def error_example(status: int) -> dict[str, Any]:
    return ERROR_EXAMPLES.get(status, {"detail": "Request failed.", "code": "error"})


def _is_error_status(code: str) -> bool:
    return code.isdigit() and int(code) >= 400


def document_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``spec`` in place (and return it): error responses in ErrorBody with per-status examples."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for code, response in operation.get("responses", {}).items():
                if not _is_error_status(code):
                    continue
                media = response.setdefault("content", {}).setdefault("application/json", {})
                ref = media.get("schema", {}).get("$ref", "")
                if not ref or ref.rsplit("/", 1)[-1] in _FASTAPI_VALIDATION_SCHEMAS:
                    media["schema"] = {"$ref": ERROR_SCHEMA_REF}
                if "example" not in media and "examples" not in media:
                    media["example"] = error_example(int(code))
    schemas = spec.get("components", {}).get("schemas", {})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        if name in schemas:
            rest = {k: v for k, v in schemas.items() if k != name}
            if f'"#/components/schemas/{name}"' not in json.dumps({"paths": spec["paths"], "schemas": rest}):
                del schemas[name]
    return spec


def install_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
