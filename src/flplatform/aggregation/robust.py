"""Robust strategies: coordinate-wise median and trimmed mean, Krum and Multi-Krum.

They must see all n updates, so they hold references to them (zero-copy views cost nothing beyond
the bytes) and never stack whole models: the statistics run over blocks of coordinates of
``ROBUST_BLOCK_BYTES`` (clients × coordinates) at a time. Weights are ignored except for integer
buffers (the base class's weighted mean) and Multi-Krum's final mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .accumulator import Update, WeightedSum
from .base import Aggregator
from .codec import chunk_ranges
from .errors import InsufficientUpdatesError, ZeroTotalWeightError
from .kernels import accumulator_dtype, finalize_inplace
from .options import OptionSpec

#: Bytes of the (clients × coordinates) block robust aggregators sort at a time.
ROBUST_BLOCK_BYTES = 32 << 20


class _Robust(Aggregator):
    """Holds every update (zero-copy views where possible) and works on coordinate blocks."""

    collects = True

    def _block_rows(
        self, dtype: torch.dtype, start: int, stop: int, updates: list[Update], out: torch.Tensor
    ) -> torch.Tensor:
        """``out[i] = update_i[start:stop]`` (DP-clipped towards the global model when enabled)."""
        slots = self.layout.groups[dtype]
        for row, update in zip(out, updates, strict=False):
            source = update.sources[dtype]
            if isinstance(source, torch.Tensor):
                row.copy_(source[start:stop])
            else:
                for slot, tensor in zip(slots, source, strict=False):
                    lo, hi = max(start, slot.offset), min(stop, slot.offset + slot.numel)
                    if lo < hi:
                        flat = tensor.reshape(-1)  # small tensors keep their shape (gather_tensors)
                        row[lo - start : hi - start].copy_(flat[lo - slot.offset : hi - slot.offset])
            if update.clip != 1.0:
                reference = self._global_flat(dtype)[start:stop]
                row.sub_(reference).mul_(update.clip).add_(reference)
        return out

    def _blocks(self, dtype: torch.dtype, n: int) -> Iterable[tuple[int, int]]:
        per_row = max(1024, ROBUST_BLOCK_BYTES // (max(n, 1) * 8))
        return chunk_ranges(self.layout.numel[dtype], per_row)

    def _work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return accumulator_dtype(dtype, self.accumulate)

    def _non_float_means(self) -> dict[torch.dtype, torch.Tensor]:
        weighted_sum = self._weighted_sum
        if not weighted_sum.acc:
            return {}
        if self._scaled_total <= 0:
            raise ZeroTotalWeightError("the weights of the updates sum to zero; integer buffers have no mean")
        acc = weighted_sum.take()
        return {d: finalize_inplace(b, self._scaled_total, d, self.chunk) for d, b in acc.items()}


class _CoordinateWise(_Robust):
    def _statistic(self, block: torch.Tensor) -> torch.Tensor:  # (clients × coordinates) → coordinates
        raise NotImplementedError

    def _min_updates(self) -> int:
        return 1

    def _combine(self) -> dict[torch.dtype, torch.Tensor]:
        n = len(self._collected)
        if n < self._min_updates():
            raise InsufficientUpdatesError(
                f"{self.name} needs at least {self._min_updates()} updates, got {n}"
            )
        out = self._non_float_means()
        for dtype in self.layout.floating_dtypes:
            result = torch.empty(self.layout.numel[dtype], dtype=dtype)
            buffer = None
            for start, stop in self._blocks(dtype, n):
                if buffer is None or buffer.shape[1] != stop - start:
                    buffer = torch.empty((n, stop - start), dtype=self._work_dtype(dtype))
                block = self._block_rows(dtype, start, stop, self._collected, buffer)
                result[start:stop].copy_(self._statistic(block))
            out[dtype] = result
        return out


class Median(_CoordinateWise):
    name = "median"
    description = (
        "Coordinate-wise median of the client models (Yin et al. 2018; the mean of the two middle values "
        "for an even count, as numpy). Weights are ignored except for integer buffers."
    )

    def _statistic(self, block: torch.Tensor) -> torch.Tensor:
        n = block.shape[0]
        ordered = block.sort(dim=0).values
        if n % 2:
            return ordered[n // 2]
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMean(_CoordinateWise):
    name = "trimmed_mean"
    description = (
        "Coordinate-wise trimmed mean: drop the floor(beta·n) largest and smallest values of every "
        "coordinate and average the rest (Yin et al. 2018; as scipy.stats.trim_mean). Weights are ignored "
        "except for integer buffers."
    )
    options = {
        "beta": OptionSpec(
            float, 0.1, "Fraction trimmed at EACH end of every coordinate.",
            minimum=0.0, maximum=0.5, exclusive_maximum=True,
        ),
    }  # fmt: skip

    def _trim(self, n: int) -> int:
        return int(self.config["beta"] * n)

    def _statistic(self, block: torch.Tensor) -> torch.Tensor:
        n = block.shape[0]
        k = self._trim(n)
        kept = block.sort(dim=0).values[k : n - k] if k else block
        return kept.sum(dim=0, dtype=torch.float64) / (n - 2 * k)


class MultiKrum(_Robust):
    name = "multi_krum"
    description = (
        "Multi-Krum (Blanchard et al. 2017): score every update by the sum of squared distances to its "
        "n - f - 2 nearest others, average the m best-scored (weighted by their weights). Needs n > 2f + 2."
    )
    options = {
        "f": OptionSpec(int, 0, "Number of Byzantine (arbitrarily bad) clients to tolerate.", minimum=0),
        "m": OptionSpec(
            int, None, "How many best-scored updates to average; null means n - f.", minimum=1, nullable=True
        ),
    }

    def _select_count(self, n: int) -> int:
        m = self.config["m"]
        return n - self.config["f"] if m is None else m

    def selected(self) -> list[int]:
        """Indices (in add order) of the updates chosen in the last ``finish``."""
        return list(self._selected)

    def _combine(self) -> dict[torch.dtype, torch.Tensor]:
        n, f = len(self._collected), self.config["f"]
        if n <= 2 * f + 2:
            raise InsufficientUpdatesError(
                f"{self.name} with f={f} needs more than {2 * f + 2} updates, got {n}"
            )
        m = self._select_count(n)
        if m > n:
            raise InsufficientUpdatesError(f"{self.name} should average m={m} updates but got only {n}")
        distances = torch.zeros((n, n), dtype=torch.float64)
        for dtype in self.layout.floating_dtypes:
            buffer = None
            for start, stop in self._blocks(dtype, n):
                if buffer is None or buffer.shape[1] != stop - start:
                    buffer = torch.empty((n, stop - start), dtype=torch.float64)
                block = self._block_rows(dtype, start, stop, self._collected, buffer)
                gram = block @ block.T
                squares = gram.diagonal()
                distances += squares[:, None] + squares[None, :] - 2 * gram
        distances.clamp_(min=0).fill_diagonal_(float("inf"))
        nearest = n - f - 2
        scores = distances.sort(dim=1).values[:, :nearest].sum(dim=1)
        order = sorted(range(n), key=lambda i: (float(scores[i]), i))
        self._selected = order[:m]
        chosen = [self._collected[i] for i in self._selected]
        weight = sum(u.weight for u in chosen)
        if weight <= 0:
            raise ZeroTotalWeightError("the weights of the selected updates sum to zero")
        out = self._non_float_means()
        mean = WeightedSum(self.layout, self.layout.floating_dtypes, self.accumulate, self.chunk)
        global_coef = 0.0
        for batch_start in range(0, len(chosen), self.max_fold):
            batch = chosen[batch_start : batch_start + self.max_fold]
            mean.fold([(u, {d: u.weight * u.clip for d in self.layout.floating_dtypes}) for u in batch])
            global_coef += sum(u.weight * (1.0 - u.clip) for u in batch)
        for dtype, buffer in mean.take().items():
            if global_coef > 0:
                buffer.add_(self._global_flat(dtype), alpha=global_coef)
            out[dtype] = finalize_inplace(buffer, weight, dtype, self.chunk)
        return out


class Krum(MultiKrum):
    name = "krum"
    description = (
        "Krum (Blanchard et al. 2017): the single update with the smallest sum of squared distances to "
        "its n - f - 2 nearest others. Needs n > 2f + 2."
    )
    options = {"f": MultiKrum.options["f"]}

    def _select_count(self, n: int) -> int:
        return 1
