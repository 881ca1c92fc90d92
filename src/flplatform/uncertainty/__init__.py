"""Uncertainty at inference time: SWAG-diagonal sampling, ensembles of global models, MC
dropout, the statistics that summarise them, and decoding of untrusted inputs.

Pure torch/NumPy: no FastAPI, no SQLAlchemy (``flplatform.inference`` finds the models; the model
sandbox, ``flplatform.sandbox.compute``, calls ``predict``).
"""

from flplatform.uncertainty.inputs import DecodedInput, InputError, InputLimits, InputTooLarge
from flplatform.uncertainty.interpret import are_probabilities, entropy, interpret
from flplatform.uncertainty.mc_dropout import enable_dropout, is_dropout
from flplatform.uncertainty.predict import (
    Ensemble,
    Method,
    Prediction,
    PredictionError,
    Runnable,
    SamplingOptions,
    predict,
)
from flplatform.uncertainty.swag import (
    IncompatibleMoments,
    load_flat_parameters,
    sample_parameters,
    swag_variance,
)

__all__ = [
    "DecodedInput",
    "Ensemble",
    "IncompatibleMoments",
    "InputError",
    "InputLimits",
    "InputTooLarge",
    "Method",
    "Prediction",
    "PredictionError",
    "Runnable",
    "SamplingOptions",
    "are_probabilities",
    "enable_dropout",
    "entropy",
    "interpret",
    "is_dropout",
    "load_flat_parameters",
    "predict",
    "sample_parameters",
    "swag_variance",
]
