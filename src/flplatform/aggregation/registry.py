"""The aggregators by option name, their options, and construction by name.

``AGGREGATORS`` is the one list of strategies: the OpenAPI enum (``AGGREGATOR_NAMES``), the options
schema (``AGGREGATOR_OPTIONS``, ``describe_aggregators()``) and :func:`get` all derive from it.
"""

from __future__ import annotations

from typing import Any

from .base import Aggregator
from .errors import AggregatorOptionsError
from .fedavg import FedAvg, FedProx
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from .options import COMMON_OPTIONS, OptionSpec
from .robust import Krum, Median, MultiKrum, TrimmedMean

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, Median, TrimmedMean, Krum, MultiKrum, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}

AGGREGATOR_NAMES: tuple[str, ...] = tuple(AGGREGATORS)

#: name → option → OptionSpec (common options included).
AGGREGATOR_OPTIONS: dict[str, dict[str, OptionSpec]] = {
    name: {**cls.options, **COMMON_OPTIONS} for name, cls in AGGREGATORS.items()
}


def describe_aggregators() -> dict[str, dict[str, Any]]:
    """JSON-ready description of every aggregator and its options (types, defaults, bounds)."""
    return {
        name: {
            "description": cls.description,
            "options": {key: spec.as_dict() for key, spec in AGGREGATOR_OPTIONS[name].items()},
        }
        for name, cls in AGGREGATORS.items()
    }


def get(name: str, **options: Any) -> Aggregator:
    """A new aggregator by its option name (see ``AGGREGATOR_NAMES``)."""
    cls = AGGREGATORS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise AggregatorOptionsError(f"unknown aggregator {name!r}; choose one of {list(AGGREGATOR_NAMES)}")
    return cls(**options)
