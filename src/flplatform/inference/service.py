"""Running an inference: access, metering and the sandbox call.

The service finds the model, checks the caller may read it, picks the uncertainty method
(explicit, else the model's training's, else NONE), decodes the untrusted input, and sends
it with references to the TorchScript modules to the model sandbox (:mod:`flplatform.sandbox`),
which holds the loaded modules (keyed by model row version or digest) and runs the preprocessing
module and the uncertainty method. Only plain tensors come back: the statistics of the sampled
predictions (``flplatform.uncertainty.interpret``) are computed here.

The request's checks are in :mod:`~flplatform.inference.requests`, the module references and
sandbox errors in :mod:`~flplatform.inference.loading`, the response bodies in
:mod:`~flplatform.inference.responses`, model metadata in :mod:`~flplatform.inference.metadata`,
the limits in :mod:`~flplatform.inference.config`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from torch import Tensor

from flplatform.errors import BadRequest, NotFound
from flplatform.inference.config import InferenceRuntime
from flplatform.inference.loading import (
    history_ref,
    mean_members,
    preprocessing_ref,
    sandbox_error,
    swag_moments,
    tree_for,
)
from flplatform.inference.requests import (
    InferenceQuery,
    check_batch,
    choose_method,
    decode_input,
    sampling_options,
)
from flplatform.kit import metrics
from flplatform.orm import GlobalModel, LocalModel, MeanModel, Model, SWAGModel, Training, User
from flplatform.sandbox import SandboxFailure
from flplatform.sandbox import client as sandbox
from flplatform.uncertainty import DecodedInput, Method, Prediction, SamplingOptions, interpret

log = logging.getLogger(__name__)


@dataclass
class InferenceResult:
    model: GlobalModel
    method: Method
    prediction: Prediction
    input_kind: str
    rows: int
    round: int


@dataclass
class _Target:
    """The model to run and everything needed to run it: ``tree`` names the modules by key
    (``{"key": k}`` or ``{"members": [...]}``), ``refs`` says how to fetch each one's bytes."""

    model: GlobalModel
    tree: sandbox.Tree
    refs: dict[str, sandbox.ModuleRef]
    preprocessing: str | None = None
    moments: tuple[Tensor, Tensor] | None = None


async def training_of(session: AsyncSession, model_id: uuid.UUID) -> Training | None:
    return (await session.execute(select(Training).where(Training.model_id == model_id))).scalar_one_or_none()


async def get_readable_model(session: AsyncSession, user: User, model_id: uuid.UUID) -> Model:
    """The model, if ``user`` may read it under the model policy (``flplatform.permissions``);
    404 otherwise, in every space: inference never reveals whether a model exists."""
    from flplatform.permissions import Requester, can_read

    model = await session.get(Model, model_id)
    if model is None or not await can_read(await Requester.load(session, user), model):
        raise NotFound(f"Model {model_id} not found.")
    return model


async def training_for(session: AsyncSession, model: Model) -> Training | None:
    """The training whose uncertainty method and options the model runs with (None for a local
    update, or a model no training backs)."""
    return None if isinstance(model, LocalModel) else await training_of(session, model.id)


async def readable_model(
    session: AsyncSession, user: User, model_id: uuid.UUID
) -> tuple[Model, Training | None]:
    """:func:`get_readable_model` and its :func:`training_for`."""
    model = await get_readable_model(session, user, model_id)
    return model, await training_for(session, model)


async def _compute(
    target: _Target,
    decoded: DecodedInput,
    method: Method,
    options: SamplingOptions,
    runtime: InferenceRuntime,
) -> Prediction:
    """Preprocessing, shape checks and the uncertainty method in the sandbox; the statistics of
    the returned samples here."""
    settings = runtime.settings
    if method is Method.ENSEMBLE:
        expected = len(target.tree.get("members", [])) or 1
    elif method in (Method.MC_DROPOUT, Method.SWAG):
        expected = options.samples
    else:
        expected = 1
    try:
        samples, layers = await sandbox.predict(
            tree=target.tree, refs=target.refs, preprocessing=target.preprocessing, inputs=decoded.tensor,
            method=method.value, options=dataclasses.asdict(options),
            input_shape=target.model.input_shape, max_batch=settings.max_batch, expected_samples=expected,
            moments=target.moments, stats=runtime.cache,
        )  # fmt: skip
    except SandboxFailure as exc:
        raise sandbox_error(exc) from None
    mean = samples.mean(0)
    if method is Method.NONE:
        return Prediction(method, samples, mean)
    correction = 0 if method is Method.ENSEMBLE else 1
    statistics = await asyncio.to_thread(interpret, samples, correction=correction)
    return Prediction(
        method, samples, mean, statistics, dropout_layers=layers if method is Method.MC_DROPOUT else None
    )


async def meter_inference(
    session: AsyncSession, user: User, model: Model, *, rows: int, passes: int, billing_key: str | None = None
) -> None:
    """The one metering point of an inference, called before any model runs: billing charges
    here (a 402 raised here stops the inference; the charge rolls back with the request if
    the inference then fails). ``rows`` is the batch size, ``passes`` the forward passes per row.
    ``billing_key`` makes the charge once-only (an inference job run again after its worker was
    lost): an operation already posted under the key means this inference is paid."""
    log.debug("inference by %s on model %s: %d rows x %d passes", user.id, model.id, rows, passes)
    from flplatform.billing import charge_inference  # billing imports no inference code

    if billing_key is not None:
        from flplatform.billing import operation_by_key

        # Checked here rather than left to the ledger's key: the ledger would refuse the key as
        # reused if the price list changed between the two runs.
        if await operation_by_key(session, billing_key) is not None:
            return
    await charge_inference(session, user, model, rows, key=billing_key)


@dataclass
class InferencePlan:
    """A request that passed every check that needs no model code, and was metered."""

    model: GlobalModel
    training: Training | None
    method: Method
    options: SamplingOptions
    decoded: DecodedInput
    rows: int


async def check_inference(
    session: AsyncSession,
    runtime: InferenceRuntime,
    user: User,
    query: InferenceQuery,
    *,
    billing_key: str | None = None,
) -> InferencePlan:
    """Access, method, options, the decoded input and its batch size, then billing (402): what
    :func:`run_inference` checks before it loads any module. Inference jobs run it at submission
    (in a savepoint rolled back afterwards: the job's run charges) to refuse bad requests at once."""
    settings = runtime.settings
    model: Model | None
    try:
        model, training = await readable_model(session, user, query.model_id)
    except NotFound:
        # Billing's inference market: anyone may query a public model, and pays its price.
        from flplatform.billing import is_public_for_inference

        if not await is_public_for_inference(session, query.model_id):
            raise
        model, training = await session.get(Model, query.model_id), None
    if isinstance(model, LocalModel) or not isinstance(model, GlobalModel):
        raise BadRequest(
            "Only global, mean and SWAG models can be queried; query the training's global model.",
            code="not_a_global_model",
        )
    method = choose_method(model, training, query.uncertainty_method)
    options = sampling_options(training, query.options, settings)
    if query.round is not None and query.round != model.round:
        if isinstance(model, MeanModel):
            raise BadRequest(
                "round selects a global model's history; mean models have none.", code="no_history"
            )
        if method is Method.SWAG:
            raise BadRequest(
                f"SWAG moments belong to the current round ({model.round}); ask for another uncertainty_method "
                "to run an earlier round.",
                code="method_not_applicable",
            )

    decoded = await asyncio.to_thread(decode_input, query.model_input, settings)
    if decoded.kind == "image" and not model.has_preprocessing:
        raise BadRequest(
            "Image inputs need a model with a preprocessing module (upload one for this model), "
            "or send the pixels as a tensor.",
            code="preprocessing_required",
        )
    check_batch(decoded.tensor, settings)
    rows = int(decoded.tensor.shape[0])
    passes = options.samples if method in (Method.MC_DROPOUT, Method.SWAG) else 1
    if isinstance(model, MeanModel):
        passes *= max(1, len(await mean_members(session, model.id)))

    await meter_inference(session, user, model, rows=rows, passes=passes, billing_key=billing_key)
    return InferencePlan(
        model=model, training=training, method=method, options=options, decoded=decoded, rows=rows
    )


async def run_inference(
    session: AsyncSession,
    runtime: InferenceRuntime,
    user: User,
    query: InferenceQuery,
    *,
    billing_key: str | None = None,
) -> InferenceResult:
    """Check and meter the request (:func:`check_inference`), load the modules, run the method
    off the event loop. ``billing_key``: see :func:`meter_inference`."""
    elapsed = metrics.stopwatch()
    plan = await check_inference(session, runtime, user, query, billing_key=billing_key)
    model, method, options, decoded, rows = plan.model, plan.method, plan.options, plan.decoded, plan.rows

    refs: dict[str, sandbox.ModuleRef] = {}
    if query.round is not None and query.round != model.round:
        tree, used_round = await history_ref(session, model, query.round, refs)
    else:
        tree, used_round = await tree_for(session, runtime, model, 0, set(), refs), model.round
    target = _Target(
        model=model, tree=tree, refs=refs, preprocessing=await preprocessing_ref(session, model, refs)
    )
    if method is Method.SWAG:
        assert isinstance(model, SWAGModel)
        target.moments = await swag_moments(session, model)
    async with runtime.gate:
        prediction = await _compute(target, decoded, method, options, runtime)
    metrics.observe_inference(method.value, elapsed())
    return InferenceResult(
        model=model,
        method=method,
        prediction=prediction,
        input_kind=decoded.kind,
        rows=rows,
        round=used_round,
    )
