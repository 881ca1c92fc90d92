"""Request and response bodies of ``POST /api/inference/``, the inference jobs and
``GET /api/models/{id}/metadata/``."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar, Literal

from pydantic import Field

from flplatform.kit.schemas import RequestSchema, Schema
from flplatform.orm.training import UncertaintyMethod
from flplatform.uncertainty.predict import DEFAULT_SAMPLES, DEFAULT_SCALE, MAX_SCALE, MAX_SEED, MIN_SAMPLES
from flplatform.uncertainty.swag import DEFAULT_MIN_VAR

ReturnFormat = Literal["json", "binary"]


# The one schema of the sampling options: an inference request's ``options`` and a training's
# ``options.uncertainty`` (``trainings.schemas.TrainingOptions``: the defaults of its inferences).
# Defaults and limits are ``flplatform.uncertainty.predict``'s; the largest N is a deployment setting
# (``FLP_INFERENCE_MAX_SAMPLES``), checked when the inference runs.
class UncertaintyOptions(RequestSchema):
    """Sampling options; defaults come from the training's ``options.uncertainty``, then these."""

    N: int = Field(
        default=DEFAULT_SAMPLES,
        ge=MIN_SAMPLES,
        description="Stochastic predictions for MC_DROPOUT and SWAG.",
        examples=[10],
    )
    softmax: bool = Field(
        default=False, description="Apply softmax over the class dimension (dim 1) to every prediction."
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Seed for reproducible dropout masks / SWAG draws."
    )
    min_var: float = Field(
        default=DEFAULT_MIN_VAR, gt=0, description="SWAG: lower clamp of the per-parameter variance."
    )
    scale: float = Field(
        default=DEFAULT_SCALE, ge=0, le=MAX_SCALE, description="SWAG: variance scale (Maddox et al. use 0.5)."
    )


class InferenceFields(RequestSchema):
    """Every field but ``model_input`` (multipart sends that one as a file or a text field)."""

    model_id: uuid.UUID = Field(description="A global, mean (ensemble) or SWAG model you may read.")
    return_format: ReturnFormat | None = Field(
        default=None,
        description="`json` (default for JSON bodies) or `binary` (safetensors; default for multipart).",
    )
    uncertainty_method: UncertaintyMethod | None = Field(
        default=None, description="Overrides the method of the model's training; NONE without a training."
    )
    options: UncertaintyOptions | None = None
    round: int | None = Field(
        default=None,
        ge=0,
        description="Run the global weights of this round of the model's history (default: the current "
        "round). Not for mean models, nor for SWAG sampling (the moments belong to the current round).",
    )
    return_scores: bool = Field(
        default=False,
        description="`false` (default, the DLR reference server's shape): `inference` holds the class indices "
        "(argmax over dimension 1) for `NONE` and the mean outputs for the other methods. `true`: `inference` "
        "holds the mean outputs (scores) for every method, `NONE` included. `prediction` (the argmax) is "
        "present either way.",
    )


REFERENCE_REQUEST_EXAMPLE: dict[str, Any] = {
    "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
    "model_input": [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]],
}
SCORES_REQUEST_EXAMPLE: dict[str, Any] = {
    "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
    "model_input": [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]],
    "return_scores": True,
}
MC_DROPOUT_REQUEST_EXAMPLE: dict[str, Any] = {
    "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
    "model_input": [[0.1, 0.2, 0.3, 0.4]],
    "uncertainty_method": "MC_DROPOUT",
    "options": {"N": 20, "softmax": True, "seed": 1},
}

# OpenAPI ``examples`` of the request body (Swagger UI offers them in a drop-down).
INFERENCE_REQUEST_EXAMPLES = {
    "reference": {
        "summary": "DLR reference form (NONE: class indices)",
        "description": "What a DLR client sends. For a model whose method is `NONE`, `inference` holds one class "
        "index per input row.",
        "value": REFERENCE_REQUEST_EXAMPLE,
    },
    "scores": {
        "summary": "Scores for NONE too (return_scores)",
        "description": "`inference` holds the model's outputs (scores) for every method; `prediction` the argmax.",
        "value": SCORES_REQUEST_EXAMPLE,
    },
    "mc_dropout": {
        "summary": "MC dropout with softmax",
        "description": "`inference` is the mean of N softmax outputs in either shape; with probabilities "
        "`uncertainty` adds the entropies and the mutual information.",
        "value": MC_DROPOUT_REQUEST_EXAMPLE,
    },
}


class InferenceRequest(InferenceFields):
    # Numbers for a tensor (possibly millions): checked by the input decoder, not walked twice.
    unchecked_fields: ClassVar[frozenset[str]] = frozenset({"model_input"})

    model_input: list[Any] | str = Field(
        description="Nested list of numbers, or base64 of safetensors / .npy / PNG / JPEG bytes.",
        examples=[[[0.1, 0.2, 0.3, 0.4]]],
    )

    model_config = {
        "json_schema_extra": {
            "examples": [REFERENCE_REQUEST_EXAMPLE, SCORES_REQUEST_EXAMPLE, MC_DROPOUT_REQUEST_EXAMPLE]
        }
    }


REFERENCE_RESPONSE_EXAMPLE: dict[str, Any] = {
    "inference": [2, 0],
    "prediction": [2, 0],
    "return_scores": False,
    "uncertainty": {},
    "uncertainty_method": "NONE",
    "samples": 1,
    "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
    "round": 3,
    "dropout_layers": None,
}
SCORES_RESPONSE_EXAMPLE: dict[str, Any] = {
    **REFERENCE_RESPONSE_EXAMPLE,
    "inference": [[0.12, -0.40, 0.95], [1.30, 0.20, -0.70]],
    "return_scores": True,
}
MC_DROPOUT_RESPONSE_EXAMPLE: dict[str, Any] = {
    "inference": [[0.7, 0.2, 0.1]],
    "prediction": [0],
    "return_scores": False,
    "uncertainty": {
        "variance": [[0.01, 0.004, 0.002]],
        "std": [[0.1, 0.063, 0.045]],
        "predictive_entropy": [0.80],
        "expected_entropy": [0.74],
        "mutual_info": [0.06],
    },
    "uncertainty_method": "MC_DROPOUT",
    "samples": 20,
    "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
    "round": 3,
    "dropout_layers": 1,
}
# OpenAPI ``examples`` of the 200 JSON answer.
INFERENCE_RESPONSE_EXAMPLES = {
    "reference": {"summary": "NONE, reference shape: class indices", "value": REFERENCE_RESPONSE_EXAMPLE},
    "scores": {"summary": "NONE with return_scores: scores", "value": SCORES_RESPONSE_EXAMPLE},
    "mc_dropout": {"summary": "MC_DROPOUT (either shape): mean scores", "value": MC_DROPOUT_RESPONSE_EXAMPLE},
}


class InferenceResponse(Schema):
    inference: list[Any] = Field(
        description="With `return_scores=false` (default, the reference's shape): for `NONE` the class index "
        "(argmax over dimension 1) of each input row, shape (B, …) (the raw output when it has no class "
        "dimension); for the other methods the mean output over the samples, shape (B, C, …). With "
        "`return_scores=true`: the mean output (scores) for every method."
    )
    prediction: list[Any] | None = Field(
        default=None, description="argmax of the mean output over the class dimension; null without one."
    )
    return_scores: bool = Field(description="The request's `return_scores`: what `inference` holds.")
    uncertainty: dict[str, list[Any]] = Field(
        description="`variance`, `std` (shape of the mean output); with probabilities also "
        "`predictive_entropy`, `expected_entropy`, `mutual_info` (one value per input row). Empty for NONE "
        "(in both shapes, as the reference)."
    )
    uncertainty_method: UncertaintyMethod
    samples: int = Field(description="How many predictions were combined (1 for NONE).")
    model_id: uuid.UUID
    round: int = Field(description="The round of the global weights that ran.")
    dropout_layers: int | None = Field(default=None, description="MC_DROPOUT: dropout layers that sampled.")

    model_config = {
        "json_schema_extra": {
            "examples": [REFERENCE_RESPONSE_EXAMPLE, SCORES_RESPONSE_EXAMPLE, MC_DROPOUT_RESPONSE_EXAMPLE]
        }
    }


class LayerSummary(Schema):
    name: str = Field(description="Qualified submodule name ('' is the root), or a tensor name.")
    class_name: str
    depth: int
    num_params: int = Field(description="Parameters of this layer itself (not its children).")
    trainable_params: int
    param_bytes: int
    is_leaf: bool


class ModelMetadata(Schema):
    id: uuid.UUID
    type: Literal["GLOBAL", "MEAN", "SWAG", "LOCAL"]
    owner: uuid.UUID
    round: int
    name: str | None = None
    description: str | None = None
    input_shape: list[int | None] | None = None
    output_shape: list[int] | None = Field(
        default=None, description="Output of a forward pass on zeros of `input_shape` (free dims as 1)."
    )
    has_preprocessing: bool = False
    weights_format: str | None = None
    weights_size: int = 0
    total_params: int
    trainable_params: int
    param_bytes: int
    layers: list[LayerSummary]
    members: list[uuid.UUID] | None = Field(default=None, description="MEAN: the ensemble's global models.")
    has_swag_moments: bool | None = Field(default=None, description="SWAG: whether moments are stored yet.")
    uncertainty_method: UncertaintyMethod | None = Field(
        default=None, description="The method of the model's training, if it has one."
    )
    stats: dict[str, Any] | None = Field(
        default=None,
        description="torchinfo summary in the DLR server's shape (`total_params`, `summary_list`, …); "
        "null when it cannot be computed.",
    )


InferenceJobStatus = Literal["waiting", "processing", "done", "error"]


class InferenceJobError(Schema):
    """Why a job failed, in the API's error shape, plus the status a synchronous request gets."""

    detail: str
    code: str = Field(
        description="Machine code, as the synchronous route's error body (`lease_expired` when the "
        "job's worker was lost `FLP_WORK_MAX_ATTEMPTS` times)."
    )
    status: int = Field(description="The HTTP status the synchronous route would have answered.")


class InferenceJob(Schema):
    """An asynchronous inference job (``POST /api/inference/jobs/``)."""

    id: uuid.UUID
    status: InferenceJobStatus = Field(description="`waiting` → `processing` → `done` | `error`.")
    url: str = Field(description="Where to poll the job (also the `Location` header of the 202).")
    model_id: uuid.UUID | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None = Field(default=None, description="Start of the latest run.")
    finished_at: dt.datetime | None = None
    attempts: int = Field(description="Runs so far (a job whose worker was lost runs again on another).")
    result: InferenceResponse | None = Field(
        default=None, description="When `done`: the body `POST /api/inference/` answers (JSON)."
    )
    error: InferenceJobError | None = Field(default=None, description="When `error`.")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "id": "0b8e1c52-6a1f-4f0a-9a51-2b1f0f6f7c3d",
                    "status": "waiting",
                    "url": "/api/inference/jobs/0b8e1c52-6a1f-4f0a-9a51-2b1f0f6f7c3d/",
                    "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
                    "created_at": "2026-11-23T14:00:00Z",
                    "started_at": None,
                    "finished_at": None,
                    "attempts": 0,
                    "result": None,
                    "error": None,
                },
                {
                    "id": "0b8e1c52-6a1f-4f0a-9a51-2b1f0f6f7c3d",
                    "status": "done",
                    "url": "/api/inference/jobs/0b8e1c52-6a1f-4f0a-9a51-2b1f0f6f7c3d/",
                    "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
                    "created_at": "2026-11-23T14:00:00Z",
                    "started_at": "2026-11-23T14:00:00.020Z",
                    "finished_at": "2026-11-23T14:00:00.150Z",
                    "attempts": 1,
                    "result": {
                        "inference": [0],
                        "prediction": [0],
                        "return_scores": False,
                        "uncertainty": {},
                        "uncertainty_method": "NONE",
                        "samples": 1,
                        "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
                        "round": 3,
                        "dropout_layers": None,
                    },
                    "error": None,
                },
            ]
        }
    }
