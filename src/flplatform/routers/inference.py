"""``POST /api/inference/`` and ``GET /api/models/{id}/metadata/``.

The inference route accepts JSON and multipart bodies, so it parses the body itself (a
FastAPI body parameter would fix one content type) and validates it with the same Pydantic
schema either way; the OpenAPI request body is declared by hand for both.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from flplatform.auth.dependencies import CurrentUser
from flplatform.auth.request_guard import body_limits
from flplatform.db import SessionDep
from flplatform.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, responses
from flplatform.inference import jobs as inference_jobs
from flplatform.inference import service as inference_service
from flplatform.inference.config import runtime_for
from flplatform.inference.dependencies import ReadableModel, SubmittedJob
from flplatform.inference.metadata import model_metadata
from flplatform.inference.requests import InferenceQuery
from flplatform.inference.responses import result_json, result_safetensors
from flplatform.inference.schemas import (
    INFERENCE_REQUEST_EXAMPLES,
    INFERENCE_RESPONSE_EXAMPLES,
    InferenceFields,
    InferenceJob,
    InferenceJobStatus,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ReturnFormat,
)
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Limit, Offset
from flplatform.orm.base import utcnow
from flplatform.orm.workqueue import WorkKind

router = APIRouter()

INFERENCE_WORK = "inference.request"  # QueuedWork.handler of the inference Work rows (see workqueue)

INFERENCE_DESCRIPTION = r"""
Run a model you may read — a **global**, **mean** (ensemble) or **SWAG** model, with or without a
training — on a batch of inputs and get its prediction with uncertainty.

**Body**: `application/json` or `multipart/form-data` (also urlencoded forms; anything else: 415) with
`model_id`, `model_input`, optional `return_format` (`json` | `binary`; default `json` for JSON
bodies, `binary` for multipart), `return_scores` (default `false`, see **Output**),
`uncertainty_method` (`NONE` | `ENSEMBLE` | `MC_DROPOUT` | `SWAG`; default: the method of the
model's training, else `NONE`) and `options` (in multipart: a JSON string): `N` (samples,
default 10, the training's `options.uncertainty` supplies defaults), `softmax`, `seed`, and for
SWAG `min_var` and `scale`; `round` runs an earlier round's global weights from the model's
history. A DLR client's request (`model_id`, `model_input`, `return_format`) gets the DLR
reference server's answer.

**model_input**: a nested JSON list of numbers (float32); or the bytes of a **safetensors** file
(tensor `model_input` or the only tensor), a NumPy **.npy** file (numeric dtypes, never pickled
objects) or a **PNG/JPEG** image (only for models with a preprocessing module; decoded to float32
`(1, C, H, W)` in [0, 1]) — as a multipart file, or base64 in a string. Pickles, `torch.save`
archives and file paths are never accepted. The model's preprocessing module (TorchScript) runs
first; the result must then match the model's `input_shape` in rank and in every fixed dimension,
and have at most `FLP_INFERENCE_MAX_BATCH` rows (413 beyond).

**Methods** (each prediction `y_s` has shape `(B, C, …)`, class dimension 1; softmax, when
asked, is applied to each `y_s`):
* `NONE`: one forward pass (a mean model averages its members); `uncertainty` is `{}`.
* `ENSEMBLE` (mean models): `y_s` = member s's output, S = number of members.
* `MC_DROPOUT`: S = N passes with the dropout layers sampling and every other layer in eval mode.
* `SWAG` (SWAG models): S = N independent draws θ_s = μ + sqrt(scale·σ²) ⊙ z_s, z_s ~ N(0, I), with
  μ = E[θ] and σ² = clamp(E[θ²] − E[θ]², min_var) from the stored moments.

**Output**: with ȳ = (1/S) Σ_s y_s (the mean output, scores):
* `return_scores=false` (default, the DLR reference's shape): `inference` = argmax of ȳ over
  dimension 1 (**class indices**) for `NONE` (ȳ itself when the output has no dimension 1), ȳ for
  the other methods.
* `return_scores=true`: `inference` = ȳ (**scores**) for every method.
* Either way `prediction` = argmax of ȳ over dimension 1 (null without one) and `return_scores`
  echoes the request.

`uncertainty` (`{}` for `NONE`):
* `variance` = (1/(S − k)) Σ_s (y_s − ȳ)², element-wise, with k = 0 for ENSEMBLE (the exact variance
  of the members) and k = 1 for the sampling methods (unbiased estimate); `std` = √variance.
* When every y_s is a probability vector over dimension 1 (entries in [0, 1] summing to 1), per
  input row, in nats, with H(p) = −Σ_c p_c ln p_c: `predictive_entropy` = H(ȳ), `expected_entropy` =
  (1/S) Σ_s H(y_s), `mutual_info` = predictive_entropy − expected_entropy (BALD, ≥ 0).

`return_format=binary` returns a **safetensors** file (never a pickle, unlike the reference) with
tensors `inference` (as in JSON: int64 class indices for `NONE` unless `return_scores`),
`prediction` and `uncertainty.<name>`, and `uncertainty_method`, `samples`, `model_id`, `round`,
`return_scores` in its metadata. Non-finite numbers are `null` in JSON. DLR clients:
`docs/dlr-clients.md`.
"""


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A self-contained JSON schema (OpenAPI ``requestBody`` entries cannot use ``$defs``)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model_id", "model_input"],
    "properties": {
        "model_id": {"type": "string", "format": "uuid"},
        "model_input": {
            "type": "string",
            "format": "binary",
            "description": "safetensors, .npy, PNG or JPEG bytes (or a text field with base64 / a JSON list)",
        },
        "return_format": {"type": "string", "enum": ["json", "binary"], "default": "binary"},
        "uncertainty_method": {"type": "string", "enum": ["NONE", "ENSEMBLE", "MC_DROPOUT", "SWAG"]},
        "options": {"type": "string", "description": 'JSON, e.g. {"N": 20, "softmax": true, "seed": 1}'},
        "round": {"type": "integer", "minimum": 0, "description": "a round of the model's history"},
        "return_scores": {
            "type": "boolean",
            "default": False,
            "description": "true: `inference` holds scores for NONE too (see the JSON body)",
        },
    },
}

_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": _inline_refs(InferenceRequest.model_json_schema()),
            "examples": INFERENCE_REQUEST_EXAMPLES,
        },
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
    },
}


def _invalid(exc: ValidationError, prefix: str = "body") -> RequestValidationError:
    errors = [{**err, "loc": (prefix, *err.get("loc", ()))} for err in exc.errors(include_url=False)]
    return RequestValidationError(errors)


async def _read_capped(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"JSON body larger than {limit} bytes; send large inputs as multipart files."
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _json_limit(state: Any) -> int:
    return int(state.settings.inference_max_json_body_bytes)


def _multipart_limit(state: Any) -> int:
    """model_input (a file, or base64 in a field) plus the small fields and the form's framing."""
    return runtime_for(state).settings.max_input_bytes * 2 + 1024**2


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("Malformed JSON body.", code="malformed_json") from None


async def _query_from_json(request: Request) -> InferenceQuery:
    body = await _read_capped(request, _json_limit(request.app.state))
    data = await asyncio.to_thread(_parse_json, body)
    if not isinstance(data, dict):
        raise BadRequest("The JSON body must be an object.", code="malformed_json")
    try:
        parsed = InferenceRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    return InferenceQuery(
        model_id=parsed.model_id,
        model_input=parsed.model_input,
        return_format=parsed.return_format or "json",
        uncertainty_method=parsed.uncertainty_method,
        options=parsed.options,
        round=parsed.round,
        return_scores=parsed.return_scores,
    )


async def _query_from_form(request: Request, default_format: ReturnFormat = "binary") -> InferenceQuery:
    max_bytes = runtime_for(request.app.state).settings.max_input_bytes
    async with request.form(max_files=1, max_fields=8, max_part_size=max_bytes * 2 + 1024) as form:
        fields: dict[str, Any] = {}
        model_input: bytes | str | None = None
        for key, value in form.multi_items():
            if key == "model_input":
                if isinstance(value, UploadFile):
                    if value.size is not None and value.size > max_bytes:
                        raise PayloadTooLarge(
                            f"model_input is larger than {max_bytes} bytes.", code="input_too_large"
                        )
                    model_input = await value.read()
                else:
                    model_input = value
            elif isinstance(value, UploadFile):
                raise BadRequest(f"Only model_input may be a file, not {key!r}.", code="invalid_form")
            elif key == "options" and value.strip():
                try:
                    fields[key] = json.loads(value)
                except ValueError:
                    raise BadRequest("options must be a JSON object.", code="invalid_form") from None
            elif value.strip() or key == "model_id":
                fields[key] = value
    if model_input is None or model_input == "" or model_input == b"":
        raise BadRequest("No uploaded file or field 'model_input' found.", code="missing_model_input")
    try:
        parsed = InferenceFields.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc, "form") from None
    return InferenceQuery(
        model_id=parsed.model_id,
        model_input=model_input,
        return_format=parsed.return_format or default_format,
        uncertainty_method=parsed.uncertainty_method,
        options=parsed.options,
        round=parsed.round,
        return_scores=parsed.return_scores,
    )


@router.post(
    "/api/inference/",
    tags=["inference"],
    summary="Predict with uncertainty",
    description=INFERENCE_DESCRIPTION,
    response_model=InferenceResponse,
    responses={
        200: {
            "description": "JSON prediction, or a safetensors file for `return_format=binary`.",
            "content": {
                "application/json": {"examples": INFERENCE_RESPONSE_EXAMPLES},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **responses(400, 401, 402, 404, 409, 413, 415, 422),
    },
    openapi_extra={"requestBody": _REQUEST_BODY},
)
@body_limits(json=_json_limit, multipart=_multipart_limit)
async def infer(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    query = await _query_from_request(request)
    started = utcnow()
    result = await inference_service.run_inference(session, runtime_for(request.app.state), user, query)
    _record_work(request, started, result)
    if query.return_format == "binary":
        body = await asyncio.to_thread(result_safetensors, result, return_scores=query.return_scores)
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"Content-Disposition": 'attachment; filename="inference.safetensors"'},
        )
    body = await asyncio.to_thread(result_json, result, return_scores=query.return_scores)
    return Response(body, media_type="application/json")


async def _query_from_request(request: Request, form_format: ReturnFormat = "binary") -> InferenceQuery:
    """The query of a JSON or form body (``form_format``: the default ``return_format`` of forms)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return await _query_from_json(request)
    if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _query_from_form(request, form_format)
    raise UnsupportedMediaType(
        "Only Content-Type 'application/json' and 'multipart/form-data' (or an urlencoded form) are supported."
    )


def _record_work(request: Request, started: dt.datetime, result: inference_service.InferenceResult) -> None:
    """The inference is a Work row (category inference) claimed and run by this process, written
    in batches off the response path (inside the request it added a commit: ~3 ms on a small
    model). Refused requests raise before this and record nothing."""
    work_log = getattr(request.app.state, "work_log", None)
    if work_log is None:
        return
    worker = getattr(request.app.state, "work_worker", None)
    work_log.add(
        INFERENCE_WORK,
        category=WorkKind.INFERENCE,
        started_at=started,
        finished_at=utcnow(),
        server_id=getattr(worker, "server_id", None),
        model_id=result.model.id,
        result={"method": result.method.value, "rows": result.rows, "round": result.round},
    )


# --------------------------------------------------------------------------- asynchronous jobs

INFERENCE_JOB_DESCRIPTION = r"""
Queue an inference as a **job** and poll it: for long-running methods (many samples, large
ensembles, big batches) or clients that should not hold a connection open. The job is a
work-queue row that **any worker** runs — the in-process worker of any `flplatform serve`
process, or a `flplatform worker` on another host — so inference scales out with the workers.

**Body**: exactly as `POST /api/inference/` (JSON, multipart or urlencoded; the same fields, limits
and input formats). The result is always JSON: `return_format` may be omitted or `json`;
`return_scores` selects the shape of `inference` as there (default: the reference's shape, class
indices for `NONE`).

**Checked now**, with the synchronous route's answers: the model must be one you may read (404),
the input must decode and fit the limits (400/413/422; without a preprocessing module also the
model's `input_shape`), and billing must accept the charge (402). The charge itself is posted when
the job runs — **once per job**, even if a lost worker makes it run again — and not at all if the
run fails.

**Answer**: 202 with the job (`status` `waiting`) and its `url` (also in `Location`). Poll
`GET /api/inference/jobs/{job_id}/` until `status` is `done` (`result` is the body
`POST /api/inference/` would have answered) or `error` (`error` has `detail`, `code` and the HTTP
`status` the synchronous route would have answered).
"""

_JOB_REQUEST_BODY: dict[str, Any] = {
    **_REQUEST_BODY,
    "content": {
        **_REQUEST_BODY["content"],
        "multipart/form-data": {
            "schema": {
                **_MULTIPART_SCHEMA,
                "properties": {
                    **_MULTIPART_SCHEMA["properties"],
                    "return_format": {"type": "string", "enum": ["json"]},
                },
            }
        },
    },
}


def _job_url(request: Request, job_id: uuid.UUID) -> str:
    return request.url_for("get_inference_job", job_id=str(job_id)).path


def _job_view(request: Request, job: Any) -> dict[str, Any]:
    """The job without its result (callers add it): JSON-ready values."""
    return InferenceJob.model_validate(
        {
            "id": job.id,
            "status": inference_jobs.API_STATUS[job.status],
            "url": _job_url(request, job.id),
            "model_id": job.model_id,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "attempts": job.attempts,
            "result": None,
            "error": inference_jobs.job_error(job),
        }
    ).model_dump(mode="json")


@router.post(
    "/api/inference/jobs/",
    tags=["inference"],
    summary="Queue an inference job",
    description=INFERENCE_JOB_DESCRIPTION,
    status_code=202,
    response_model=InferenceJob,
    responses={
        202: {
            "description": "Queued; poll `url` (the `Location` header).",
            "headers": {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}},
        },
        **responses(400, 401, 402, 404, 409, 413, 415, 422),
    },
    openapi_extra={"requestBody": _JOB_REQUEST_BODY},
)
@body_limits(json=_json_limit, multipart=_multipart_limit)
async def submit_inference_job(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    query = await _query_from_request(request, form_format="json")
    job = await inference_jobs.submit(
        session,
        runtime_for(request.app.state),
        user,
        query,
        max_attempts=request.app.state.settings.work_max_attempts,
    )
    view = _job_view(request, job)
    return Response(
        json.dumps(view), status_code=202, media_type="application/json", headers={"Location": view["url"]}
    )


@router.get(
    "/api/inference/jobs/{job_id}/",
    tags=["inference"],
    summary="Poll an inference job",
    description="Status (`waiting`, `processing`, `done`, `error`), timestamps, attempts, the `result` when "
    "done (the body `POST /api/inference/` answers) and the `error` when failed. Only the job's submitter "
    "(and superusers) see a job; 404 for anyone else.",
    response_model=InferenceJob,
    responses=responses(401, 404, 422),
)
async def get_inference_job(request: Request, job: SubmittedJob) -> Response:
    view = _job_view(request, job)
    if view["status"] == "done":
        view["result"] = job.result
    body = await asyncio.to_thread(lambda: json.dumps(view, allow_nan=False, separators=(",", ":")))
    return Response(body, media_type="application/json")


@router.get(
    "/api/inference/jobs/",
    tags=["inference"],
    summary="List your inference jobs",
    description="Your inference jobs, newest first, without their results (poll a job's `url` for it); "
    "filter by `status`. `X-Total-Count` carries the total.",
    response_model=list[InferenceJob],
    responses=responses(401, 422),
)
async def list_inference_jobs(
    request: Request,
    response: Response,
    session: SessionDep,
    user: CurrentUser,
    status: InferenceJobStatus | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    jobs, total = await inference_jobs.list_jobs(session, user, status=status, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [_job_view(request, job) for job in jobs]


@router.get(
    "/api/models/{model_id}/metadata/",
    tags=["models"],
    summary="Model metadata",
    description="Parameter counts, input shape, per-layer summary (submodules of a TorchScript model, tensors "
    "of a weight-only model, members of a mean model), the output shape on zeros of `input_shape`, "
    "`has_preprocessing`, SWAG moment presence, and a torchinfo `stats` object in the DLR server's shape.",
    response_model=ModelMetadata,
    responses=responses(401, 404, 409, 422),
)
async def metadata(request: Request, session: SessionDep, model: ReadableModel) -> ModelMetadata:
    info = await model_metadata(session, runtime_for(request.app.state), model)
    return ModelMetadata.model_validate(info)
