"""The aggregator base class: one round's life cycle, shared by every strategy.

Every aggregator has the same life cycle (see the package docstring for the contract)::

    agg.begin(global_state, state=None)      # once per round
    agg.add(update_state_dict, weight)       # once per update, as it arrives
    new_global, new_state = agg.finish()

Internally a round is three stages: *combine* the updates into one model (weighted mean, median, trimmed
mean, (Multi-)Krum), optionally add the *DP noise*, then apply the *server step* (identity, or a FedOpt
optimizer that treats ``combined - global`` as a pseudo-gradient). All tensor work is on one flat buffer
per dtype group (:class:`~flplatform.aggregation.codec.FlatLayout`), in cache-sized coordinate chunks, so
models made of hundreds of small tensors cost what one big tensor costs and memory stays bounded.

:class:`Aggregator` parses the options, validates and weighs updates, holds pending ones within the memory
budget, folds them into the running sum (:mod:`.accumulator`), applies central DP (:mod:`.dp`) and
finishes the round; strategies (:mod:`.fedavg`, :mod:`.robust`, :mod:`.fedopt`) override *combine* and
*server step*; names: :mod:`.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from . import dp, ordering
from .accumulator import (
    GatherPlan,
    Sources,
    Update,
    WeightedSum,
    gather_tensors,
    owned_pending_bytes,
    unchecked_inline_sources,
    wire_of,
)
from .codec import FlatLayout, StateDict, decode_safetensors, wire_bytes_of
from .errors import AggregatorOptionsError, AggregatorStateError, UpdateValidationError, ZeroTotalWeightError
from .kernels import DEFAULT_CHUNK, Release, all_finite, finalize_inplace
from .options import COMMON_OPTIONS, OptionSpec

#: Updates folded per pass over the accumulator when they are all at hand (a list, or views of bytes
#: kept in memory by their owner). Traffic per update is 1 + 2/k models: 1.06 at 32, 1.25 at 8.
DEFAULT_MAX_FOLD = 32


class Aggregator:
    """Common machinery; subclasses choose how updates are combined and the server step."""

    name: ClassVar[str]
    description: ClassVar[str]
    options: ClassVar[dict[str, OptionSpec]] = {}
    #: Whether the combine stage needs every update at once (robust statistics).
    collects: ClassVar[bool] = False
    #: Whether ``begin`` needs the current global model.
    needs_global: ClassVar[bool] = False

    def __init__(self, **options: Any):
        specs = {**COMMON_OPTIONS, **self.options}
        unknown = sorted(set(options) - set(specs))
        if unknown:
            raise AggregatorOptionsError(
                f"unknown option(s) {unknown} for aggregator {self.name!r}; allowed: {sorted(specs)}"
            )
        values = {key: spec.parse(key, options.get(key, spec.default)) for key, spec in specs.items()}
        if values["dp_noise_multiplier"] > 0 and values["dp_clip_norm"] is None:
            raise AggregatorOptionsError("dp_noise_multiplier > 0 needs dp_clip_norm")
        self.config: dict[str, Any] = values
        self.accumulate = torch.float64 if values["accumulate_dtype"] == "float64" else torch.float32
        self.clip_norm: float | None = values["dp_clip_norm"]
        self.noise_multiplier: float = values["dp_noise_multiplier"]
        self.seed: int | None = values["seed"]
        self.chunk = DEFAULT_CHUNK
        self.max_fold = DEFAULT_MAX_FOLD
        self._validate_options()
        self._phase = "idle"
        #: Make a streamed float64 mean independent of the order of ``add`` calls (:mod:`.ordering`):
        #: raw weights, the total summed exactly, a bound for :meth:`settle` to list the coordinates to
        #: recompute with :meth:`redo`. Set before :meth:`begin` (streamed float64 means only).
        self.track_order = False
        self._order: ordering.OrderBound | None = None
        self._settled: tuple[dict[torch.dtype, torch.Tensor], ordering.Redo] | None = None
        self._unbounded = False
        self._layout: FlatLayout | None = None
        self._sum: WeightedSum | None = None
        self.global_state: Mapping[str, torch.Tensor] | None = None

    def _validate_options(self) -> None:
        """Cross-option checks of subclasses."""

    @property
    def layout(self) -> FlatLayout:
        """The model's flat layout: from ``begin``'s global model, else from the round's first update."""
        if self._layout is None:
            raise AggregatorStateError("no model layout yet: begin() with a global model or add() an update")
        return self._layout

    @property
    def _weighted_sum(self) -> WeightedSum:
        if self._sum is None:
            raise AggregatorStateError("add() needs begin() first (and not after finish())")
        return self._sum

    @property
    def client_config(self) -> dict[str, Any]:
        """Options the *clients* need for their local training (FedProx's ``proximal_mu``)."""
        return {}

    # -- life cycle ------------------------------------------------------------------------------

    def begin(
        self, global_state: Mapping[str, torch.Tensor] | None, state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Start a round from the current global model and the aggregator state of the last round."""
        if global_state is None and (self.needs_global or self.clip_norm is not None):
            raise AggregatorStateError(
                f"aggregator {self.name!r}"
                + (" with DP clipping" if self.clip_norm is not None else "")
                + " needs the current global model in begin()"
            )
        self._layout = None
        self.global_state = global_state
        self._global_flats: dict[torch.dtype, torch.Tensor] = {}
        self._global_copied_bytes = 0
        self.n_updates = 0
        self.total_weight = 0.0
        # Weights are divided by the round's first positive weight: the mean is scale-invariant, and
        # tiny or huge raw weights (1e-50, 1e40) would otherwise under/overflow float32 coefficients.
        self._weight_scale = 0.0  # 0.0 until the round's first positive weight
        self._scaled_total = 0.0
        self._scaled_weights: list[float] = []
        self._order = None
        self._settled = None
        self._pending: list[Update] = []
        self._collected: list[Update] = []
        self._sum = None
        self._shaped: dict[torch.dtype, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # (see take)
        self._global_coef = 0.0  # Σ w_i (1 - clip_i): the share of the global model in the DP mean
        self._round = self._read_round(state)
        self._phase = "open"
        if global_state is not None:
            self._setup(FlatLayout(global_state))
            self.layout.check(global_state, "the global model")
            self._import_state(state or {})
        elif state and set(state) - {"round"}:
            # the round counter alone needs no model (a weighted mean begun before any update)
            raise AggregatorStateError(f"aggregator {self.name!r} got a state but no global model")

    def _setup(self, layout: FlatLayout) -> None:
        self._layout = layout
        self._gather = GatherPlan(layout)
        sum_dtypes = (
            list(layout.groups)
            if not self.collects
            else [d for d in layout.groups if not d.is_floating_point]
        )
        self._sum = WeightedSum(layout, sum_dtypes, self.accumulate, self.chunk)
        if self._tracks_order:
            self._order = ordering.OrderBound(layout, sum_dtypes, self.chunk)
        # Pending updates are held only while the accumulator plus them stay within 2 models.
        self._pending_budget = max(0, 2 * layout.nbytes - self._sum.nbytes)

    def _read_round(self, state: Mapping[str, torch.Tensor] | None) -> int:
        if not state or "round" not in state:
            return 0
        value = state["round"]
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.is_floating_point():
            raise AggregatorStateError("state['round'] must be an integer scalar tensor")
        return int(value.item())

    def _import_state(self, state: Mapping[str, torch.Tensor]) -> None:
        extra = sorted(set(state) - {"round"})
        if extra:
            raise AggregatorStateError(f"aggregator {self.name!r} keeps no state {extra[:5]}")

    def _export_state(self) -> StateDict:
        return {"round": torch.tensor(self._round + 1, dtype=torch.int64)}

    def add(
        self,
        state_dict: Mapping[str, torch.Tensor] | bytes | bytearray | memoryview,
        weight: float,
        release: Release | None = None,
        *,
        stable: bool = False,
        discard_on_error: bool = False,
    ) -> None:
        """Fold (or, for robust aggregators, keep) one update with its weight (e.g. sample count).

        The update is a state dict, or safetensors bytes: those are viewed zero-copy one flat range
        per dtype (no tensor per entry; the header is checked once per round). ``release`` (optional,
        see :data:`~.kernels.Release`) is called on the update's bytes as the order bound and the fold
        finish reading them (flat groups; e.g. to drop a memory map's pages behind the fold): only
        for bytes that read back the same afterwards. ``stable``: the caller keeps the update unchanged
        until :meth:`fold_pending` (a mapped immutable file): it may wait for the next ones' pass.
        ``discard_on_error``: the caller drops the round if this call raises (``fedavg``,
        ``aggregate``): a small model's update (folded inline) is then checked beside its fold, and
        a rejected one leaves the round unusable (else it leaves the round as it was).
        """
        if self._phase != "open":
            raise AggregatorStateError("add() needs begin() first (and not after finish())")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise UpdateValidationError(f"the weight must be a finite number >= 0, got {weight!r}")
        quick = discard_on_error and weight > 0 and self._layout is not None and self.streams
        unchecked = (
            unchecked_inline_sources(self._gather, self._weighted_sum, state_dict)
            if quick and not self._unbounded and self._order is None
            else None
        )
        sources, wire = (unchecked[0], None) if unchecked is not None else self._sources(state_dict)
        layout = self.layout
        nbytes = sum(layout.numel[d] * d.itemsize for d in sources)
        clip = (
            dp.clip_factor(layout, sources, self._global_flat, self.clip_norm, self.chunk)
            if self.clip_norm is not None
            else 1.0
        )
        if weight > 0 and self._weight_scale == 0.0:
            # order-tracked rounds keep raw weights (an order-independent scale; see track_order)
            self._weight_scale = 1.0 if self._tracks_order else float(weight)
        elif weight > 0 and weight / self._weight_scale > 2.0**64:
            self._rescale(float(weight))
        scaled = float(weight) / self._weight_scale if weight > 0 else 0.0
        update = Update(sources, scaled, clip, nbytes, wire, release, stable)
        self.n_updates += 1
        self.total_weight += float(weight)
        self._scaled_total += scaled
        if scaled > 0:
            self._scaled_weights.append(scaled)
            if self._order is not None:  # a flat update that waits for its fold: bounded as it is folded
                defer = not self.collects and all(isinstance(s, torch.Tensor) for s in sources.values())
                update.bound = self._order.add(sources, scaled, release, unclipped=clip == 1.0, defer=defer)
        if self.collects:
            self._collected.append(update)
            weighted_sum = self._weighted_sum
            if weighted_sum.acc:
                weighted_sum.fold([(update, self._coefs(update))])
            return
        if weight == 0:
            return
        if unchecked or (not self._unbounded and self._weighted_sum.folds_inline(sources)):
            # a small model's update, one by one: folded now (see accumulator.INLINE_FOLD_BYTES)
            self._flush()
            self._global_coef += update.weight * (1.0 - update.clip)
            try:
                self._weighted_sum.fold([(update, self._coefs(update))], check=unchecked and unchecked[1])
            except BaseException:
                if unchecked is not None:
                    self._phase = "failed"  # the sum may hold part of the rejected update
                raise
            return
        self._pending.append(update)
        # One at a time, only immutable bytes wait: a caller may refill its tensors in place for the
        # next update (yield model.state_dict() of one model). A list's (add_many) are all at hand.
        bounded = not (self._unbounded or stable)
        if len(self._pending) >= self.max_fold or (
            bounded and (update.wire is None or owned_pending_bytes(self._pending) > self._pending_budget)
        ):
            self._flush()

    def _sources(
        self, state_dict: Mapping[str, torch.Tensor] | bytes | bytearray | memoryview
    ) -> tuple[Sources, bytes | None]:
        """An update's tensors per dtype group (flat views where its layout allows) and the immutable
        wire bytes they view, if any; checked against the model (the first update defines it)."""
        if isinstance(state_dict, (bytes, bytearray, memoryview)):
            if self._layout is None:
                self._setup(FlatLayout(decode_safetensors(state_dict)))
            views = self.layout.wire_views(state_dict)
            if views is not None:
                return dict(views), wire_bytes_of(state_dict)
            # a file laid out unlike our encoder and the safetensors library
            state_dict = decode_safetensors(state_dict)
        if self._layout is None:
            self._setup(FlatLayout(state_dict))
        layout = self.layout
        gathered = gather_tensors(self._gather, state_dict)
        if gathered is None:
            layout.check(state_dict)  # raises, saying what differs
            raise UpdateValidationError("the update does not match the model")
        sources: Sources = {}
        for dtype, tensors in gathered.items():
            view = layout.flat_view(state_dict, dtype)
            sources[dtype] = view if view is not None else tensors
        return sources, wire_of(state_dict, sources)

    def _rescale(self, scale: float) -> None:
        """Express everything relative to a new (much larger) weight scale."""
        self._flush()
        factor = self._weight_scale / scale
        self._weighted_sum.scale(factor)
        for update in self._collected:
            update.weight *= factor
        self._global_coef *= factor
        self._scaled_total *= factor
        self._scaled_weights = [w * factor for w in self._scaled_weights]
        if self._order is not None:
            self._order.scale(factor)
        self._weight_scale = scale

    def add_many(
        self, pairs: Iterable[tuple[Mapping[str, torch.Tensor], float]], *, flush: bool = True
    ) -> None:
        """Add updates that are all in memory already (a list): fold ``max_fold`` per pass.

        The caller holds them anyway, so pending ones cost no extra memory and the 2-model budget
        that bounds :meth:`add` does not apply. ``flush=False`` leaves the last ones pending for a
        :meth:`finish` that follows at once (its fold then also divides by the total weight): only for
        a caller that keeps the updates alive until then.
        """
        self._unbounded = True
        try:
            for state_dict, weight in pairs:
                self.add(state_dict, weight)
                del state_dict
        finally:
            self._unbounded = False
        if self._phase == "open" and flush:
            self._flush()

    @property
    def streams(self) -> bool:
        """Whether the round's result is a plain running weighted sum that may be folded as updates
        arrive, one at a time (no robust statistic, no DP clipping or noise): FedAvg, FedProx and
        the FedOpt family (their server step runs at :meth:`finish`)."""
        return (
            not self.collects
            and type(self)._combine is Aggregator._combine
            and self.clip_norm is None
            and self.noise_multiplier == 0
        )

    @property
    def _tracks_order(self) -> bool:
        return self.track_order and self.streams and self.accumulate == torch.float64

    def settle(self) -> int:
        """With :attr:`track_order`: fold what is pending, form the mean, and return how many
        coordinates another order of the ``add`` calls could round differently; the caller then
        passes every update again, in its fixed order, to :meth:`redo` before :meth:`finish` (0:
        nothing to redo). Without it (or with no positive weight), 0 and nothing done."""
        if self._phase != "open":
            raise AggregatorStateError("settle() needs begin() first (and not after finish())")
        if self._order is None or self._settled is not None or not self._scaled_weights:
            return 0
        self._scaled_total = math.fsum(self._scaled_weights)
        self._flush(last=True)
        weighted_sum = self._weighted_sum
        means = set(weighted_sum.means)
        acc = weighted_sum.take()
        redo = ordering.Redo(self.layout)
        flats: dict[torch.dtype, torch.Tensor] = {}
        for dtype, buffer in acc.items():
            if dtype in means or buffer.dtype == dtype:  # no finer rounding hides the order: redo it all
                flats[dtype] = buffer  # the mean: the last flush divided it (dividing again was a bug)
                redo.want(dtype, None, buffer.dtype)
                continue
            flats[dtype], index = self._order.finalize(buffer, self._scaled_total, dtype)
            redo.want(dtype, index, buffer.dtype)
        self._settled = (flats, redo)
        self._order = None
        return redo.count

    def redo(
        self,
        state_dict: Mapping[str, torch.Tensor] | bytes | bytearray | memoryview,
        weight: float,
        release: Release | None = None,
    ) -> None:
        """After :meth:`settle`: one update again, with the weight it was added with (call for every
        update, in the fixed order; updates of weight 0 may be passed or not). ``release`` as for
        :meth:`add`."""
        if self._phase != "open" or self._settled is None:
            raise AggregatorStateError("redo() needs settle() first (and not after finish())")
        if weight > 0:
            sources, _ = self._sources(state_dict)
            self._settled[1].add(sources, float(weight) / self._weight_scale, release)

    def fold_pending(self) -> None:
        """Fold the updates still pending into the running sum now, so that nothing added so far is
        referenced any more (the caller may unmap or drop their bytes). Not for :attr:`collects`
        aggregators, which keep every update until :meth:`finish`."""
        if self._phase != "open":
            raise AggregatorStateError("fold_pending() needs begin() first (and not after finish())")
        self._flush()

    def held_bytes(self) -> int:
        """Bytes of tensors the aggregator itself holds now (accumulators, pending updates, copies)."""
        total = owned_pending_bytes(self._pending) + self._global_copied_bytes
        if self._sum is not None:
            total += self._sum.nbytes
        if self.collects:
            total += sum(u.nbytes for u in self._collected)
        return total + self._state_bytes()

    def _state_bytes(self) -> int:
        return 0

    def _coefs(self, update: Update) -> dict[torch.dtype, float]:
        return {d: update.weight * (update.clip if d.is_floating_point else 1.0) for d in self.layout.groups}

    def _flush(self, last: bool = False) -> None:
        # A plain mean's last fold also divides by the total weight (DP clipping adds first).
        fuse = (
            last
            and type(self)._combine is Aggregator._combine
            and self.clip_norm is None
            and self._scaled_total > 0
        )
        if self._pending:
            items = [(u, self._coefs(u)) for u in self._pending]
            for update in self._pending:
                self._global_coef += update.weight * (1.0 - update.clip)
            self._weighted_sum.fold(items, total=self._scaled_total if fuse else None)
            self._pending.clear()
        if fuse:  # groups this fold did not reach (all folded before): divided and checked in one read
            self._weighted_sum.divide(self._scaled_total, self.chunk)

    def finish(self) -> tuple[StateDict, StateDict]:
        """The new global model (state dict in the global model's key order) and the new state."""
        if self._phase != "open":
            raise AggregatorStateError("finish() needs begin() first and may be called once per round")
        if self._order is not None:
            self.settle()  # (a caller that does not redo keeps the arrival order's rounding)
        self._phase = "finished"
        if self.n_updates == 0:
            raise ZeroTotalWeightError("no update was added")
        self._flush(last=True)
        finite = self._sum.finite if self._sum is not None and self.streams else set()  # (see divide)
        flats = self._combine()
        if self.noise_multiplier > 0 and self.clip_norm is not None:  # noise needs clipping (options)
            std = self.noise_multiplier * self.clip_norm / self.n_updates
            dp.add_gaussian_noise(flats, self.layout.floating_dtypes, std, self.seed, self._round, self.chunk)
        flats = self._server_step(flats)
        proven = finite if type(self)._server_step is Aggregator._server_step else set()  # else changed
        for dtype, flat in flats.items():
            if dtype.is_floating_point and dtype not in proven and not all_finite(flat, self.chunk):
                raise UpdateValidationError(
                    "the aggregate contains NaN or infinite values (an update or the state is not finite)"
                )
        result = self.layout.views(flats, {d: v for d, (b, v) in self._shaped.items() if flats.get(d) is b})
        state = self._export_state()
        self._pending, self._collected, self._sum, self._shaped = [], [], None, {}
        return result, state

    # -- stages ----------------------------------------------------------------------------------

    def _global_flat(self, dtype: torch.dtype) -> torch.Tensor:
        """The global model's flat buffer of a dtype group (a view, or a copy made once per round)."""
        flat = self._global_flats.get(dtype)
        if flat is None:
            if self.global_state is None:  # begin() demands it wherever this is reached (DP, FedOpt)
                raise AggregatorStateError(f"aggregator {self.name!r} needs the current global model")
            flat = self.layout.flat_view(self.global_state, dtype)
            if flat is None:
                flat = self.layout.flatten(self.global_state, dtype)
                self._global_copied_bytes += flat.numel() * flat.element_size()
            self._global_flats[dtype] = flat
        return flat

    def _mean_flats(self) -> dict[torch.dtype, torch.Tensor]:
        """Finalise the weighted sum into means in the model dtypes (in the accumulator's memory)."""
        if self._scaled_total <= 0:
            raise ZeroTotalWeightError(
                f"the weights of the {self.n_updates} update(s) sum to zero; nothing to average"
            )
        if self._settled is not None:
            flats, redo = self._settled
            redo.apply(flats, self._scaled_total)
            self._settled = None
            return flats
        weighted_sum = self._weighted_sum
        means = weighted_sum.means
        acc = weighted_sum.take()
        self._shaped = weighted_sum.shaped
        out: dict[torch.dtype, torch.Tensor] = {}
        for dtype, buffer in acc.items():
            if dtype in means:
                out[dtype] = buffer
                continue
            if dtype.is_floating_point and self._global_coef > 0:
                buffer.add_(self._global_flat(dtype), alpha=self._global_coef)
            out[dtype] = finalize_inplace(buffer, self._scaled_total, dtype, self.chunk)
        return out

    def _combine(self) -> dict[torch.dtype, torch.Tensor]:
        return self._mean_flats()

    def _server_step(self, flats: dict[torch.dtype, torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
        return flats
