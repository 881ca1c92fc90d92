"""Schema bases and the input rules every request obeys (docs/security.md, "Input validation").

**Text** (one rule, ``check_text``): no NUL character and no unpaired UTF-16 surrogate, anywhere.
PostgreSQL cannot store either in a text or JSON column (a NUL answered 500), and neither is
meaningful text. It applies to every string of every request body (``RequestSchema`` checks its
raw input, nested lists and objects and their keys included, before the fields are parsed), to
path, query and header values (``flplatform.kit.input_guard``), to form fields (``SafeStr``) and to the
credentials of the ``Authorization`` header.

**Integers** in bodies fit a signed 64-bit column (``MAX_INT``), numbers are finite (no NaN or
Infinity, which Python's JSON parser accepts); list windows (``Limit``,
``Offset``) are bounded by ``MAX_OFFSET``. **Money** has at most 18 digits, 8 of them decimals, so
it fits the ledger's 64-bit minor units. **Datetimes** lie in [``EARLIEST``, ``LATEST``) and a
naive one means UTC (``SafeDateTime``); statement months likewise (``PERIOD_PATTERN``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Annotated, Any, ClassVar

from fastapi import Query
from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
MAX_OFFSET = 1_000_000_000
"""Largest ``offset`` of a list (far beyond any real table, far within int64 and SQLite)."""
MAX_LIMIT = 1000

EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(3000, 1, 1, tzinfo=dt.UTC)
PERIOD_PATTERN = r"^(19[7-9]\d|2\d{3})-(0[1-9]|1[0-2])$"
"""A statement month ``YYYY-MM`` within [EARLIEST, LATEST)."""

_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")  # a lone surrogate is the only way one gets into a str


def text_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable text, or None."""
    match = _BAD_TEXT.search(value)
    if match is None:
        return None
    return "contains a NUL character" if match.group() == "\x00" else "contains an unpaired surrogate"


def check_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise PydanticCustomError("invalid_text", "Text {problem}.", {"problem": problem})
    return value


SafeStr = Annotated[str, AfterValidator(check_text)]
"""A ``str`` obeying the text rule: for ``Form``/``Query`` parameters and outside bodies."""


def _utc_in_range(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    if not (EARLIEST <= value < LATEST):
        raise PydanticCustomError(
            "datetime_out_of_range",
            "Datetime must lie between {earliest} and {latest}.",
            {"earliest": EARLIEST.isoformat(), "latest": LATEST.isoformat()},
        )
    return value


SafeDateTime = Annotated[dt.datetime, AfterValidator(_utc_in_range)]
"""A datetime in [EARLIEST, LATEST); naive means UTC."""

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=f"Rows to skip (at most {MAX_OFFSET:,}).")]


def _walk(value: Any, path: tuple[Any, ...]) -> tuple[tuple[Any, ...], str] | None:
    """The first string or integer of raw input that breaks the rules, with where it is."""
    if isinstance(value, str):
        problem = text_problem(value)
        return (path, f"Text {problem}.") if problem else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if MIN_INT <= value <= MAX_INT else (path, "Integer out of the 64-bit range.")
    if isinstance(value, float):
        # Python's JSON parser takes NaN and Infinity, which JSON (and PostgreSQL's json) does not.
        return None if math.isfinite(value) else (path, "Number must be finite.")
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (problem := text_problem(key)):
                return (*path, key), f"Key {problem}."
            found = _walk(item, (*path, key))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _walk(item, (*path, index))
            if found:
                return found
    return None


class Schema(BaseModel):
    """Response schemas: read from ORM objects."""

    model_config = ConfigDict(from_attributes=True)


class RequestSchema(BaseModel):
    """Request bodies: unknown fields are an error, strings are stripped, and every string and
    integer of the raw input obeys the rules above (fields named in ``unchecked_fields``, such as
    an inference's numeric input, are left to their own validation)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    unchecked_fields: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _input_rules(cls, data: Any) -> Any:
        if isinstance(data, dict):
            checked = (
                {k: v for k, v in data.items() if k not in cls.unchecked_fields}
                if cls.unchecked_fields
                else data
            )
            found = _walk(checked, ())
            if found is not None:
                where, message = found
                # Quoted back in the message: a lone surrogate there would break the error itself.
                label = (
                    (".".join(str(p) for p in where) or "body").encode("utf-8", "backslashreplace").decode()
                )
                raise PydanticCustomError(
                    "invalid_input", "{where}: {message}", {"where": label, "message": message}
                )
        return data


class Detail(Schema):
    """A plain acknowledgement, as the DLR server sends it."""

    detail: str
