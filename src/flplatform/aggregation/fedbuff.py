"""FedBuff: buffered asynchronous aggregation (Nguyen et al. 2022, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS; arXiv:2106.06639).

Clients train from whatever global version is newest when they start and upload whenever they
finish; the server folds the first ``K`` updates that arrive (the buffer) into a new global
version without waiting for the rest. An update trained from version ``b`` and folded while the
server is at version ``t`` has staleness ``s = t - b``; its delta ``w_i - x_b`` (the client's
weights minus the global weights it started from) is discounted by a staleness weight
``α(s)``::

    x_{t+1} = x_t + η · Σ_i α(s_i) · n_i · (w_i - x_{b_i}) / Σ_i n_i

``η`` is the server learning rate, ``n_i`` the update's sample size (or 1 for every update with
``weight_by_samples=False``: then the step is ``Σ α(s_i) Δ_i / K``, the paper's rule). With
``η = 1``, no staleness and every base the current global, this is exactly FedAvg's weighted mean.

Staleness weights (:class:`StalenessRule`; Xie et al. 2019, "Asynchronous Federated
Optimization", for the polynomial and hinge families):

* ``constant``: ``α(s) = 1``;
* ``polynomial``: ``α(s) = (1 + s)^(-a)``; ``a = 0.5`` (the default) is FedBuff's ``1/sqrt(1+s)``;
* ``hinge``: ``α(s) = 1`` for ``s <= b``, else ``1 / (a (s - b) + 1)``.

Pure tensor code: no web, no database; never unpickles (updates are state dicts or safetensors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .codec import StateDict, decode_safetensors
from .errors import AggregatorOptionsError, AggregatorStateError, UpdateValidationError, ZeroTotalWeightError
from .options import OptionSpec

STALENESS_KINDS = ("constant", "polynomial", "hinge")

#: The options of a FedBuff training (``options.fedbuff``), published like the aggregators' options.
FEDBUFF_OPTIONS: dict[str, OptionSpec] = {
    "buffer_size": OptionSpec(
        int, 2, "K: a new global version is made from the first K updates that arrive.", minimum=1
    ),
    "server_lr": OptionSpec(
        float, 1.0, "η: the server learning rate applied to the buffer's mean delta.",
        minimum=0.0, exclusive_minimum=True,
    ),
    "staleness": OptionSpec(
        str, "polynomial", "Staleness weight α(s): constant 1, polynomial (1+s)^-a, or hinge.",
        choices=STALENESS_KINDS,
    ),
    "staleness_exponent": OptionSpec(
        float, 0.5, "a of the polynomial weight (0.5: 1/sqrt(1+s)).", minimum=0.0
    ),
    "hinge_a": OptionSpec(float, 10.0, "a of the hinge weight 1/(a(s-b)+1).", minimum=0.0),
    "hinge_b": OptionSpec(int, 4, "b of the hinge weight: no discount up to this staleness.", minimum=0),
    "max_staleness": OptionSpec(
        int, None, "Updates staler than this are refused at upload (null: any still in the history).",
        minimum=0, nullable=True,
    ),
    "weight_by_samples": OptionSpec(
        bool, True, "Weigh updates by their sample size n_i (false: every update counts 1, the paper's rule)."
    ),
}  # fmt: skip


def parse_fedbuff_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every FedBuff option with its default filled in; unknown or out-of-range → AggregatorOptionsError."""
    given = dict(options or {})
    unknown = sorted(set(given) - set(FEDBUFF_OPTIONS))
    if unknown:
        raise AggregatorOptionsError(
            f"unknown FedBuff option(s) {unknown}; allowed: {sorted(FEDBUFF_OPTIONS)}"
        )
    out: dict[str, Any] = {}
    for key, spec in FEDBUFF_OPTIONS.items():
        value = given.get(key, spec.default)
        if spec.type is bool:
            if not isinstance(value, bool):
                raise AggregatorOptionsError(f"option {key!r} must be true or false, got {value!r}")
            out[key] = value
        else:
            out[key] = spec.parse(key, value)
    return out


@dataclass(frozen=True)
class StalenessRule:
    """``α(s)``, the weight of an update that is ``s`` global versions old."""

    kind: str = "polynomial"
    exponent: float = 0.5
    hinge_a: float = 10.0
    hinge_b: int = 4

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise AggregatorOptionsError(
                f"staleness must be one of {list(STALENESS_KINDS)}, got {self.kind!r}"
            )
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise AggregatorOptionsError("staleness_exponent must be a finite number >= 0")
        if not (math.isfinite(self.hinge_a) and self.hinge_a >= 0) or self.hinge_b < 0:
            raise AggregatorOptionsError("hinge_a must be >= 0 and hinge_b an integer >= 0")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> StalenessRule:
        parsed = parse_fedbuff_options(options)
        return cls(parsed["staleness"], parsed["staleness_exponent"], parsed["hinge_a"], parsed["hinge_b"])

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise UpdateValidationError(f"staleness cannot be negative, got {staleness}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + staleness) ** -self.exponent)
        if staleness <= self.hinge_b:
            return 1.0
        return 1.0 / (self.hinge_a * (staleness - self.hinge_b) + 1.0)


class FedBuff:
    """One buffer's fold: ``begin(current)``, ``add(update, base, staleness, sample_size)`` per
    update (in any order), ``finish()`` → the new global state dict (same keys, shapes, dtypes).

    Sums run in float64; integer tensors (BatchNorm's ``num_batches_tracked``) take the same rule
    and are rounded. Memory: the current model, one float64 accumulator and the update in hand.
    """

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        staleness: StalenessRule | None = None,
        weight_by_samples: bool = True,
    ) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise AggregatorOptionsError(f"server_lr must be a finite number > 0, got {server_lr!r}")
        self.server_lr = float(server_lr)
        self.staleness = staleness or StalenessRule()
        self.weight_by_samples = weight_by_samples
        self._current: Mapping[str, torch.Tensor] | None = None
        self._acc: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.n_updates = 0
        #: (staleness, α(s)) of every update added, in order.
        self.weights: list[tuple[int, float]] = []

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> FedBuff:
        parsed = parse_fedbuff_options(options)
        return cls(
            server_lr=parsed["server_lr"],
            staleness=StalenessRule(
                parsed["staleness"], parsed["staleness_exponent"], parsed["hinge_a"], parsed["hinge_b"]
            ),
            weight_by_samples=parsed["weight_by_samples"],
        )

    def begin(self, current: Mapping[str, torch.Tensor]) -> None:
        self._current = current
        self._acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in current.items()}
        self.total_weight, self.n_updates, self.weights = 0.0, 0, []

    def _check(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        assert self._current is not None
        if state.keys() != self._current.keys():
            missing = sorted(set(self._current) - set(state))[:5]
            extra = sorted(set(state) - set(self._current))[:5]
            raise UpdateValidationError(f"{what} does not match the model (missing {missing}, extra {extra})")
        for key, ref in self._current.items():
            tensor = state[key]
            if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
                raise UpdateValidationError(
                    f"{what}: {key!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                    f"the model has {ref.dtype} {tuple(ref.shape)}"
                )

    def add(
        self,
        update: Mapping[str, torch.Tensor] | bytes | bytearray | memoryview,
        base: Mapping[str, torch.Tensor],
        *,
        staleness: int,
        sample_size: float,
    ) -> float:
        """Fold one update trained from ``base``; returns its staleness weight ``α(s)``."""
        if self._current is None:
            raise AggregatorStateError("add() needs begin() first")
        if isinstance(update, (bytes, bytearray, memoryview)):
            update = decode_safetensors(update)  # zero-copy views (of a memory-mapped blob, say)
        if isinstance(sample_size, bool) or not math.isfinite(sample_size) or sample_size < 0:
            raise UpdateValidationError(f"the sample size must be a finite number >= 0, got {sample_size!r}")
        self._check(update, "the update")
        self._check(base, "the update's base version")
        alpha = self.staleness(staleness)
        n = float(sample_size) if self.weight_by_samples else 1.0
        for key, acc in self._acc.items():
            for ours, theirs, mine in _pieces(acc, update[key], base[key]):
                ours.add_(theirs.to(torch.float64) - mine.to(torch.float64), alpha=alpha * n)
        self.total_weight += n
        self.n_updates += 1
        self.weights.append((staleness, alpha))
        return alpha

    def finish(self) -> StateDict:
        """``x + η · Σ α n Δ / Σ n`` in the model's dtypes."""
        if self._current is None:
            raise AggregatorStateError("finish() needs begin() first")
        if self.n_updates == 0 or self.total_weight <= 0:
            raise ZeroTotalWeightError(
                f"the weights of the {self.n_updates} buffered update(s) sum to zero; nothing to fold"
            )
        out: StateDict = {}
        scale = self.server_lr / self.total_weight
        for key, ref in self._current.items():
            result = out[key] = torch.empty(ref.shape, dtype=ref.dtype)
            for target, acc, current in _pieces(result, self._acc[key], ref):
                value = current.to(torch.float64) + acc * scale
                if not bool(torch.isfinite(value).all()):
                    raise UpdateValidationError(f"the new global {key!r} is not finite")
                target.copy_(value if ref.is_floating_point() else torch.round(value))
        self._current, self._acc = None, {}
        return out


#: Coordinates per piece of FedBuff's float64 arithmetic: its temporaries stay this size (8 MiB
#: each), never a model-sized tensor (the same values as whole-tensor arithmetic: it is elementwise).
PIECE = 1 << 20


def _pieces(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Matching 1-D pieces of same-shaped tensors (the first is written into: a contiguous view)."""
    flat = [t.reshape(-1) for t in tensors]
    return [tuple(t[start : start + PIECE] for t in flat) for start in range(0, flat[0].numel(), PIECE)]
