"""Inference with uncertainty, and model metadata.

The service finds the model, checks the caller may read it, picks the uncertainty method
(explicit, else the model's training's, else NONE), decodes the untrusted input, and sends
it with references to the TorchScript modules to the model sandbox (:mod:`flplatform.sandbox`),
which holds the loaded modules (keyed by model row version or digest) and runs the preprocessing
module and the uncertainty method. Only plain tensors come back: the statistics of the sampled
predictions (``flplatform.uncertainty.interpret``) are computed here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload
from torch import Tensor

from flplatform.aggregation.codec import decode_safetensors
from flplatform.aggregation.errors import DecodeError
from flplatform.errors import (
    AppError,
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unprocessable,
)
from flplatform.inference.schemas import ReturnFormat, UncertaintyOptions
from flplatform.orm import (
    GlobalModel,
    GlobalModelRound,
    LocalModel,
    MeanModel,
    Model,
    SWAGModel,
    Training,
    User,
)
from flplatform.orm.training import UncertaintyMethod
from flplatform.sandbox import SandboxFailure
from flplatform.sandbox import client as sandbox
from flplatform.uncertainty import (
    DecodedInput,
    IncompatibleMoments,
    InputError,
    InputLimits,
    InputTooLarge,
    Method,
    Prediction,
    SamplingOptions,
    interpret,
)
from flplatform.uncertainty.inputs import decode_bytes, decode_json_value

log = logging.getLogger(__name__)

MAX_ENSEMBLE_DEPTH = 4


class InferenceSettings(BaseSettings):
    """Limits of the inference endpoint (environment variables ``FLP_INFERENCE_*``)."""

    model_config = SettingsConfigDict(env_prefix="FLP_INFERENCE_", env_file=".env", extra="ignore")

    max_batch: int = Field(default=1024, ge=1, description="Most input rows per request.")
    max_samples: int = Field(default=100, ge=2, description="Largest N for MC_DROPOUT and SWAG.")
    max_input_bytes: int = Field(default=64 * 1024**2, ge=1024, description="Largest decoded model_input.")
    max_input_elements: int = Field(default=16 * 1024**2, ge=1, description="Most numbers in model_input.")
    max_image_pixels: int = Field(default=16 * 1024**2, ge=1)
    max_ensemble_members: int = Field(default=32, ge=1)
    max_concurrent: int = Field(default=2, ge=1, description="Inferences computed at once per process.")

    def limits(self) -> InputLimits:
        return InputLimits(
            max_bytes=self.max_input_bytes,
            max_elements=self.max_input_elements,
            max_image_pixels=self.max_image_pixels,
        )


@dataclass
class ModuleStats:
    """How often the sandbox already held every module an inference needed (``hits``) and how
    many modules had to be sent to it (``misses``); the modules live in the sandbox workers
    (``FLP_SANDBOX_CACHE_*``), never in this process."""

    hits: int = 0
    misses: int = 0


@dataclass
class InferenceRuntime:
    """Per-application state: limits, the module cache and the concurrency gate."""

    settings: InferenceSettings
    cache: ModuleStats
    gate: asyncio.Semaphore

    @classmethod
    def create(cls, settings: InferenceSettings | None = None) -> InferenceRuntime:
        settings = settings or InferenceSettings()
        return cls(settings=settings, cache=ModuleStats(), gate=asyncio.Semaphore(settings.max_concurrent))


def runtime_for(state: Any) -> InferenceRuntime:
    """The runtime kept on ``app.state`` (created on first use; tests may preset
    ``app.state.inference_settings`` or the runtime itself)."""
    runtime = getattr(state, "inference_runtime", None)
    if runtime is None:
        runtime = InferenceRuntime.create(getattr(state, "inference_settings", None))
        state.inference_runtime = runtime
    return runtime


# --------------------------------------------------------------------------- requests


@dataclass
class InferenceQuery:
    """A parsed request: ``model_input`` is a JSON value (list or string) or raw uploaded bytes."""

    model_id: uuid.UUID
    model_input: list[Any] | str | bytes
    return_format: ReturnFormat
    uncertainty_method: UncertaintyMethod | None = None
    options: UncertaintyOptions | None = None
    round: int | None = None
    return_scores: bool = False  # False: the DLR reference's ``inference`` (class indices for NONE)


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


# --------------------------------------------------------------------------- access


async def training_of(session: AsyncSession, model_id: uuid.UUID) -> Training | None:
    return (await session.execute(select(Training).where(Training.model_id == model_id))).scalar_one_or_none()


async def readable_model(
    session: AsyncSession, user: User, model_id: uuid.UUID
) -> tuple[Model, Training | None]:
    """The model and its training (None for a local update), if ``user`` may read it under the
    model policy (``flplatform.permissions``); 404 otherwise, in every space: inference never
    reveals whether a model exists."""
    from flplatform.permissions import Requester, can_read

    model = await session.get(Model, model_id)
    if model is None or not await can_read(await Requester.load(session, user), model):
        raise NotFound(f"Model {model_id} not found.")
    if isinstance(model, LocalModel):
        return model, None
    return model, await training_of(session, model.id)


# --------------------------------------------------------------------------- loading


class ModelNotRunnable(Conflict):
    code = "model_not_runnable"


class InferenceTimeout(AppError):
    status_code, code = 504, "inference_timeout"


class SandboxFailed(AppError):
    status_code, code = 502, "model_sandbox_failed"


def _weights_loader(session: AsyncSession, column: Any, row_id: uuid.UUID, what: str) -> Any:
    async def load() -> bytes:
        data = (await session.execute(select(column).where(column.table.c.id == row_id))).scalar_one_or_none()
        if not data:
            raise ModelNotRunnable(f"{what} has no weights.")
        return data

    return load


def _module_ref(session: AsyncSession, model: Model, refs: dict[str, sandbox.ModuleRef]) -> sandbox.Tree:
    if model.weights_format not in (None, "torchscript"):
        raise ModelNotRunnable(
            f"Model {model.id} stores only weights ({model.weights_format}), no TorchScript architecture to run."
        )
    # Changes whenever the stored bytes can have changed, so a worker never runs stale weights.
    key = f"weights:{model.id}:{model.round}:{model.updated_at.isoformat() if model.updated_at else ''}:{model.weights_size}"
    refs[key] = sandbox.ModuleRef(key, _weights_loader(session, Model.weights, model.id, f"Model {model.id}"))
    return {"key": key}


async def _history_ref(
    session: AsyncSession, model: GlobalModel, round_: int, refs: dict[str, sandbox.ModuleRef]
) -> tuple[sandbox.Tree, int]:
    """The module of round ``round_`` of the model's history (the latest entry at or before it,
    as the download route does) and the round it was stored for."""
    if round_ > model.round:
        raise NotFound(f"Model {model.id} has no weights for round {round_} (current round: {model.round}).")
    row = (
        await session.execute(
            select(GlobalModelRound.id, GlobalModelRound.round, GlobalModelRound.weights_format)
            .where(GlobalModelRound.model_id == model.id, GlobalModelRound.round <= round_)
            .order_by(GlobalModelRound.round.desc())
            .limit(1)
        )
    ).first()
    if row is None:
        raise NotFound(f"Model {model.id} has no weights for round {round_}.")
    if row.weights_format not in (None, "torchscript"):
        raise ModelNotRunnable(f"Round {row.round} of model {model.id} stores no TorchScript archive.")
    key = f"history:{model.id}:{row.round}"  # history entries never change
    refs[key] = sandbox.ModuleRef(
        key,
        _weights_loader(session, GlobalModelRound.weights, row.id, f"Round {row.round} of model {model.id}"),
    )
    return {"key": key}, round_


async def _preprocessing_ref(
    session: AsyncSession, model: GlobalModel, refs: dict[str, sandbox.ModuleRef]
) -> str | None:
    if not model.has_preprocessing:
        return None
    data = (
        await session.execute(select(GlobalModel.preprocessing).where(GlobalModel.id == model.id))
    ).scalar_one()
    if not data:
        return None
    # Preprocessing can be replaced without touching the models row: key on the bytes.
    key = "preprocessing:" + hashlib.blake2b(data, digest_size=16).hexdigest()

    async def load() -> bytes:
        return data

    refs[key] = sandbox.ModuleRef(key, load)
    return key


async def _tree_for(
    session: AsyncSession,
    runtime: InferenceRuntime,
    model: Model,
    depth: int,
    seen: set[uuid.UUID],
    refs: dict[str, sandbox.ModuleRef],
) -> sandbox.Tree:
    if not isinstance(model, MeanModel):
        return _module_ref(session, model, refs)
    if depth >= MAX_ENSEMBLE_DEPTH or model.id in seen:
        raise ModelNotRunnable(f"Mean model {model.id} nests too deeply or contains itself.")
    members = await _members(session, model.id)
    if not members:
        raise ModelNotRunnable(f"Mean model {model.id} has no member models.")
    if len(members) > runtime.settings.max_ensemble_members:
        raise ModelNotRunnable(
            f"Mean model {model.id} has {len(members)} members; at most "
            f"{runtime.settings.max_ensemble_members} are run."
        )
    inner = seen | {model.id}
    return {"members": [await _tree_for(session, runtime, m, depth + 1, inner, refs) for m in members]}


def sandbox_error(exc: SandboxFailure) -> AppError:
    """The HTTP error for a failed inference or metadata call in the sandbox."""
    kinds: dict[str, AppError] = {
        "moments": Conflict(exc.message, code="swag_moments_invalid"),
        "prediction": BadRequest(exc.message, code="inference_failed"),
        "preprocessing": BadRequest(exc.message, code="preprocessing_failed"),
        "preprocessing_output": ModelNotRunnable(exc.message),
        "input_shape": BadRequest(exc.message, code="input_shape_mismatch"),
        "batch": PayloadTooLarge(exc.message, code="batch_too_large"),
        "refused": ModelNotRunnable(f"The stored model cannot be run: {exc.message}"),
        "invalid": ModelNotRunnable(f"The stored model cannot be run: {exc.message}"),
        "timeout": InferenceTimeout(
            f"{exc.message} The model was stopped (FLP_SANDBOX_CALL_TIMEOUT_SECONDS)."
        ),
        "closed": ServiceUnavailable(exc.message, code="shutting_down"),
    }
    return kinds.get(exc.kind) or SandboxFailed(exc.message)


async def _members(session: AsyncSession, mean_id: uuid.UUID) -> list[GlobalModel]:
    mean = (
        await session.execute(
            select(MeanModel).options(selectinload(MeanModel.members)).where(MeanModel.id == mean_id)
        )
    ).scalar_one()
    return sorted(mean.members, key=lambda m: (m.created_at, str(m.id)))


def decode_moment(data: bytes | None, which: str) -> Tensor | None:
    """A stored moment: safetensors with the flat tensor under ``moment`` (or the only tensor),
    decoded as a zero-copy view (the moments are only read)."""
    if not data:
        return None
    try:
        tensors = decode_safetensors(data)
    except DecodeError as exc:
        raise IncompatibleMoments(f"The stored SWAG {which} moment is unreadable ({exc}).") from None
    if "moment" in tensors:
        tensor = tensors["moment"]
    elif len(tensors) == 1:
        tensor = next(iter(tensors.values()))
    else:
        raise IncompatibleMoments(f"The stored SWAG {which} moment holds {len(tensors)} tensors.")
    return tensor.reshape(-1)


async def _moments_for(session: AsyncSession, model: SWAGModel) -> tuple[Tensor, Tensor]:
    # Not cached: the moments change in SWAG rounds without the models row (and so the cache
    # key of the weights) changing, and decoding safetensors is cheap next to N forward passes.
    first_bytes, second_bytes = (
        await session.execute(
            select(SWAGModel.swag_first_moment, SWAGModel.swag_second_moment).where(SWAGModel.id == model.id)
        )
    ).one()
    first, second = await asyncio.to_thread(
        lambda: (decode_moment(first_bytes, "first"), decode_moment(second_bytes, "second"))
    )
    if first is None or second is None:
        raise Conflict(
            f"SWAG model {model.id} has no moments yet (no SWAG round has finished).",
            code="swag_moments_missing",
        )
    return first, second


# --------------------------------------------------------------------------- method and options


def choose_method(model: Model, training: Training | None, explicit: UncertaintyMethod | None) -> Method:
    method = Method(
        (explicit or (training.uncertainty_method if training else None) or UncertaintyMethod.NONE).value
    )
    if method is Method.ENSEMBLE and not isinstance(model, MeanModel):
        raise BadRequest(
            f"ENSEMBLE needs a MEAN model (an ensemble of global models); model {model.id} is not one. "
            "Ask for another uncertainty_method, e.g. NONE.",
            code="method_not_applicable",
        )
    if method is Method.SWAG and not isinstance(model, SWAGModel):
        raise BadRequest(
            f"SWAG needs a SWAG model (uploaded with type=SWAG); model {model.id} is not one. "
            "Ask for another uncertainty_method, e.g. NONE.",
            code="method_not_applicable",
        )
    return method


def sampling_options(
    training: Training | None, explicit: UncertaintyOptions | None, settings: InferenceSettings
) -> SamplingOptions:
    """The training's ``options.uncertainty`` as defaults, overridden field by field."""
    merged: dict[str, Any] = {}
    stored = (training.options or {}).get("uncertainty") if training else None
    if isinstance(stored, dict):
        known = {k: v for k, v in stored.items() if k in UncertaintyOptions.model_fields}
        try:
            merged.update(UncertaintyOptions.model_validate(known).model_dump(exclude_unset=True))
        except ValidationError:
            log.warning(
                "ignoring invalid options.uncertainty of training %s", training.id if training else None
            )
    if explicit is not None:
        merged.update(explicit.model_dump(exclude_unset=True))
    options = UncertaintyOptions.model_validate(merged)
    if options.N > settings.max_samples:
        raise Unprocessable(
            f"options.N is {options.N}; at most {settings.max_samples} samples are allowed.",
            code="too_many_samples",
        )
    return SamplingOptions(
        samples=options.N,
        softmax=options.softmax,
        seed=options.seed,
        min_var=options.min_var,
        scale=options.scale,
    )


# --------------------------------------------------------------------------- the run


def check_input_shape(tensor: Tensor, input_shape: list[int | None] | None) -> None:
    """Rank and every fixed dimension must match; ``null`` dimensions are free."""
    if not input_shape:
        return
    expected = "[" + ", ".join("*" if d is None else str(d) for d in input_shape) + "]"
    if tensor.dim() != len(input_shape):
        raise BadRequest(
            f"model_input has rank {tensor.dim()} (shape {list(tensor.shape)}); the model expects rank "
            f"{len(input_shape)} with shape {expected}.",
            code="input_shape_mismatch",
        )
    for index, (got, want) in enumerate(zip(tensor.shape, input_shape, strict=True)):
        if want is not None and got != want:
            raise BadRequest(
                f"model_input dimension {index} is {got}; the model expects shape {expected}.",
                code="input_shape_mismatch",
            )


def _check_batch(tensor: Tensor, settings: InferenceSettings) -> None:
    if tensor.dim() >= 1 and tensor.shape[0] > settings.max_batch:
        raise PayloadTooLarge(
            f"model_input has {tensor.shape[0]} rows; at most {settings.max_batch} per request "
            "(FLP_INFERENCE_MAX_BATCH).",
            code="batch_too_large",
        )


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

    decoded = await asyncio.to_thread(_decode, query.model_input, settings)
    if decoded.kind == "image" and not model.has_preprocessing:
        raise BadRequest(
            "Image inputs need a model with a preprocessing module (upload one for this model), "
            "or send the pixels as a tensor.",
            code="preprocessing_required",
        )
    _check_batch(decoded.tensor, settings)
    rows = int(decoded.tensor.shape[0])
    passes = options.samples if method in (Method.MC_DROPOUT, Method.SWAG) else 1
    if isinstance(model, MeanModel):
        passes *= max(1, len(await _members(session, model.id)))

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
    plan = await check_inference(session, runtime, user, query, billing_key=billing_key)
    model, method, options, decoded, rows = plan.model, plan.method, plan.options, plan.decoded, plan.rows

    refs: dict[str, sandbox.ModuleRef] = {}
    if query.round is not None and query.round != model.round:
        tree, used_round = await _history_ref(session, model, query.round, refs)
    else:
        tree, used_round = await _tree_for(session, runtime, model, 0, set(), refs), model.round
    target = _Target(
        model=model, tree=tree, refs=refs, preprocessing=await _preprocessing_ref(session, model, refs)
    )
    if method is Method.SWAG:
        assert isinstance(model, SWAGModel)
        target.moments = await _moments_for(session, model)
    async with runtime.gate:
        prediction = await _compute(target, decoded, method, options, runtime)
    return InferenceResult(
        model=model,
        method=method,
        prediction=prediction,
        input_kind=decoded.kind,
        rows=rows,
        round=used_round,
    )


def _decode(value: list[Any] | str | bytes, settings: InferenceSettings) -> DecodedInput:
    limits = settings.limits()
    try:
        if isinstance(value, bytes):
            return decode_bytes(value, limits)
        return decode_json_value(value, limits)
    except InputTooLarge as exc:
        raise PayloadTooLarge(str(exc), code="input_too_large") from None
    except InputError as exc:
        raise BadRequest(str(exc), code="invalid_model_input") from None


# --------------------------------------------------------------------------- responses


def _to_json(tensor: Tensor) -> list[Any]:
    values = tensor.detach().cpu()
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        return _finite_or_none(values.tolist())
    return values.tolist()


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value if math.isfinite(value) else None


def result_json(result: InferenceResult, *, return_scores: bool = False) -> bytes:
    """The JSON body (built in a worker thread: large outputs take a while to serialise).
    Non-finite numbers become null."""
    return json.dumps(
        result_body(result, return_scores=return_scores), allow_nan=False, separators=(",", ":")
    ).encode()


def inference_values(prediction: Prediction, *, return_scores: bool) -> Tensor:
    """What ``inference`` holds. The DLR reference answers ``argmax(dim=1)`` of the output for
    NONE and the mean output for every other method; ``return_scores`` asks for the mean output
    (the scores) for NONE too. An output without a class dimension has no index to take: it is
    returned as it is (the reference fails on it)."""
    if return_scores or prediction.method is not Method.NONE:
        return prediction.mean
    argmax = prediction.prediction
    return argmax if argmax is not None else prediction.mean


def result_body(result: InferenceResult, *, return_scores: bool = False) -> dict[str, Any]:
    """The JSON response as plain Python values (``inference.schemas.InferenceResponse``);
    ``return_scores`` selects what ``inference`` holds (:func:`inference_values`)."""
    prediction = result.prediction
    argmax = prediction.prediction
    body = {
        "inference": _to_json(inference_values(prediction, return_scores=return_scores)),
        "prediction": _to_json(argmax) if argmax is not None else None,
        "return_scores": return_scores,
        "uncertainty": {name: _to_json(value) for name, value in prediction.uncertainty.items()},
        "uncertainty_method": result.method.value,
        "samples": int(prediction.samples.shape[0]),
        "model_id": str(result.model.id),
        "round": result.round,
        "dropout_layers": prediction.dropout_layers,
    }
    return body


def result_safetensors(result: InferenceResult, *, return_scores: bool = False) -> bytes:
    """The binary body: safetensors (never a pickle) with ``inference`` (as in the JSON body:
    :func:`inference_values`), ``prediction`` (when there is a class dimension) and
    ``uncertainty.<name>`` tensors; method, model, round and ``return_scores`` in the metadata."""
    from safetensors.torch import save

    prediction = result.prediction
    tensors = {"inference": inference_values(prediction, return_scores=return_scores)}
    if prediction.prediction is not None:
        tensors["prediction"] = prediction.prediction
    for name, value in prediction.uncertainty.items():
        tensors[f"uncertainty.{name}"] = value
    tensors = {name: value.detach().cpu().clone().contiguous() for name, value in tensors.items()}
    metadata = {
        "uncertainty_method": result.method.value,
        "samples": str(int(prediction.samples.shape[0])),
        "model_id": str(result.model.id),
        "round": str(result.round),
        "return_scores": "true" if return_scores else "false",
    }
    return save(tensors, metadata=metadata)


# --------------------------------------------------------------------------- metadata


def _safetensors_metadata(data: bytes) -> dict[str, Any]:
    """Weight-only models (a safetensors state dict): one entry per tensor, decoded as zero-copy
    views (no tensor data is copied, no forward pass)."""
    try:
        tensors = decode_safetensors(data)
    except DecodeError as exc:
        raise ModelNotRunnable(f"The stored safetensors weights are unreadable ({exc}).") from None
    layers = [
        {"name": name, "class_name": f"Tensor[{str(tensor.dtype).removeprefix('torch.')}]",
         "depth": name.count(".") + 1, "num_params": tensor.numel(), "trainable_params": tensor.numel(),
         "param_bytes": tensor.numel() * tensor.element_size(), "is_leaf": True}
        for name, tensor in tensors.items()
    ]  # fmt: skip
    return {
        "total_params": sum(layer["num_params"] for layer in layers),
        "trainable_params": sum(layer["trainable_params"] for layer in layers),
        "param_bytes": sum(layer["param_bytes"] for layer in layers),
        "layers": layers,
        "output_shape": None,
        "stats": None,
    }


_TYPES = {MeanModel: "MEAN", SWAGModel: "SWAG", GlobalModel: "GLOBAL", LocalModel: "LOCAL"}


async def model_metadata(
    session: AsyncSession, runtime: InferenceRuntime, user: User, model_id: uuid.UUID
) -> dict[str, Any]:
    """Parameter counts, per-layer summary, output shape and torchinfo stats of a model the
    caller may read (fields of ``inference.schemas.ModelMetadata``)."""
    from sqlalchemy import func

    model, training = await readable_model(session, user, model_id)
    kind = next(name for cls, name in _TYPES.items() if isinstance(model, cls))
    input_shape = model.input_shape if isinstance(model, GlobalModel) else None
    if isinstance(model, LocalModel):
        base = await session.get(GlobalModel, model.base_model_id)
        input_shape = base.input_shape if base is not None else None
    info: dict[str, Any] = {
        "id": model.id,
        "type": kind,
        "owner": model.owner_id,
        "round": model.round,
        "name": getattr(model, "name", None),
        "description": getattr(model, "description", None),
        "input_shape": input_shape,
        "has_preprocessing": bool(getattr(model, "has_preprocessing", False)),
        "weights_format": model.weights_format,
        "weights_size": model.weights_size,
        "uncertainty_method": training.uncertainty_method if training else None,
    }
    if isinstance(model, MeanModel):
        info["members"] = [m.id for m in await _members(session, model.id)]
    if isinstance(model, SWAGModel):
        first, second = (
            await session.execute(
                select(
                    func.length(SWAGModel.swag_first_moment), func.length(SWAGModel.swag_second_moment)
                ).where(SWAGModel.id == model.id)
            )
        ).one()
        info["has_swag_moments"] = bool(first) and bool(second)
    if model.weights_format == "safetensors":
        data = (await session.execute(select(Model.weights).where(Model.id == model.id))).scalar_one()
        info.update(await asyncio.to_thread(_safetensors_metadata, data or b""))
        return info
    refs: dict[str, sandbox.ModuleRef] = {}
    tree = await _tree_for(session, runtime, model, 0, set(), refs)
    async with runtime.gate:
        try:
            info.update(
                await sandbox.metadata(
                    tree=tree,
                    refs=refs,
                    input_shape=input_shape,
                    max_elements=runtime.settings.max_input_elements,
                )
            )
        except SandboxFailure as exc:
            raise sandbox_error(exc) from None
    return info
