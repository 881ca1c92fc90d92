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

from fastapi import Form, Query, Request, status
from fastapi.responses import Response
from pydantic import ValidationError

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.blobs import store_for
from flplatform.blobs.http import blob_download
from flplatform.blobs.multipart import StreamedForm, stream_form
from flplatform.db import SessionDep
from flplatform.errors import BadRequest, Unprocessable, UnsupportedMediaType, responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import MAX_LIMIT, Detail, Limit, Offset, SafeStr
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
from flplatform.models.update_header import GuardedInspector, UpdateInspector, small_body
from flplatform.orm import SWAGModel, User
from flplatform.permissions import Requester
from flplatform.routers.model_forms import (
    MAX_INT,
    OCTET,
    PREPROCESSING_BODY,
    SWAG_BODY,
    UPDATE_BODY,
    UPLOAD_FORM,
    MeanModelCreate,
    NoFields,
    SwagFields,
    UpdateFields,
    clean_text,
    end_read,
    form_fields,
    parse_input_shape,
)
from flplatform.trainings import contributions
from flplatform.trainings.sweeper import advance_after_commit, advance_after_update

router = APIRouter(prefix="/api/models", tags=["models"])


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


@router.get(
    "/",
    response_model=list[ModelRead],
    summary="List the models I may read",
    description="Every model the caller may read (never the weights): their own, those of the trainings "
    "they act in or take part in (with the local updates of those trainings), and for organisation "
    "admins and organisation coaches every model of the organisation; superusers see all. Never "
    "another organisation's (docs/permissions.md). Oldest first; `limit`/`offset` page them (the default "
    "page holds the most a page may) and `X-Total-Count` carries the total.",
    responses=responses(401, 422),
)
async def list_models(
    requester: AuthenticatedRequester, response: Response, limit: Limit = MAX_LIMIT, offset: Offset = 0
) -> list[ModelRead]:
    rows, total = await model_service.list_models(requester, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return await model_service.describe_many(requester.session, rows)


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
    openapi_extra=UPLOAD_FORM,
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
        # Streamed: the files go to the blob store's spool as they arrive (never whole in memory).
        await end_read(requester.session)
        form = await stream_form(request, store_for(requester.session))
        async with form:
            model = await model_service.create_global_model(requester, _global_upload(form))
        return ModelUploaded(model_id=model.id)
    else:
        raise UnsupportedMediaType(
            "Only Content-Type 'multipart/form-data' (or 'application/json' for MEAN) is supported."
        )
    model = await model_service.create_global_model(requester, upload)
    return ModelUploaded(model_id=model.id)


def _global_upload(form: StreamedForm) -> model_service.GlobalUpload:
    """The upload form of ``POST /api/models/`` (DLR field names; errors are 400s as the reference's)."""
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
    return model_service.GlobalUpload(
        name=name[:200],
        description=description,
        type=kind,
        round=round_,
        input_shape=parse_input_shape([str(v) for v in form.getlist("input_shape")]),
        model_file=form.file("model_file"),
        preprocessing_file=form.file("model_preprocessing_file"),
        members=members,
    )


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
    openapi_extra=UPDATE_BODY,
)
async def upload_update(
    session: SessionDep,
    requester: AuthenticatedRequester,
    request: Request,
    model: VisibleModel,
) -> UpdateAccepted:
    user = _user(requester)
    layout = None
    if not small_body(request.headers):
        # A large (or chunked) body: the round rules and the global model's layout first (a
        # refused caller sends no body), then the body streams into the store's spool, its first
        # bytes checked against that layout, with no database connection held meanwhile.
        layout = await contributions.update_layout(session, user, model)
        await end_read(session)
    form = await stream_form(
        request,
        store_for(session),
        inspectors={"model_file": lambda: GuardedInspector(UpdateInspector(layout))},
    )
    async with form:
        fields = form_fields(form, UpdateFields, ("model_file",), lists=("metric_names", "metric_values"))
        part = form.file("model_file")
        assert part is not None and isinstance(part.inspector, GuardedInspector)
        local_id, training, still_open = await contributions.add_update(
            session,
            user,
            model,
            upload=part,
            inspector=part.inspector.inner,
            round_=fields.round,
            sample_size=fields.sample_size,
            metric_names=fields.metric_names,
            metric_values=fields.metric_values,
        )
        size = part.size
    advance_after_update(request.app, session, training.id, size, still_open)
    return UpdateAccepted(model_id=local_id, round=fields.round)


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
    responses=responses(400, 401, 403, 404, 413, 422),
    openapi_extra=PREPROCESSING_BODY,
)
async def post_preprocessing(
    request: Request,
    requester: AuthenticatedRequester,
    model: VisibleModel,
) -> Detail:
    await model_service.ensure_may_set_preprocessing(requester, model)
    await end_read(requester.session)
    async with await stream_form(request, store_for(requester.session)) as form:
        form_fields(form, NoFields, ("model_preprocessing_file",))
        part = form.file("model_preprocessing_file")
        assert part is not None
        await model_service.set_preprocessing(requester, model, part)
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
    openapi_extra=SWAG_BODY,
)
async def post_swag(
    session: SessionDep,
    requester: AuthenticatedRequester,
    request: Request,
    model: VisibleModel,
) -> SwagAccepted:
    await end_read(session)
    async with await stream_form(request, store_for(session)) as form:
        fields = form_fields(form, SwagFields, ("first_moment_file", "second_moment_file"))
        first, second = form.file("first_moment_file"), form.file("second_moment_file")
        assert first is not None and second is not None
        # Moments are one float per parameter: read from the spool for the flat-tensor checks.
        training = await contributions.add_swag_statistics(
            session,
            _user(requester),
            model,
            round_=fields.round,
            sample_size=fields.sample_size,
            first=await first.read(),
            second=await second.read(),
        )
    advance_after_commit(request.app, session, training.id)
    return SwagAccepted(round=fields.round)


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
