"""SWAG-diagonal (Maddox et al., 2019, "A Simple Baseline for Bayesian Uncertainty in Deep
Learning") at inference time.

The posterior over the flat parameter vector θ (the module's ``parameters()`` in order) is
N(μ, diag(σ²)) with μ = E[θ] (the first moment) and σ² = clamp(E[θ²] − E[θ]², min_var) (the
second moment minus the squared first, clamped because rounding can make it slightly negative).
Each of the N draws is independent: θ_i = μ + sqrt(scale · σ²) ⊙ z_i with z_i ~ N(0, I) from a
seedable generator. ``scale`` = 1 is the posterior itself; Maddox et al. sample with 0.5.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

DEFAULT_MIN_VAR = 1e-30


class IncompatibleMoments(ValueError):
    """The stored moments do not fit the module (length, dtype, finiteness)."""


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_moments(first: Tensor, second: Tensor, expected_length: int | None = None) -> None:
    for name, moment in (("first", first), ("second", second)):
        if moment.dim() != 1:
            raise IncompatibleMoments(
                f"The SWAG {name} moment must be a flat 1-D tensor, got shape {list(moment.shape)}."
            )
        if not moment.is_floating_point():
            raise IncompatibleMoments(f"The SWAG {name} moment must be floating point, got {moment.dtype}.")
        if not bool(torch.isfinite(moment).all()):
            raise IncompatibleMoments(f"The SWAG {name} moment contains NaN or infinite values.")
    if first.numel() != second.numel():
        raise IncompatibleMoments(
            f"The SWAG moments differ in length ({first.numel()} and {second.numel()} values)."
        )
    if expected_length is not None and first.numel() != expected_length:
        raise IncompatibleMoments(
            f"The SWAG moments hold {first.numel()} values but the model has {expected_length} parameters."
        )


def swag_variance(first: Tensor, second: Tensor, *, min_var: float = DEFAULT_MIN_VAR) -> Tensor:
    """σ² = clamp(E[θ²] − E[θ]², min_var), computed in float64 against cancellation."""
    check_moments(first, second)
    mean = first.double()
    return (second.double() - mean * mean).clamp_min(min_var)


def sample_parameters(
    first: Tensor,
    second: Tensor,
    count: int,
    *,
    generator: torch.Generator | None = None,
    min_var: float = DEFAULT_MIN_VAR,
    scale: float = 1.0,
) -> Iterator[Tensor]:
    """``count`` independent draws θ_i ~ N(E[θ], scale · diag(σ²)), one flat vector at a time
    (memory stays O(P), not O(N·P)), in the first moment's dtype."""
    if count < 1:
        raise ValueError("count must be >= 1")
    if scale < 0:
        raise ValueError("scale must be >= 0")
    mean = first.double()
    std = (swag_variance(first, second, min_var=min_var) * scale).sqrt()
    for _ in range(count):
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        yield (mean + std * noise).to(first.dtype)


def load_flat_parameters(module: nn.Module, vector: Tensor) -> None:
    """Copy a flat vector into ``module.parameters()`` in order (works for TorchScript modules)."""
    offset = 0
    with torch.no_grad():
        for parameter in module.parameters():
            size = parameter.numel()
            parameter.copy_(vector[offset : offset + size].view_as(parameter))
            offset += size
    if offset != vector.numel():
        raise IncompatibleMoments(f"Vector of {vector.numel()} values for a model with {offset} parameters.")
