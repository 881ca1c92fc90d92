"""Models: upload, download (any round), client updates, metrics, preprocessing, SWAG moments.

Wire-compatible with the DLR platform's clients (multipart field names, messages, 201 codes).
HTTP only: single models arrive checked by the dependencies of
:mod:`flplatform.models.dependencies`; client updates, test metrics and SWAG statistics go to
the trainings domain's round rules (:mod:`flplatform.trainings.contributions`).
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile, status
from fastapi.responses import Response
from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.blobs.http import blob_download
from flplatform.db import SessionDep
from flplatform.errors import BadRequest, Unprocessable, UnsupportedMediaType, responses
from flplatform.kit.schemas import MAX_LIMIT, Detail, Limit, Offset, RequestSchema, SafeStr, text_problem
from flplatform.models import service as model_service
from flplatform.models.dependencies import DeletableModel, ReadableModel, VisibleModel
from flplatform.models.schemas import (
    MetricRead,
    MetricsAccepted,
    ModelRead,
    ModelUploaded,
    SwagAccepted,
    UpdateAccepted,
)
from flplatform.models.service import MetricFilter
from flplatform.orm import SWAGModel, User
from flplatform.permissions import Requester
from flplatform.trainings import contributions
from flplatform.trainings.sweeper import advance_after_commit, advance_after_update

router = APIRouter(prefix="/api/models", tags=["models"])

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


def _blob_responses(what: str) -> dict[int | str, dict[str, Any]]:
    """A blob download's documented answers: 200, 206 (a range), 304 (If-None-Match) and errors."""
    partial: dict[str, Any] = {"content": {OCTET: {}}, "description": "The requested byte range"}
    ok: dict[str, Any] = {"content": {OCTET: {}}, "description": what}
    return {200: ok, 206: partial, 304: {"description": "Not modified"}, **responses(401, 403, 404, 416)}


_DOWNLOAD_HEADERS = (
    " Stored bytes are streamed with `ETag` = their SHA-256 (`If-None-Match` → 304, nothing sent) and single "
    "`Range` requests (206; 416 past the end)."
)


def _user(requester: Requester) -> User:
    assert requester.user is not None
    return requester.user


async def _file_bytes(value: Any) -> bytes | None:
    if isinstance(value, StarletteUploadFile):
        return await value.read()
    return None


_UPLOAD_FORM = {
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


@router.get(
    "/",
    response_model=list[ModelRead],
    summary="List the models I may read",
    description="Every model the caller may read (never the weights): their own, those of the trainings "
    "they act in or take part in (with the local updates of those trainings), and for organisation "
    "admins and organisation coaches every model of the organisation; superusers see all. Never "
    "another organisation's (docs/permissions.md).",
    responses=responses(401),
)
async def list_models(requester: AuthenticatedRequester) -> list[ModelRead]:
    return await model_service.describe_many(requester.session, await model_service.list_models(requester))


@router.post(
    "/",
    response_model=ModelUploaded,
    status_code=status.HTTP_201_CREATED,
    summary="Upload a global model",
    description="Multipart: `name`, `description`, `model_file` (a **TorchScript** archive; pickled modules are "
    "refused), optional `type` (GLOBAL, SWAG, MEAN; unknown → GLOBAL as the reference), `round`, repeated "
    "`input_shape`, `model_preprocessing_file` (TorchScript). `type=MEAN` takes `models` (ids of global models the "
    "caller may read) instead of a file, also as a JSON body. Divergence: malformed uploads get one error shape.",
    responses=responses(400, 401, 403, 404, 413, 415, 422),
    openapi_extra=_UPLOAD_FORM,
)
async def upload_model(request: Request, requester: AuthenticatedRequester) -> ModelUploaded:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = MeanModelCreate.model_validate_json(await request.body())
        except ValidationError as exc:
            raise Unprocessable(
                "Invalid MEAN model body: " + "; ".join(e["msg"] for e in exc.errors()[:5])
            ) from None
        if body.type.upper() != "MEAN":
            raise BadRequest(
                "JSON bodies are only for type=MEAN; upload other models as multipart with model_file."
            )
        upload = model_service.GlobalUpload(
            name=body.name,
            description=body.description,
            type="MEAN",
            round=body.round,
            input_shape=body.input_shape,
            model_file=None,
            preprocessing_file=None,
            members=body.models,
        )
    elif content_type.startswith("multipart/form-data") or content_type.startswith(
        "application/x-www-form-urlencoded"
    ):
        form = await request.form()
        name = clean_text(str(form.get("name") or "").strip(), "name")
        if not name:
            raise BadRequest("`name` is required.", code="missing_field")
        if "description" not in form:
            raise BadRequest("`description` is required.", code="missing_field")
        description = clean_text(str(form.get("description") or ""), "description")
        kind = str(form.get("type") or "GLOBAL").upper()
        if kind not in ("GLOBAL", "SWAG", "MEAN"):
            kind = "GLOBAL"
        try:
            round_ = int(str(form.get("round") or 0))
        except ValueError:
            raise BadRequest("`round` must be an integer.", code="invalid_round") from None
        if not 0 <= round_ <= MAX_INT:
            raise BadRequest(f"`round` must be between 0 and {MAX_INT}.", code="invalid_round")
        members_raw = [str(v) for v in form.getlist("models")]
        if len(members_raw) == 1 and members_raw[0].strip().startswith("["):
            try:
                members_raw = [str(v) for v in json.loads(members_raw[0])]
            except (json.JSONDecodeError, TypeError, RecursionError):
                raise BadRequest(
                    "`models` must be model ids (repeated, or one JSON list).", code="invalid_models"
                ) from None
        try:
            members = [uuid.UUID(v.strip()) for v in members_raw if v.strip()]
        except ValueError:
            raise BadRequest("`models` must be model ids.", code="invalid_models") from None
        upload = model_service.GlobalUpload(
            name=name[:200],
            description=description,
            type=kind,
            round=round_,
            input_shape=parse_input_shape([str(v) for v in form.getlist("input_shape")]),
            model_file=await _file_bytes(form.get("model_file")),
            preprocessing_file=await _file_bytes(form.get("model_preprocessing_file")),
            members=members,
        )
    else:
        raise UnsupportedMediaType(
            "Only Content-Type 'multipart/form-data' (or 'application/json' for MEAN) is supported."
        )
    model = await model_service.create_global_model(requester, upload)
    return ModelUploaded(model_id=model.id)


@router.get(
    "/{model_id}/",
    summary="Download a model",
    description="The model as a TorchScript archive (`application/octet-stream`, "
    '`Content-Disposition: filename="model-{id}.pt"`). `?round=N` returns the global weights of round N '
    "(every round is kept; the reference overwrote them). Local updates (stored as safetensors) are returned as "
    "TorchScript with the global architecture, so FedDC clients can continue from them. SWAG models download "
    "fine (the reference answered 500). Readable by the owner, the training's actor and participants and the "
    "organisation's admins/coaches; 404 for anyone else (403 between organisation-less users, as the reference)."
    + _DOWNLOAD_HEADERS,
    response_class=Response,
    responses=_blob_responses("TorchScript archive"),
)
async def download_model(
    request: Request,
    requester: AuthenticatedRequester,
    model: ReadableModel,
    round: Annotated[
        int | None, Query(ge=0, le=MAX_INT, description="A past round of a global model.")
    ] = None,  # noqa: A002
) -> Response:
    suffix = "" if round is None else f"-round-{round}"
    filename = f"model-{model.id}{suffix}.pt"
    digest = await model_service.download_digest(requester.session, model, round)
    if digest is not None:
        return await blob_download(request, requester.session, digest, filename)
    data = await model_service.download(requester.session, model, round)
    return Response(data, media_type=OCTET, headers={"Content-Disposition": f'filename="{filename}"'})


@router.get(
    "/{model_id}/info/",
    response_model=ModelRead,
    summary="Describe a model",
    description="JSON description (type, owner, round, rounds with stored history, input shape…).",
    responses=responses(401, 403, 404),
)
async def describe_model(session: SessionDep, model: ReadableModel) -> ModelRead:
    return await model_service.describe(session, model)


@router.post(
    "/{model_id}/",
    response_model=UpdateAccepted,
    status_code=status.HTTP_201_CREATED,
    summary="Upload a client update",
    description="Participants upload their update for the current round: `model_file` (TorchScript, safetensors "
    "or `torch.save` of a state dict; pickled modules refused), `round`, `sample_size`, optional repeated "
    "`metric_names`/`metric_values` (kept on the local model). The update must match the global model (names, "
    "shapes, dtypes, finite). A re-upload for the same round replaces the earlier one. When every current "
    "participant has uploaded, the round aggregates. FedDC clients may post to the local model id they were "
    "sent; it resolves to the training's global model.",
    responses=responses(400, 401, 403, 404, 409, 413, 422),
)
async def upload_update(
    session: SessionDep,
    requester: AuthenticatedRequester,
    request: Request,
    model: VisibleModel,
    model_file: Annotated[UploadFile, File(description="The update.")],
    round: Annotated[int, Form(ge=0, le=MAX_INT)],  # noqa: A002
    sample_size: Annotated[int, Form(ge=0, le=MAX_INT)],
    metric_names: Annotated[list[SafeStr], Form()] = [],  # noqa: B006
    metric_values: Annotated[list[str], Form()] = [],  # non-numeric values are stored as bytes  # noqa: B006
) -> UpdateAccepted:
    data = await model_file.read()
    local, training = await contributions.add_update(
        session,
        _user(requester),
        model,
        data=data,
        round_=round,
        sample_size=sample_size,
        metric_names=metric_names,
        metric_values=metric_values,
    )
    advance_after_update(request.app, session, training.id)
    return UpdateAccepted(model_id=local.id, round=local.round)


@router.delete(
    "/{model_id}/",
    response_model=Detail,
    summary="Delete a model",
    description="The owner, or the actor of the model's training. Deleting a global model deletes its "
    "training (as the reference); a model backing a running training must be stopped first (409).",
    responses=responses(401, 403, 404, 409),
)
async def delete_model(session: SessionDep, model: DeletableModel) -> Detail:
    await model_service.delete_model(session, model)
    return Detail(detail="Model removed!")


@router.get(
    "/{model_id}/metrics/",
    response_model=list[MetricRead],
    summary="List a model's metrics",
    description="The model's metric rows the caller may read, oldest first (binary values base64), filtered by "
    "`key`, `step` and `reporter`; `limit`/`offset` page them (the default page holds the most a page may) and "
    "`X-Total-Count` carries the total. Per-round series of a whole training: `GET /api/trainings/{id}/metrics/`.",
    responses=responses(401, 403, 404, 422),
)
async def get_metrics(
    requester: AuthenticatedRequester,
    response: Response,
    model: ReadableModel,
    key: Annotated[str | None, Query(max_length=128)] = None,
    step: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
    reporter: uuid.UUID | None = None,
    limit: Limit = MAX_LIMIT,
    offset: Offset = 0,
) -> list[MetricRead]:
    rows, total = await model_service.list_metrics(
        requester, model, MetricFilter(key, step, reporter), limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return rows


@router.post(
    "/{model_id}/metrics/",
    response_model=MetricsAccepted,
    status_code=status.HTTP_201_CREATED,
    summary="Report metrics",
    description="Repeated multipart `metric_names` and `metric_values` (same length), stored at step = the model's "
    "round. On a training's global model during a test round these are the participant's test results; the test "
    "round ends once every participant reported (distinct reporters). Only participants (and the actor) report "
    "on a training's models (the reference let anyone).",
    responses=responses(400, 401, 403, 404, 422),
)
async def post_metrics(
    session: SessionDep,
    requester: AuthenticatedRequester,
    request: Request,
    model: VisibleModel,
    metric_names: Annotated[list[SafeStr], Form()] = [],  # noqa: B006
    metric_values: Annotated[list[str], Form()] = [],  # non-numeric values are stored as bytes  # noqa: B006
) -> MetricsAccepted:
    training = await contributions.add_metrics(session, _user(requester), model, metric_names, metric_values)
    if training is not None:
        advance_after_commit(request.app, session, training.id)
    return MetricsAccepted(model_id=model.id)


@router.get(
    "/{model_id}/preprocessing/",
    summary="Download the preprocessing module",
    response_class=Response,
    description="TorchScript preprocessing module of the global model (of the base model for a local model)."
    + _DOWNLOAD_HEADERS,
    responses=_blob_responses("TorchScript archive"),
)
async def get_preprocessing(request: Request, session: SessionDep, model: ReadableModel) -> Response:
    digest = await model_service.preprocessing_digest(session, model)
    return await blob_download(request, session, digest, f"model-{model.id}-preprocessing.pt")


@router.post(
    "/{model_id}/preprocessing/",
    response_model=Detail,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Upload a preprocessing module",
    description="Owner only. Multipart `model_preprocessing_file` (TorchScript). 202 as the reference (typo fixed: "
    '"Preprocessing Model Upload Accepted").',
    responses=responses(400, 401, 403, 404, 422),
)
async def post_preprocessing(
    requester: AuthenticatedRequester,
    model: VisibleModel,
    model_preprocessing_file: Annotated[UploadFile, File()],
) -> Detail:
    await model_service.set_preprocessing(requester, model, await model_preprocessing_file.read())
    return Detail(detail="Preprocessing Model Upload Accepted")


@router.post(
    "/{model_id}/swag/",
    response_model=SwagAccepted,
    status_code=status.HTTP_201_CREATED,
    summary="Upload SWAG statistics",
    description="Participants, training in state S. Multipart `round`, `sample_size`, `first_moment_file`, "
    "`second_moment_file`: flat 1-D float tensors in `net.parameters()` order, as safetensors (one tensor), a "
    "TorchScript module holding one tensor, or `torch.save(tensor)` (read with weights_only); never pickles. "
    "Stored apart from test metrics; when every participant sent them the server averages them weighted by "
    "sample size into the SWAG model, then continues (test round, next round or finish).",
    responses=responses(400, 401, 403, 404, 409, 413, 422),
)
async def post_swag(
    session: SessionDep,
    requester: AuthenticatedRequester,
    request: Request,
    model: VisibleModel,
    round: Annotated[int, Form(ge=0, le=MAX_INT)],  # noqa: A002
    sample_size: Annotated[int, Form(ge=0, le=MAX_INT)],
    first_moment_file: Annotated[UploadFile, File()],
    second_moment_file: Annotated[UploadFile, File()],
) -> SwagAccepted:
    training = await contributions.add_swag_statistics(
        session,
        _user(requester),
        model,
        round_=round,
        sample_size=sample_size,
        first=await first_moment_file.read(),
        second=await second_moment_file.read(),
    )
    advance_after_commit(request.app, session, training.id)
    return SwagAccepted(round=round)


@router.get(
    "/{model_id}/swag/",
    summary="Download aggregated SWAG moments",
    response_class=Response,
    description="`?moment=first|second`: the SWAG model's aggregated moment as safetensors (key `moment`)."
    + _DOWNLOAD_HEADERS,
    responses=_blob_responses("safetensors"),
)
async def get_swag(
    request: Request,
    session: SessionDep,
    model: ReadableModel,
    moment: Annotated[str, Query(pattern="^(first|second)$")] = "first",
) -> Response:
    if not isinstance(model, SWAGModel):
        raise BadRequest(f"Model {model.id} is not a SWAG model.")
    digest = await model_service.swag_moment_digest(session, model, moment)
    return await blob_download(request, session, digest, f"model-{model.id}-swag-{moment}.safetensors")
