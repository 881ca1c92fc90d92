"""Server-optimizer strategies: FedAvgM (Hsu et al. 2019) and FedAdam, FedYogi, FedAdagrad (Reddi et
al. 2021, "Adaptive Federated Optimization").

Each takes the base class's weighted mean, then treats ``mean − global`` as a pseudo-gradient for an
optimizer step whose moments are the aggregator state carried between rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from .base import Aggregator
from .codec import StateDict, chunk_ranges
from .errors import AggregatorStateError
from .kernels import accumulator_dtype
from .options import OptionSpec


class _ServerOptimizer(Aggregator):
    """Weighted mean, then an optimizer step with the pseudo-gradient ``delta = mean - global``.

    State (``finish``'s second value, ``begin``'s ``state``): one tensor per floating model tensor and
    slot, named ``"<slot>.<tensor name>"`` (e.g. ``"m.fc.weight"``), plus ``"round"``. Integer buffers
    take the weighted mean (rounded), with no optimizer. Moments start at zero, without bias
    correction (as the paper and Flower).
    """

    needs_global = True
    slots: ClassVar[tuple[str, ...]] = ()

    def _state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return accumulator_dtype(dtype, self.accumulate)

    def _import_state(self, state: Mapping[str, torch.Tensor]) -> None:
        layout = self.layout
        self._moments: dict[str, dict[torch.dtype, torch.Tensor]] = {}
        expected = {
            f"{slot}.{s.name}"
            for slot in self.slots
            for d in layout.floating_dtypes
            for s in layout.groups[d]
        }
        given = set(state) - {"round"}
        if given and given != expected:
            missing = sorted(expected - given)[:5]
            extra = sorted(given - expected)[:5]
            raise AggregatorStateError(
                f"the {self.name} state does not fit the global model: missing {missing}, unexpected {extra}"
            )
        for slot in self.slots:
            self._moments[slot] = {}
            for dtype in layout.floating_dtypes:
                flat = torch.zeros(layout.numel[dtype], dtype=self._state_dtype(dtype))
                if given:
                    for s, view in zip(layout.groups[dtype], layout.slot_views(flat, dtype), strict=False):
                        tensor = state[f"{slot}.{s.name}"]
                        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != s.shape:
                            raise AggregatorStateError(
                                f"state tensor {slot}.{s.name} must have shape {list(s.shape)}"
                            )
                        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                            raise AggregatorStateError(f"state tensor {slot}.{s.name} must be finite floats")
                        view.copy_(tensor.reshape(-1))
                self._moments[slot][dtype] = flat

    def _state_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for m in getattr(self, "_moments", {}).values() for t in m.values()
        )

    def _export_state(self) -> StateDict:
        state = super()._export_state()
        for slot, flats in self._moments.items():
            views = {}
            for dtype, flat in flats.items():
                for s, view in zip(
                    self.layout.groups[dtype], self.layout.slot_views(flat, dtype), strict=False
                ):
                    views[f"{slot}.{s.name}"] = view.view(s.shape)
            state.update(views)
        return state

    def _server_step(self, flats: dict[torch.dtype, torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
        for dtype in self.layout.floating_dtypes:
            mean = flats[dtype]  # overwritten chunk by chunk with the new global model
            reference = self._global_flat(dtype)
            moments = {slot: self._moments[slot][dtype] for slot in self.slots}
            work = self._state_dtype(dtype)
            for start, stop in chunk_ranges(mean.numel(), self.chunk):
                g = reference[start:stop].to(work)  # may be the global model itself: never written
                delta = mean[start:stop].to(work) - g
                step = self._step(delta, {k: v[start:stop] for k, v in moments.items()})
                mean[start:stop].copy_(torch.add(g, step, alpha=self.config["server_lr"]))
        return flats

    def _step(self, delta: torch.Tensor, moments: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


_SERVER_LR = "Server learning rate (eta)."
_BETA1 = "First-moment decay (beta_1)."
_BETA2 = "Second-moment decay (beta_2)."
_TAU = "Adaptivity / numerical-stability constant (tau)."


class FedAvgM(_ServerOptimizer):
    name = "fedavgm"
    description = (
        "FedAvg with server momentum (Hsu et al. 2019): v = momentum·v + delta; "
        "global += server_lr·v, where delta = weighted mean - global."
    )
    slots = ("momentum",)
    options = {
        "server_lr": OptionSpec(float, 1.0, _SERVER_LR, minimum=0.0, exclusive_minimum=True),
        "momentum": OptionSpec(
            float, 0.9, "Server momentum (beta).", minimum=0.0, maximum=1.0, exclusive_maximum=True
        ),
    }

    def _step(self, delta: torch.Tensor, moments: dict[str, torch.Tensor]) -> torch.Tensor:
        velocity = moments["momentum"]
        velocity.mul_(self.config["momentum"]).add_(delta)
        return velocity


class _Adaptive(_ServerOptimizer):
    slots = ("m", "v")

    def _second_moment(self, v: torch.Tensor, square: torch.Tensor) -> None:
        raise NotImplementedError

    def _step(self, delta: torch.Tensor, moments: dict[str, torch.Tensor]) -> torch.Tensor:
        m, v = moments["m"], moments["v"]
        beta1 = self.config["beta1"]
        m.mul_(beta1).add_(delta, alpha=1.0 - beta1)
        self._second_moment(v, delta.square())
        return m / (v.sqrt() + self.config["tau"])


class FedAdam(_Adaptive):
    name = "fedadam"
    description = (
        "FedAdam (Reddi et al. 2021): m = b1·m + (1-b1)·delta; v = b2·v + (1-b2)·delta²; "
        "global += server_lr·m / (sqrt(v) + tau)."
    )
    options = {
        "server_lr": OptionSpec(float, 0.1, _SERVER_LR, minimum=0.0, exclusive_minimum=True),
        "beta1": OptionSpec(float, 0.9, _BETA1, minimum=0.0, maximum=1.0, exclusive_maximum=True),
        "beta2": OptionSpec(float, 0.99, _BETA2, minimum=0.0, maximum=1.0, exclusive_maximum=True),
        "tau": OptionSpec(float, 1e-9, _TAU, minimum=0.0, exclusive_minimum=True),
    }

    def _second_moment(self, v: torch.Tensor, square: torch.Tensor) -> None:
        beta2 = self.config["beta2"]
        v.mul_(beta2).add_(square, alpha=1.0 - beta2)


class FedYogi(_Adaptive):
    name = "fedyogi"
    description = "FedYogi (Reddi et al. 2021): as FedAdam but v = v - (1-b2)·delta²·sign(v - delta²)."
    options = {
        "server_lr": OptionSpec(float, 0.01, _SERVER_LR, minimum=0.0, exclusive_minimum=True),
        "beta1": OptionSpec(float, 0.9, _BETA1, minimum=0.0, maximum=1.0, exclusive_maximum=True),
        "beta2": OptionSpec(float, 0.99, _BETA2, minimum=0.0, maximum=1.0, exclusive_maximum=True),
        "tau": OptionSpec(float, 1e-3, _TAU, minimum=0.0, exclusive_minimum=True),
    }

    def _second_moment(self, v: torch.Tensor, square: torch.Tensor) -> None:
        v.sub_(square * torch.sign(v - square), alpha=1.0 - self.config["beta2"])


class FedAdagrad(_Adaptive):
    name = "fedadagrad"
    description = (
        "FedAdagrad (Reddi et al. 2021): m = b1·m + (1-b1)·delta; v = v + delta²; "
        "global += server_lr·m / (sqrt(v) + tau). (No beta2: Adagrad sums squares.)"
    )
    options = {
        "server_lr": OptionSpec(float, 0.1, _SERVER_LR, minimum=0.0, exclusive_minimum=True),
        "beta1": OptionSpec(float, 0.0, _BETA1, minimum=0.0, maximum=1.0, exclusive_maximum=True),
        "tau": OptionSpec(float, 1e-9, _TAU, minimum=0.0, exclusive_minimum=True),
    }

    def _second_moment(self, v: torch.Tensor, square: torch.Tensor) -> None:
        v.add_(square)
