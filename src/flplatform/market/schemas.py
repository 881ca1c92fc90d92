"""Market request/response schemas (amounts: decimal strings, see ``billing.schemas``)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import Field

from flplatform.billing.schemas import Money, OperationRead
from flplatform.kit.schemas import RequestSchema, SafeStr, Schema
from flplatform.orm.training import UncertaintyMethod


class MarketModelRead(Schema):
    id: uuid.UUID
    name: str
    description: str
    type: Literal["GLOBAL", "SWAG", "MEAN"]
    input_shape: list[int | None] | None
    has_preprocessing: bool
    round: int
    uncertainty_methods: list[UncertaintyMethod] = Field(
        description="What `uncertainty_method` an inference on it may ask for (MC_DROPOUT needs dropout "
        "layers in the model)."
    )
    price_per_sample: Money = Field(description="USD per inferred sample (`inference_api`).")
    copy_allowed: bool
    copy_price: Money = Field(
        description="USD per copy or update of a copy (besides the price list's `model_copy`)."
    )
    organization_id: uuid.UUID | None
    organization_name: str | None = Field(
        description="The publishing organisation (null: a user outside any)."
    )
    published_at: dt.datetime | None


class ModelCopyCreate(RequestSchema):
    round: int | None = Field(
        default=None, ge=0, description="The source's round to copy (default: its latest)."
    )
    name: SafeStr | None = Field(
        default=None, min_length=1, max_length=200, description="Default: the source's name + ' (copy)'."
    )


class ModelPull(RequestSchema):
    round: int | None = Field(
        default=None, ge=0, description="The source's round to move to (default: its latest)."
    )


class ModelCopyRead(Schema):
    model_id: uuid.UUID
    source_model_id: uuid.UUID
    source_round: int
    round: int = Field(description="The copy's own round (a pull adds one to its history).")
    operations: list[OperationRead] = Field(description="What the copy cost (empty when free).")
