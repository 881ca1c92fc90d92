"""Summary statistics of a stack of stochastic predictions.

``samples`` has shape ``(S, B, C, ...)``: S stochastic predictions (ensemble members, dropout
passes, SWAG draws) of a batch of B input rows with the class dimension at index 1 of each
prediction (PyTorch's convention, also for segmentation maps ``(B, C, H, W)``).

* ``variance`` = Var_s[y_s] and ``std`` = sqrt(variance), element-wise over the batch.
  ``correction=0`` gives the exact variance of S equally weighted predictions (ensembles: the
  members *are* the predictive distribution); ``correction=1`` the unbiased estimate from S
  Monte Carlo draws (MC dropout, SWAG).
* When every prediction is a probability vector over the class dimension (entries in [0, 1]
  summing to 1), per input row, in nats, with H(p) = −Σ_c p_c log p_c and 0·log 0 = 0:
  ``predictive_entropy`` = H(mean_s p_s), ``expected_entropy`` = mean_s H(p_s), and
  ``mutual_info`` = predictive_entropy − expected_entropy (BALD; ≥ 0 by Jensen's inequality,
  tiny negative rounding errors are clamped to 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

CLASS_DIM = 1  # of one prediction (B, C, ...)
_PROBABILITY_TOLERANCE = 1e-3


def entropy(probabilities: Tensor, dim: int) -> Tensor:
    """Shannon entropy in nats along ``dim``; 0·log 0 counts as 0."""
    return -torch.special.xlogy(probabilities, probabilities).sum(dim)


def are_probabilities(samples: Tensor) -> bool:
    """True when every prediction in ``samples`` (S, B, C, ...) is a categorical distribution
    over its class dimension: entries within [0, 1] and summing to 1 (within 1e-3)."""
    if samples.dim() < 3 or not samples.is_floating_point() or samples.numel() == 0:
        return False
    if not bool(torch.isfinite(samples).all()):
        return False
    if bool((samples < -1e-6).any()) or bool((samples > 1 + 1e-6).any()):
        return False
    sums = samples.sum(CLASS_DIM + 1)
    return bool(torch.allclose(sums, torch.ones_like(sums), atol=_PROBABILITY_TOLERANCE, rtol=0))


def interpret(samples: Tensor, *, correction: int = 1) -> dict[str, Tensor]:
    """Variance and std of the predictions, plus entropies and mutual information when the
    predictions are probabilities (see the module docstring for the formulas)."""
    if samples.dim() < 2:
        raise ValueError("samples must have shape (S, B, ...)")
    values = samples if samples.is_floating_point() else samples.double()
    count = values.shape[0]
    if count - correction <= 0:
        variance = torch.zeros_like(values[0])
    else:
        variance = values.var(0, correction=correction)
    result = {"variance": variance, "std": variance.sqrt()}
    if are_probabilities(values):
        mean = values.mean(0)
        predictive = entropy(mean, CLASS_DIM)
        expected = entropy(values, CLASS_DIM + 1).mean(0)
        result["predictive_entropy"] = predictive
        result["expected_entropy"] = expected
        result["mutual_info"] = (predictive - expected).clamp_min(0.0)
    return result
