"""FedProx's proximal term (Li et al., 2020): the local objective becomes
``loss(w) + mu/2 * ||w - w_global||²``, which keeps each client near the global model it started from."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def proximal_term(
    module: torch.nn.Module, reference: Mapping[str, torch.Tensor], mu: float | None
) -> torch.Tensor:
    """``mu/2 * Σ ||w - w_ref||²`` over the trainable parameters of ``module``.

    ``reference`` maps parameter names to the global weights (see
    :func:`flplatform.client.serialization.snapshot`). The result is differentiable with
    respect to ``module``'s parameters; with ``mu`` unset or 0 it is a constant zero."""
    params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if not mu:
        device = params[0][1].device if params else None
        return torch.zeros((), device=device)
    total: torch.Tensor | None = None
    for name, param in params:
        if name not in reference:
            raise KeyError(f"parameter {name!r} has no reference weights")
        squared = (param - reference[name].to(param.device, param.dtype)).pow(2).sum()
        total = squared if total is None else total + squared
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total
