"""Model and metric schemas (the DLR platform's JSON shapes, ``weights`` never inlined)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import Field

from flplatform.kit.schemas import Schema

ModelType = Literal["GLOBAL", "SWAG", "MEAN", "LOCAL"]


class ModelRead(Schema):
    id: uuid.UUID
    type: ModelType
    owner: uuid.UUID
    round: int
    created_at: dt.datetime
    weights_format: str | None = None
    weights_size: int = 0
    # Global / SWAG / MEAN models
    name: str | None = None
    description: str | None = None
    input_shape: list[int | None] | None = None
    has_preprocessing: bool | None = None
    has_swag_moments: bool | None = Field(default=None, description="SWAG models: moments were aggregated.")
    models: list[uuid.UUID] | None = Field(default=None, description="MEAN models: member global models.")
    training: uuid.UUID | None = Field(default=None, description="The training this model backs, if any.")
    rounds: list[int] | None = Field(default=None, description="Rounds with stored global weights (history).")
    # Local models
    base_model: uuid.UUID | None = None
    sample_size: int | None = None


class ModelUploaded(Schema):
    detail: str = "Model Upload Accepted"
    model_id: uuid.UUID


class UpdateAccepted(Schema):
    detail: str = "Model Update Accepted"
    model_id: uuid.UUID = Field(description="Id of the stored local model.")
    round: int


class MetricsAccepted(Schema):
    detail: str = "Model Metrics Upload Accepted"
    model_id: uuid.UUID


class SwagAccepted(Schema):
    detail: str = "SWAG Statistic Accepted"
    round: int


class MetricRead(Schema):
    id: uuid.UUID
    identifier: str | None
    key: str
    value_float: float | None
    value_binary: str | None = Field(default=None, description="Base64 of a non-numeric value.")
    step: int
    model: uuid.UUID
    reporter: uuid.UUID | None
    created_at: dt.datetime
