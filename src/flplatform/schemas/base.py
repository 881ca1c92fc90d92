from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Schema(BaseModel):
    """Response schemas: read from ORM objects."""

    model_config = ConfigDict(from_attributes=True)


class RequestSchema(BaseModel):
    """Request bodies: unknown fields are an error, strings are stripped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Detail(Schema):
    """A plain acknowledgement, as the DLR server sends it."""

    detail: str
