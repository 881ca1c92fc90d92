"""Aggregator options: their declaration (:class:`OptionSpec`), parsing and the common options.

Every aggregator declares its own options as ``{name: OptionSpec}``; :data:`COMMON_OPTIONS` (the
accumulator precision and central DP) apply to all of them. ``OptionSpec.as_dict`` is what
``describe_aggregators()`` publishes for schemas and docs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import AggregatorOptionsError


@dataclass(frozen=True)
class OptionSpec:
    """One option of an aggregator: its type, default, bounds and meaning."""

    type: type
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": {float: "number", int: "integer", str: "string"}[self.type],
            "default": self.default,
            "description": self.description,
            "nullable": self.nullable,
        }
        for key in ("minimum", "maximum", "choices"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "choices" else value
        if self.exclusive_minimum:
            out["exclusive_minimum"] = True
        if self.exclusive_maximum:
            out["exclusive_maximum"] = True
        return out

    def parse(self, name: str, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise AggregatorOptionsError(f"option {name!r} may not be null")
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AggregatorOptionsError(f"option {name!r} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise AggregatorOptionsError(f"option {name!r} must be finite, got {value!r}")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise AggregatorOptionsError(f"option {name!r} must be an integer, got {value!r}")
        elif not isinstance(value, self.type):
            raise AggregatorOptionsError(f"option {name!r} must be a {self.type.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise AggregatorOptionsError(
                f"option {name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        if self.minimum is not None and (
            value < self.minimum or (self.exclusive_minimum and value == self.minimum)
        ):
            relation = ">" if self.exclusive_minimum else ">="
            raise AggregatorOptionsError(f"option {name!r} must be {relation} {self.minimum}, got {value!r}")
        if self.maximum is not None and (
            value > self.maximum or (self.exclusive_maximum and value == self.maximum)
        ):
            relation = "<" if self.exclusive_maximum else "<="
            raise AggregatorOptionsError(f"option {name!r} must be {relation} {self.maximum}, got {value!r}")
        return value


COMMON_OPTIONS: dict[str, OptionSpec] = {
    "accumulate_dtype": OptionSpec(
        str, "float32",
        "Precision of the running sums and optimizer state for float32/16 models "
        "(float64 models always use float64).",
        choices=("float32", "float64"),
    ),
    "dp_clip_norm": OptionSpec(
        float, None,
        "Central DP: clip each update's delta (update - global) to this L2 norm over all floating "
        "tensors. Null disables clipping and DP.",
        minimum=0.0, exclusive_minimum=True, nullable=True,
    ),
    "dp_noise_multiplier": OptionSpec(
        float, 0.0,
        "Central DP: Gaussian noise of std noise_multiplier * clip_norm / n is added to every floating "
        "coordinate of the aggregate (n = updates in the round). Needs dp_clip_norm.",
        minimum=0.0,
    ),
    "seed": OptionSpec(
        int, None, "Seed of the DP noise (combined with the round number); null draws a random seed.",
        nullable=True,
    ),
}  # fmt: skip
