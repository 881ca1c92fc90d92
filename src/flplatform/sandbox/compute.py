"""Inference and metadata inside the sandbox worker (the code that used to run in the server:
preprocessing, the uncertainty methods, per-layer summaries and torchinfo)."""

from __future__ import annotations

import copy
import logging
import math
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from flplatform.sandbox.protocol import Blob, ProtocolError, WorkerError, tensor_blob, tensor_from_blob
from flplatform.uncertainty import Ensemble, Method, PredictionError, Runnable, SamplingOptions, predict
from flplatform.uncertainty.swag import IncompatibleMoments

log = logging.getLogger(__name__)


def runnable_of(tree: Any, modules: dict[str, nn.Module]) -> Runnable:
    if isinstance(tree, dict) and "members" in tree:
        return Ensemble([runnable_of(member, modules) for member in tree["members"]])
    return modules[tree["key"]]


# Listing a scripted module's parameters costs more than a small forward pass; a module's
# parameter dtypes do not change while it is cached (inference mode), so each is looked up once.
_module_dtypes: weakref.WeakKeyDictionary[nn.Module, torch.dtype | None] = weakref.WeakKeyDictionary()


def _first_floating_dtype(runnable: Runnable) -> torch.dtype | None:
    if isinstance(runnable, Ensemble):
        return _first_floating_dtype(runnable.members[0]) if runnable.members else None
    if runnable in _module_dtypes:
        return _module_dtypes[runnable]
    dtype = next((p.dtype for p in runnable.parameters() if p.is_floating_point()), None)
    _module_dtypes[runnable] = dtype
    return dtype


def _check_input_shape(tensor: Tensor, input_shape: list[int | None] | None) -> None:
    if not input_shape:
        return
    expected = "[" + ", ".join("*" if d is None else str(d) for d in input_shape) + "]"
    if tensor.dim() != len(input_shape):
        raise WorkerError(
            "input_shape",
            f"model_input has rank {tensor.dim()} (shape {list(tensor.shape)}); the "
            f"model expects rank {len(input_shape)} with shape {expected}.",
        )
    for index, (got, want) in enumerate(zip(tensor.shape, input_shape, strict=True)):
        if want is not None and got != want:
            raise WorkerError(
                "input_shape", f"model_input dimension {index} is {got}; the model expects shape {expected}."
            )


def predict_request(
    message: dict[str, Any], blobs: list[bytearray], modules: dict[str, nn.Module]
) -> tuple[dict[str, Any], list[Blob]]:
    """``blobs``: the input tensor, then (SWAG) the first and second moments, described by
    ``message["tensors"]``; answers the (samples, batch, ...) tensor as a raw blob."""
    runnable = runnable_of(message["tree"], modules)
    specs = message["tensors"]
    try:
        tensors = [tensor_from_blob(spec, blob) for spec, blob in zip(specs, blobs, strict=True)]
    except (ProtocolError, ValueError) as exc:
        raise WorkerError("internal", f"bad tensor in the request: {exc}") from None
    inputs = tensors[0]
    moments = (tensors[1], tensors[2]) if len(tensors) == 3 else None
    options = SamplingOptions(**message["options"])
    with torch.inference_mode():
        preprocessing = modules.get(message["preprocessing"]) if message.get("preprocessing") else None
        if preprocessing is not None:
            try:
                inputs = preprocessing(inputs)
            except Exception as exc:  # noqa: BLE001  (untrusted code raises anything)
                text = str(exc).strip().splitlines()
                raise WorkerError(
                    "preprocessing",
                    "The model's preprocessing module failed on this input: "
                    + (text[0][:300] if text else type(exc).__name__),
                ) from None
            if not isinstance(inputs, Tensor):
                raise WorkerError(
                    "preprocessing_output",
                    f"The preprocessing module returned {type(inputs).__name__}, not a tensor.",
                )
    if inputs.dim() == 0:
        raise WorkerError("input_shape", "model_input must have a batch dimension.")
    _check_input_shape(inputs, message.get("input_shape"))
    max_batch = int(message["max_batch"])
    if inputs.shape[0] > max_batch:
        raise WorkerError(
            "batch",
            f"model_input has {inputs.shape[0]} rows; at most {max_batch} per request "
            "(FLP_INFERENCE_MAX_BATCH).",
        )
    dtype = _first_floating_dtype(runnable)
    if dtype is not None and inputs.is_floating_point() and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    try:
        prediction = predict(Method(message["method"]), runnable, inputs, options, moments=moments)
    except IncompatibleMoments as exc:
        raise WorkerError("moments", str(exc)) from None
    except PredictionError as exc:
        raise WorkerError("prediction", str(exc)) from None
    spec, raw = tensor_blob(prediction.samples)
    return {"samples": spec, "dropout_layers": prediction.dropout_layers, "rows": int(inputs.shape[0])}, [raw]


# --------------------------------------------------------------------------- metadata


def _class_name(module: nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", None) or type(module).__name__
    return type(module).__name__


def _layers(module: nn.Module) -> list[dict[str, Any]]:
    layers = []
    for name, sub in module.named_modules():
        own = [p for _, p in sub.named_parameters(recurse=False)]
        layers.append(
            {
                "name": name,
                "class_name": _class_name(sub),
                "depth": 0 if name == "" else name.count(".") + 1,
                "num_params": sum(p.numel() for p in own),
                "trainable_params": sum(p.numel() for p in own if p.requires_grad),
                "param_bytes": sum(p.numel() * p.element_size() for p in own),
                "is_leaf": not any(True for _ in sub.children()),
            }
        )
    return layers


def _torchinfo_stats(module: nn.Module, input_size: tuple[int, ...] | None) -> dict[str, Any] | None:
    """torchinfo's summary in the DLR server's ``stats`` shape; None when it fails."""
    import torchinfo

    try:
        with warnings.catch_warnings():  # torchinfo reads .grad of non-leaf tensors
            warnings.simplefilter("ignore")
            summary = torchinfo.summary(
                copy.deepcopy(module), input_size=input_size, verbose=0, device="cpu", mode="eval"
            )
    except Exception:  # any failure of a user model's forward pass: no stats, as the reference
        log.debug("torchinfo failed", exc_info=True)
        return None

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

    keys = (
        "layer_id", "class_name", "depth", "depth_index", "executed", "var_name", "is_leaf_layer",
        "contains_lazy_param", "is_recursive", "input_size", "output_size", "kernel_size",
        "trainable_params", "num_params", "param_bytes", "output_bytes", "macs",
    )  # fmt: skip

    def number(value: Any) -> int:
        return int(value or 0)

    return {
        "input_size": plain(summary.input_size),
        "total_input": number(summary.total_input),
        "total_mult_adds": number(summary.total_mult_adds),
        "total_output_bytes": number(summary.total_output_bytes),
        "total_param_bytes": number(summary.total_param_bytes),
        "total_params": number(summary.total_params),
        "trainable_params": number(summary.trainable_params),
        "summary_list": [
            {key: plain(getattr(layer, key, None)) for key in keys} for layer in summary.summary_list
        ],
    }


def _forward_shape(runnable: Runnable, input_size: tuple[int, ...]) -> list[int] | None:
    try:
        dtype = _first_floating_dtype(runnable) or torch.float32
        prediction = predict(Method.NONE, runnable, torch.zeros(input_size, dtype=dtype), SamplingOptions())
    except Exception:  # a model that cannot run on zeros still has metadata  # noqa: BLE001  (untrusted code raises anything)
        return None
    return list(prediction.mean.shape)


def module_metadata(
    runnable: Runnable, input_shape: list[int | None] | None, max_elements: int
) -> dict[str, Any]:
    input_size = tuple(d if d is not None else 1 for d in input_shape) if input_shape else None
    if input_size is not None and math.prod(input_size) > max_elements:
        # A declared shape larger than any accepted input would make the probe forward pass
        # allocate without bound; report the static parts only.
        input_size = None
    if isinstance(runnable, Ensemble):
        members = [module_metadata(m, input_shape, max_elements) for m in runnable.members]
        layers = [
            {
                "name": f"members.{index}",
                "class_name": "Ensemble" if isinstance(m, Ensemble) else _class_name(m),
                "depth": 1,
                "num_params": meta["total_params"],
                "trainable_params": meta["trainable_params"],
                "param_bytes": meta["param_bytes"],
                "is_leaf": True,
            }
            for index, (m, meta) in enumerate(zip(runnable.members, members, strict=True))
        ]
        return {
            "total_params": sum(m["total_params"] for m in members),
            "trainable_params": sum(m["trainable_params"] for m in members),
            "param_bytes": sum(m["param_bytes"] for m in members),
            "layers": layers,
            "output_shape": _forward_shape(runnable, input_size) if input_size else None,
            "stats": None,
        }
    parameters = list(runnable.parameters())
    return {
        "total_params": sum(p.numel() for p in parameters),
        "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
        "param_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "layers": _layers(runnable),
        "output_shape": _forward_shape(runnable, input_size) if input_size else None,
        "stats": _torchinfo_stats(runnable, input_size),
    }


def metadata_request(message: dict[str, Any], modules: dict[str, nn.Module]) -> dict[str, Any]:
    runnable = runnable_of(message["tree"], modules)
    return {"metadata": module_metadata(runnable, message.get("input_shape"), int(message["max_elements"]))}
