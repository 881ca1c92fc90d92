"""The models routes' request bodies: the DLR upload forms' rules, and the multipart bodies the
routes stream themselves (:mod:`flplatform.blobs.multipart`) declared for OpenAPI as FastAPI
generated them when it parsed these forms (Swagger UI shows the same fields), with their text
fields validated into the same 422 items.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.blobs.multipart import StreamedForm
from flplatform.errors import BadRequest
from flplatform.kit.schemas import RequestSchema, SafeStr, text_problem

OCTET = "application/octet-stream"
# Rounds, sample sizes and shape dimensions are 32-bit INTEGER columns on PostgreSQL: larger
# values are refused here (4xx) instead of failing in the database (500).
MAX_INT = 2**31 - 1


def clean_text(value: str, field: str) -> str:
    """The text rule (``kit.schemas``) for the hand-parsed upload form; a 400 there, as the DLR
    reference answers every upload form error."""
    problem = text_problem(value)
    if problem:
        raise BadRequest(f"`{field}` {problem}.", code="invalid_text")
    return value


class MeanModelCreate(RequestSchema):
    """JSON body for ``type=MEAN`` (no file: the members are existing global models)."""

    name: Annotated[str, Field(min_length=1, max_length=200, pattern="^[^\x00]*$")]
    description: Annotated[str, Field(pattern="^[^\x00]*$")] = ""
    type: str = "MEAN"
    models: list[uuid.UUID] = Field(min_length=1)
    input_shape: list[Annotated[int, Field(ge=0, le=MAX_INT)] | None] | None = None
    round: Annotated[int, Field(ge=0, le=MAX_INT)] = 0


def parse_input_shape(values: list[str]) -> list[int | None] | None:
    """Repeated ``input_shape`` fields: ints, or ``None``/``null`` for free dimensions (a JSON
    list in one field works too). A single ``None`` or nothing means no shape."""
    if len(values) == 1 and values[0].strip().startswith("["):
        try:
            values = [("null" if v is None else str(v)) for v in json.loads(values[0])]
        except (json.JSONDecodeError, TypeError, RecursionError):
            raise BadRequest("input_shape: not a JSON list.", code="invalid_input_shape") from None
    shape: list[int | None] = []
    for value in values:
        text = str(value).strip()
        if text.lower() in ("none", "null", ""):
            shape.append(None)
            continue
        try:
            dim = int(text)
        except ValueError:
            raise BadRequest(
                f"input_shape: {text!r} is neither an integer nor None.", code="invalid_input_shape"
            ) from None
        if not 0 <= dim <= MAX_INT:
            raise BadRequest(
                f"input_shape: dimensions must be between 0 and {MAX_INT}.", code="invalid_input_shape"
            )
        shape.append(dim)
    if not shape or shape == [None]:
        return None
    return shape


_INT_FIELD = {"type": "integer", "maximum": float(MAX_INT), "minimum": 0.0}  # as pydantic writes them
_BINARY = {"type": "string", "contentMediaType": OCTET}
_TEXT_LIST = {"items": {"type": "string"}, "type": "array", "default": []}


def multipart_body(title: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """``openapi_extra`` declaring a multipart body the route streams itself (Swagger UI shows the
    fields; FastAPI parses nothing): the schema FastAPI generated when it parsed these forms."""
    schema = {"properties": properties, "type": "object", "required": required, "title": title}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def end_read(session: AsyncSession) -> None:
    """End the request's read-only transaction before a long body streams in: no pooled database
    connection (or row lock) is held while the client sends gigabytes. Nothing is written yet, so
    this commit publishes nothing; the request's session begins a new transaction when it is next
    used, and the session dependency commits that one as usual."""
    await session.commit()


def _missing(name: str) -> dict[str, Any]:
    return {"type": "missing", "loc": ("body", name), "msg": "Field required", "input": None}


def form_fields(
    form: StreamedForm, model: type[BaseModel], files: tuple[str, ...], lists: tuple[str, ...] = ()
):  # noqa: ANN202
    """The streamed form's text fields validated as FastAPI validated its ``Form()`` parameters
    (same 422 items), and 422 items for required files that are absent."""
    values: dict[str, Any] = {}
    for name in model.model_fields:
        if name in lists:
            if name in form.fields:
                values[name] = form.getlist(name)
        elif name in form.fields:
            values[name] = form.get(name)
    errors: list[dict[str, Any]] = []
    parsed = None
    try:
        parsed = model.model_validate(values)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    errors += [_missing(name) for name in files if form.file(name) is None]
    if errors or parsed is None:
        raise RequestValidationError(errors)
    return parsed


class UpdateFields(BaseModel):
    round: Annotated[int, Field(ge=0, le=MAX_INT)]
    sample_size: Annotated[int, Field(ge=0, le=MAX_INT)]
    metric_names: list[SafeStr] = []
    metric_values: list[str] = []  # non-numeric values are stored as bytes


class NoFields(BaseModel):
    pass


class SwagFields(BaseModel):
    round: Annotated[int, Field(ge=0, le=MAX_INT)]
    sample_size: Annotated[int, Field(ge=0, le=MAX_INT)]


UPDATE_BODY = multipart_body(
    "Body_upload_update_api_models__model_id___post",
    {
        "model_file": {**_BINARY, "title": "Model File", "description": "The update."},
        "round": {**_INT_FIELD, "title": "Round"},
        "sample_size": {**_INT_FIELD, "title": "Sample Size"},
        "metric_names": {**_TEXT_LIST, "title": "Metric Names"},
        "metric_values": {**_TEXT_LIST, "title": "Metric Values"},
    },
    ["model_file", "round", "sample_size"],
)
PREPROCESSING_BODY = multipart_body(
    "Body_post_preprocessing_api_models__model_id__preprocessing__post",
    {"model_preprocessing_file": {**_BINARY, "title": "Model Preprocessing File"}},
    ["model_preprocessing_file"],
)
SWAG_BODY = multipart_body(
    "Body_post_swag_api_models__model_id__swag__post",
    {
        "round": {**_INT_FIELD, "title": "Round"},
        "sample_size": {**_INT_FIELD, "title": "Sample Size"},
        "first_moment_file": {**_BINARY, "title": "First Moment File"},
        "second_moment_file": {**_BINARY, "title": "Second Moment File"},
    },
    ["round", "sample_size", "first_moment_file", "second_moment_file"],
)


UPLOAD_FORM = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "description", "model_file"],
                    # Examples are what Swagger UI's "Try it out" sends: each must be accepted as it is.
                    "properties": {
                        "name": {"type": "string", "example": "digits-cnn"},
                        "description": {"type": "string", "example": "8x8 digits CNN"},
                        "type": {"type": "string", "enum": ["GLOBAL", "SWAG", "MEAN"], "default": "GLOBAL"},
                        "round": {"type": "integer", "default": 0},
                        # One JSON list here (Swagger UI would join a list into one comma-separated field);
                        # clients may also repeat the field, one dimension each.
                        "input_shape": {
                            "type": "string",
                            "example": "[null, 4]",
                            "description": "The model's input shape as a JSON list, null for free "
                            "dimensions (e.g. the batch); or the field repeated, one int or None each.",
                        },
                        "model_file": {
                            "type": "string",
                            "format": "binary",
                            "description": "TorchScript archive (torch.jit.save).",
                        },
                        "model_preprocessing_file": {
                            "type": "string",
                            "format": "binary",
                            "description": "Optional TorchScript preprocessing module.",
                        },
                        # No example: an invented id would point nowhere.
                        "models": {
                            "type": "string",
                            "description": "type=MEAN only, instead of model_file: ids of "
                            "the member global models as a JSON list, or the field repeated, one id each.",
                        },
                    },
                }
            },
            "application/json": {"schema": MeanModelCreate.model_json_schema()},
        },
        "required": True,
    }
}
