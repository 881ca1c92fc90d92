"""The inference response bodies: JSON (non-finite numbers as null) and safetensors (never a
pickle), in the DLR reference server's shape."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor

from flplatform.inference.service import InferenceResult
from flplatform.uncertainty import Method, Prediction


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
