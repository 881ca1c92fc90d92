"""A parsed inference request and its checks that need no model code: the uncertainty method,
the sampling options (the training's as defaults), the decoded input, its shape and batch size."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from torch import Tensor

from flplatform.errors import BadRequest, PayloadTooLarge, Unprocessable
from flplatform.inference.config import InferenceSettings
from flplatform.inference.schemas import ReturnFormat, UncertaintyOptions
from flplatform.orm import MeanModel, Model, SWAGModel, Training
from flplatform.orm.training import UncertaintyMethod
from flplatform.uncertainty import DecodedInput, InputError, InputTooLarge, Method, SamplingOptions
from flplatform.uncertainty.inputs import decode_bytes, decode_json_value

log = logging.getLogger(__name__)


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


def check_batch(tensor: Tensor, settings: InferenceSettings) -> None:
    if tensor.dim() >= 1 and tensor.shape[0] > settings.max_batch:
        raise PayloadTooLarge(
            f"model_input has {tensor.shape[0]} rows; at most {settings.max_batch} per request "
            "(FLP_INFERENCE_MAX_BATCH).",
            code="batch_too_large",
        )


def decode_input(value: list[Any] | str | bytes, settings: InferenceSettings) -> DecodedInput:
    limits = settings.limits()
    try:
        if isinstance(value, bytes):
            return decode_bytes(value, limits)
        return decode_json_value(value, limits)
    except InputTooLarge as exc:
        raise PayloadTooLarge(str(exc), code="input_too_large") from None
    except InputError as exc:
        raise BadRequest(str(exc), code="invalid_model_input") from None
