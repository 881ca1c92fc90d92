"""Asynchronous inference: a request becomes an ``inference.run`` job on the work queue, run by
any worker (``flplatform serve``'s in-process one or ``flplatform worker``), polled by its
submitter.

Submission checks what the synchronous route checks before it loads a module — access (404),
method and options, the decoded input, its batch size and, for models without preprocessing,
its shape (4xx) — and asks billing whether it would accept the charge (402): the charge is
posted inside a savepoint that is rolled back. The job stores the query as JSON (uploaded
bytes as base64; never a pickle) and the submitter.

The job's run is :func:`~flplatform.inference.service.run_inference`, exactly as the route
runs it, in the worker's own session, committed once. Its charge carries the key
``inference-job:{job id}``: a job run again after its worker lost the lease finds the
operation and charges nothing more, so each job is charged once (and never when it fails:
the charge rolls back with the failed run). The JSON response is the job's ``result``; a
refusal (the model was deleted, 402 because the balance was spent meanwhile, an input that
failed the model's preprocessing) is the job's error with the code and status a request
would have received. ``return_scores`` is kept with the query: the result has the shape the
synchronous route would have answered.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import workqueue
from flplatform.blobs import BLOB_DIGESTS_KEY, BlobNotFound, store_for
from flplatform.errors import BadRequest, NotFound
from flplatform.inference.config import InferenceRuntime, runtime_for
from flplatform.inference.requests import InferenceQuery, check_input_shape
from flplatform.inference.responses import result_body
from flplatform.inference.schemas import UncertaintyOptions
from flplatform.inference.service import check_inference, run_inference
from flplatform.kit.pagination import paginate
from flplatform.orm import User
from flplatform.orm.workqueue import QueuedWork, WorkKind, WorkStatus

INFERENCE_JOB = "inference.run"  # work-queue kind of an asynchronous inference

# Job status as the API shows it (the ``works`` row's ``finished`` reads ``done``).
API_STATUS = {
    WorkStatus.WAITING: "waiting",
    WorkStatus.PROCESSING: "processing",
    WorkStatus.FINISHED: "done",
    WorkStatus.ERROR: "error",
}
STATUS_FILTER = {api: work for work, api in API_STATUS.items()}


def billing_key(job_id: uuid.UUID) -> str:
    """The ledger key of a job's charge: one charge per job, whichever run posts it."""
    return f"inference-job:{job_id}"


# --------------------------------------------------------------------------- payload


def query_payload(query: InferenceQuery) -> dict[str, Any]:
    """The query as JSON: uploaded bytes become base64 text, which the input decoder reads back
    as the same bytes (JSON lists and strings are kept as sent)."""
    model_input = query.model_input
    if isinstance(model_input, bytes):
        model_input = base64.b64encode(model_input).decode("ascii")
    return {
        "model_id": str(query.model_id),
        "model_input": model_input,
        "uncertainty_method": query.uncertainty_method.value if query.uncertainty_method else None,
        "options": query.options.model_dump(exclude_unset=True) if query.options is not None else None,
        "round": query.round,
        "return_scores": query.return_scores,
    }


def query_from_payload(data: dict[str, Any]) -> InferenceQuery:
    from flplatform.orm.training import UncertaintyMethod

    method = data.get("uncertainty_method")
    options = data.get("options")
    return InferenceQuery(
        model_id=uuid.UUID(data["model_id"]),
        model_input=data["model_input"],
        return_format="json",
        uncertainty_method=UncertaintyMethod(method) if method else None,
        # exclude_unset was dumped, so the training's defaults still fill what the caller left out
        options=UncertaintyOptions.model_validate(options) if options is not None else None,
        round=data.get("round"),
        # A job queued before ``return_scores`` existed was asked for the scores (the only shape then).
        return_scores=bool(data.get("return_scores", True)),
    )


# --------------------------------------------------------------------------- submission


async def submit(
    session: AsyncSession,
    runtime: InferenceRuntime,
    user: User,
    query: InferenceQuery,
    *,
    max_attempts: int = 5,
) -> QueuedWork:
    """Check the query as the synchronous route would (404, 4xx, 402) and enqueue its job in the
    caller's transaction (visible, and workers woken, once the caller commits)."""
    if query.return_format != "json":
        raise BadRequest(
            "Inference jobs store a JSON result; omit return_format or send 'json' "
            "(POST /api/inference/ returns safetensors).",
            code="binary_not_supported",
        )
    async with session.begin_nested() as probe:
        plan = await check_inference(session, runtime, user, query)
        if not plan.model.has_preprocessing:
            # What the run would check after preprocessing; without one the input is final now.
            if plan.decoded.tensor.dim() == 0:
                raise BadRequest("model_input must have a batch dimension.", code="input_shape_mismatch")
            check_input_shape(plan.decoded.tensor, plan.model.input_shape)
        await probe.rollback()  # billing accepted; the job's run posts the charge
    payload: dict[str, Any] = {"user_id": str(user.id)}
    if isinstance(query.model_input, bytes):
        # Uploaded inputs (up to FLP_INFERENCE_MAX_INPUT_BYTES) wait in the blob store, not in the
        # job's JSON; the payload names the blob so the sweep keeps it until the job has run.
        stored = await store_for(session).put(query.model_input)
        payload["query"] = query_payload(dataclasses.replace(query, model_input=""))
        payload["query"]["model_input_digest"] = stored.digest
        payload[BLOB_DIGESTS_KEY] = [stored.digest]
    else:
        payload["query"] = await asyncio.to_thread(query_payload, query)
    return await workqueue.enqueue(
        session,
        INFERENCE_JOB,
        payload,
        model_id=query.model_id,
        submitter_id=user.id,
        max_attempts=max_attempts,
    )


# --------------------------------------------------------------------------- the handler


async def run_inference_job(ctx: workqueue.JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Work-queue handler of ``inference.run``: in a server process with that process's inference
    runtime (module cache, concurrency gate), in ``flplatform worker`` with one of its own."""
    if ctx.app is not None:
        runtime = runtime_for(ctx.app.state)
    else:
        shared: InferenceRuntime | None = ctx.shared.get("inference_runtime")
        runtime = shared if shared is not None else InferenceRuntime.create()
        ctx.shared["inference_runtime"] = runtime
    data = payload["query"]
    if data.get("model_input_digest"):
        async with ctx.sessionmaker() as session:
            try:
                model_input = await store_for(session).read(data["model_input_digest"])
            except BlobNotFound:
                raise NotFound("The job's uploaded input is missing from the blob store.") from None
        data = {**data, "model_input": model_input}
    query = query_from_payload(data)
    async with ctx.sessionmaker() as session:
        user = await session.get(User, uuid.UUID(payload["user_id"]))
        if user is None or not user.is_active:
            raise NotFound("The user who submitted this inference job no longer exists or is inactive.")
        result = await run_inference(session, runtime, user, query, billing_key=billing_key(ctx.job_id))
        body = await asyncio.to_thread(lambda: result_body(result, return_scores=query.return_scores))
        await session.commit()
    return body


def register() -> None:
    """Register ``inference.run`` with the work queue (``flplatform.jobs.install`` calls this)."""
    workqueue.register(INFERENCE_JOB, run_inference_job, category=WorkKind.INFERENCE, keep_payload=False)


# --------------------------------------------------------------------------- reading jobs


async def get_job(session: AsyncSession, user: User, job_id: uuid.UUID) -> QueuedWork:
    """The caller's inference job (any job for a superuser); 404 for everyone else."""
    job = await workqueue.get_job(session, job_id)
    if job is None or job.handler != INFERENCE_JOB or not (user.is_superuser or job.submitter_id == user.id):
        raise NotFound(f"Inference job {job_id} not found.")
    return job


async def list_jobs(
    session: AsyncSession, user: User, *, status: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[QueuedWork], int]:
    """The caller's inference jobs, newest first, without loading their results."""
    from sqlalchemy.orm import defer

    where = [QueuedWork.handler == INFERENCE_JOB, QueuedWork.submitter_id == user.id]
    if status is not None:
        where.append(QueuedWork.status == STATUS_FILTER[status])
    return await paginate(
        session,
        select(QueuedWork).options(defer(QueuedWork.result), defer(QueuedWork.payload)).where(*where),
        order_by=(QueuedWork.created_at.desc(), QueuedWork.id),
        limit=limit,
        offset=offset,
    )


def job_error(job: QueuedWork) -> dict[str, Any] | None:
    """The job's failure in the API's error shape (``detail``, ``code``, and ``status``, the HTTP
    status the synchronous route would have answered). Unexpected exceptions are not echoed."""
    if job.status != WorkStatus.ERROR:
        return None
    error = job.error or {}
    if error.get("code"):
        return {"detail": error.get("message", ""), "code": error["code"], "status": error.get("status", 400)}
    if error.get("type") == "LeaseExpired":
        return {
            "detail": error.get("message", "The job's worker was lost too often."),
            "code": "lease_expired",
            "status": 503,
        }
    return {"detail": "The inference job failed on the server.", "code": "internal_error", "status": 500}
