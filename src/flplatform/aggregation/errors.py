"""Exceptions of the aggregation package.

Every one derives from :class:`AggregationError` (itself a ``ValueError``), so the web layer can map
the whole family to a 4xx response with one handler and show ``str(exc)`` to the client.
"""

from __future__ import annotations


class AggregationError(ValueError):
    """Base class of every error raised by :mod:`flplatform.aggregation`."""


class DecodeError(AggregationError):
    """The bytes are truncated, corrupt, or in no format we recognise."""


class UnsafeFormatError(AggregationError):
    """The bytes hold a pickle (or a pickled module) that would have to be unpickled to be read."""


class UpdateValidationError(AggregationError):
    """An update does not match the global model: names, shapes, dtypes or finiteness."""


class ZeroTotalWeightError(AggregationError):
    """A weighted average was asked for with no update, or with weights that sum to zero."""


class InsufficientUpdatesError(AggregationError):
    """A robust aggregator got fewer updates than its options need (e.g. Krum needs n > 2f + 2)."""


class AggregatorOptionsError(AggregationError):
    """Unknown aggregator name, unknown option, or an option value out of range."""


class AggregatorStateError(AggregationError):
    """The server-optimizer state handed to ``begin`` does not fit the global model."""
