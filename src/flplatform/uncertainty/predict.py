"""Predictions with uncertainty for a loaded model (pure torch; callers load the modules).

A *runnable* is either a ``torch.nn.Module`` (TorchScript or eager) or an ``Ensemble`` of
runnables whose forward pass averages its members (a ``MeanModel``). Every method returns a
``Prediction`` whose ``samples`` has shape (S, B, ...): one prediction (NONE), one per member
(ENSEMBLE), or N stochastic passes (MC_DROPOUT, SWAG). ``mean`` is the average over S.
Callers run this off the event loop; everything here is synchronous and CPU-bound.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flplatform.uncertainty.interpret import CLASS_DIM, interpret
from flplatform.uncertainty.mc_dropout import enable_dropout, seeded_global_rng
from flplatform.uncertainty.swag import (
    DEFAULT_MIN_VAR,
    check_moments,
    load_flat_parameters,
    num_parameters,
    sample_parameters,
)


class Method(enum.StrEnum):
    """Same strings as ``flplatform.orm.UncertaintyMethod`` (kept apart: no DB imports here)."""

    NONE = "NONE"
    ENSEMBLE = "ENSEMBLE"
    MC_DROPOUT = "MC_DROPOUT"
    SWAG = "SWAG"


class PredictionError(ValueError):
    """The model cannot answer this request (wrong kind of model, bad output, failed forward)."""


# The sampling options' defaults and limits, stated once: ``inference.schemas.UncertaintyOptions``
# validates inference requests and a training's ``options.uncertainty`` against them. The largest N
# is a deployment setting (``FLP_INFERENCE_MAX_SAMPLES``), checked when the request runs.
DEFAULT_SAMPLES = 10
MIN_SAMPLES = 2  # a variance needs at least two predictions
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
DEFAULT_SCALE = 1.0
MAX_SCALE = 100


@dataclass(frozen=True)
class SamplingOptions:
    samples: int = DEFAULT_SAMPLES  # N stochastic predictions (MC_DROPOUT, SWAG)
    softmax: bool = False  # apply softmax over the class dimension to every prediction
    seed: int | None = None  # makes MC_DROPOUT masks and SWAG draws reproducible
    min_var: float = DEFAULT_MIN_VAR  # SWAG variance clamp (> 0)
    scale: float = DEFAULT_SCALE  # SWAG variance scale, in [0, MAX_SCALE]


@dataclass
class Ensemble:
    """Members are runnables; the forward pass is the average of the members' outputs."""

    members: list[Runnable]


Runnable = nn.Module | Ensemble


@dataclass
class Prediction:
    method: Method
    samples: Tensor
    mean: Tensor
    uncertainty: dict[str, Tensor] = field(default_factory=dict)
    dropout_layers: int | None = None  # MC_DROPOUT: how many layers were sampling

    @property
    def prediction(self) -> Tensor | None:
        """argmax over the class dimension, when the output has one."""
        if self.mean.dim() <= CLASS_DIM:
            return None
        return self.mean.argmax(CLASS_DIM)


def _forward(runnable: Runnable, inputs: Tensor, softmax: bool) -> Tensor:
    if isinstance(runnable, Ensemble):
        outputs = [_forward(member, inputs, softmax) for member in runnable.members]
        return torch.stack(outputs).mean(0)
    try:
        output = runnable(inputs)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # torch.jit.Error is a RuntimeError
        raise PredictionError(f"The model failed on this input: {_first_line(exc)}") from exc
    if not isinstance(output, Tensor):
        raise PredictionError(f"The model returned {type(output).__name__}, not a tensor.")
    if output.dim() == 0 or output.shape[0] != inputs.shape[0]:
        raise PredictionError(
            f"The model returned shape {list(output.shape)} for a batch of {inputs.shape[0]}; "
            "it must return one prediction per input row."
        )
    if not output.is_floating_point():
        output = output.double()
    if softmax:
        if output.dim() <= CLASS_DIM:
            raise PredictionError("softmax needs outputs with a class dimension (batch, classes, ...).")
        output = torch.softmax(output, CLASS_DIM)
    return output


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else type(exc).__name__
    return message[:300]


def _clone(runnable: Runnable) -> Runnable:
    """A private copy for methods that change module state (modes, parameters): cached
    modules are shared between concurrent requests."""
    if isinstance(runnable, Ensemble):
        return Ensemble([_clone(member) for member in runnable.members])
    return copy.deepcopy(runnable)


def _enable_dropout(runnable: Runnable) -> int:
    if isinstance(runnable, Ensemble):
        return sum(_enable_dropout(member) for member in runnable.members)
    return enable_dropout(runnable)


def predict_none(runnable: Runnable, inputs: Tensor, options: SamplingOptions) -> Prediction:
    output = _forward(runnable, inputs, options.softmax)
    return Prediction(Method.NONE, output.unsqueeze(0), output)


def predict_ensemble(runnable: Runnable, inputs: Tensor, options: SamplingOptions) -> Prediction:
    if not isinstance(runnable, Ensemble):
        raise PredictionError("ENSEMBLE needs a MEAN model (an ensemble of global models).")
    samples = torch.stack([_forward(member, inputs, options.softmax) for member in runnable.members])
    return Prediction(Method.ENSEMBLE, samples, samples.mean(0), interpret(samples, correction=0))


def predict_mc_dropout(runnable: Runnable, inputs: Tensor, options: SamplingOptions) -> Prediction:
    working = _clone(runnable)
    layers = _enable_dropout(working)
    with seeded_global_rng(options.seed):
        samples = torch.stack([_forward(working, inputs, options.softmax) for _ in range(options.samples)])
    return Prediction(
        Method.MC_DROPOUT, samples, samples.mean(0), interpret(samples, correction=1), dropout_layers=layers
    )


def predict_swag(
    module: Runnable, first: Tensor, second: Tensor, inputs: Tensor, options: SamplingOptions
) -> Prediction:
    if isinstance(module, Ensemble):
        raise PredictionError("SWAG needs a single SWAG model, not an ensemble.")
    check_moments(first, second, num_parameters(module))
    working = copy.deepcopy(module)
    working.eval()
    generator = torch.Generator()
    if options.seed is not None:
        generator.manual_seed(options.seed)
    else:
        generator.seed()
    outputs = []
    for theta in sample_parameters(
        first, second, options.samples, generator=generator, min_var=options.min_var, scale=options.scale
    ):
        load_flat_parameters(working, theta)
        outputs.append(_forward(working, inputs, options.softmax))
    samples = torch.stack(outputs)
    return Prediction(Method.SWAG, samples, samples.mean(0), interpret(samples, correction=1))


def predict(
    method: Method,
    runnable: Runnable,
    inputs: Tensor,
    options: SamplingOptions,
    *,
    moments: tuple[Tensor, Tensor] | None = None,
) -> Prediction:
    """Run ``method`` under ``torch.inference_mode()``; modules are expected in eval mode."""
    with torch.inference_mode():
        if method is Method.NONE:
            return predict_none(runnable, inputs, options)
        if method is Method.ENSEMBLE:
            return predict_ensemble(runnable, inputs, options)
        if method is Method.MC_DROPOUT:
            return predict_mc_dropout(runnable, inputs, options)
        if method is Method.SWAG:
            if moments is None:
                raise PredictionError("SWAG needs the model's first and second moments.")
            return predict_swag(runnable, moments[0], moments[1], inputs, options)
    raise PredictionError(f"Unknown uncertainty method {method!r}.")


__all__ = [
    "Ensemble",
    "Method",
    "Prediction",
    "PredictionError",
    "Runnable",
    "SamplingOptions",
    "predict",
]
