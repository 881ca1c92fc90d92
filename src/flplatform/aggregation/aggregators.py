"""The aggregators: streaming weighted mean, robust statistics, server optimizers, central DP.

Every aggregator has the same life cycle (see the package docstring for the contract)::

    agg.begin(global_state, state=None)      # once per round
    agg.add(update_state_dict, weight)       # once per update, as it arrives
    new_global, new_state = agg.finish()

Internally a round is three stages: *combine* the updates into one model (weighted mean, median,
trimmed mean, (Multi-)Krum), optionally add the *DP noise*, then apply the *server step* (identity, or
a FedOpt optimizer that treats ``combined - global`` as a pseudo-gradient). All tensor work is on one
flat buffer per dtype group (:class:`~flplatform.aggregation.codec.FlatLayout`), in cache-sized
coordinate chunks, so models made of hundreds of small tensors cost what one big tensor costs and
memory stays bounded.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .codec import (
    FlatLayout,
    StateDict,
    WireState,
    chunk_ranges,
    decode_safetensors,
    held_elsewhere,
    wire_bytes_of,
)
from .errors import (
    AggregatorOptionsError,
    AggregatorStateError,
    InsufficientUpdatesError,
    UpdateValidationError,
    ZeroTotalWeightError,
)

#: Coordinates per chunk: 2**18 float32 = 1 MiB, half of it per core's 1 MiB L2 with two threads.
DEFAULT_CHUNK = 1 << 18
#: Updates folded per pass over the accumulator when they are all at hand (a list, or views of bytes
#: kept in memory by their owner). Traffic per update is 1 + 2/k models: 1.06 at 32, 1.25 at 8.
DEFAULT_MAX_FOLD = 32
#: Bytes of the (clients × coordinates) block robust aggregators sort at a time.
ROBUST_BLOCK_BYTES = 32 << 20

Sources = dict[torch.dtype, "torch.Tensor | list[torch.Tensor]"]


def _accumulate_dtype(model_dtype: torch.dtype, requested: torch.dtype) -> torch.dtype:
    """Accumulator dtype of a group: floats at least ``requested``; integers in a float that holds
    them exactly enough (weighted means are rounded back); booleans as float32 (majority vote)."""
    if model_dtype.is_floating_point:
        if torch.finfo(model_dtype).bits >= torch.finfo(requested).bits:
            return model_dtype
        return requested
    if model_dtype == torch.bool:
        return torch.float32
    if torch.empty((), dtype=model_dtype).element_size() <= 2:
        return torch.float32
    return torch.float64


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A view of ``tensor``'s storage (from its first byte) reinterpreted as ``dtype``, same length."""
    return torch.empty(0, dtype=dtype).set_(tensor.untyped_storage(), 0, (tensor.numel(),))


def _finalize_inplace(acc: torch.Tensor, divisor: float, out_dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """``acc / divisor`` converted to ``out_dtype`` IN the accumulator's own memory (no second model).

    Integers are rounded half to even and clamped to their range; booleans become ``mean >= 0.5``.
    Chunks go front to back: chunk ``[s, e)`` is read completely before its converted values are
    written to bytes ``[s*o, e*o)`` with ``o <= acc item size``, which only holds elements ``< e``.
    """
    if out_dtype == acc.dtype:
        return acc.div_(divisor)
    out = _as_dtype(acc, out_dtype)
    for start, stop in chunk_ranges(acc.numel(), chunk):
        part = acc[start:stop] / divisor
        if out_dtype == torch.bool:
            part = part >= 0.5
        elif not out_dtype.is_floating_point:
            info = torch.iinfo(out_dtype)
            part = part.round_().clamp_(info.min, info.max)
        out[start:stop].copy_(part)
    return out


def _all_finite(flat: torch.Tensor, chunk: int) -> bool:
    """Whether every value is finite, without a model-sized temporary.

    ``torch.isfinite`` of a whole model builds ``abs`` and comparison temporaries worth ≈ 1.75
    models (measured), breaking the 2-model bound, and chunk by chunk it is slow (several kernels
    per chunk). A plain sum is one read pass with no temporary: NaN and ±inf always reach it
    (inf + -inf is NaN), so a finite sum proves every value finite. Only a non-finite sum (a bad
    value, or finite values so large that their sum overflows) takes the exact chunked check.
    """
    if math.isfinite(float(flat.sum())):
        return True
    return all(
        bool(torch.isfinite(flat[start:stop]).all()) for start, stop in chunk_ranges(flat.numel(), chunk)
    )


@dataclass
class _Update:
    """One added update: its tensors per dtype group (one flat view, or per-tensor 1-D views)."""

    sources: Sources
    weight: float
    clip: float  # DP clipping factor applied to floating groups (1.0 without DP)
    nbytes: int
    wire: bytes | None = None  # the immutable bytes every source views (decoded zero-copy), else None


#: Bytes of accumulator per fold kernel call: half a core's 1 MiB L2, so the slice stays in cache while
#: every source of the pass is added to it. Larger chunks mean fewer kernel launches (each costs ~1.5 µs
#: of fixed work): 512 KiB folded ≈ 25 % faster than ATen's 128 KiB GRAIN_SIZE, measured interleaved.
#: That needs fold threads that run kernels inline (see :func:`_inline_kernels`); without them, chunks
#: stay at GRAIN_SIZE, below which ATen never starts an OpenMP team.
FOLD_CHUNK_BYTES = 512 << 10
GRAIN_CHUNK_BYTES = 128 << 10
#: Coordinates per fold kernel call for a float32 accumulator (float64: half as many).
FOLD_CHUNK = FOLD_CHUNK_BYTES // 4
#: Pieces of coordinates per fold worker, taken dynamically (see :func:`fold_flat`).
PIECES_PER_WORKER = 4

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _fold_workers() -> int:
    return max(1, torch.get_num_threads())


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's kernels use (torch's wheels bundle it in ``torch/lib``), or None."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib"):
        for path in sorted(lib_dir.glob(pattern)):
            try:
                runtime = ctypes.CDLL(str(path))  # already loaded by torch: the same handle
                runtime.omp_set_num_threads.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                continue
            return runtime
    return None


def _inline_kernels() -> bool:
    """Make ATen run kernels inline in the *calling* thread (no OpenMP team); True if it took.

    OpenMP keeps the team size per thread, but ``torch.set_num_threads`` also changes the default of
    every thread that starts using torch later (inference in the server's worker threads would run
    single-threaded), so the fold threads set their own size in the OpenMP runtime directly. ATen
    initialises a thread's setting on its first call, so that call comes first.
    """
    torch.get_num_threads()
    runtime = _openmp_runtime()
    if runtime is None:
        return False
    runtime.omp_set_num_threads(1)
    return torch.get_num_threads() == 1


def fold_chunk(dtype: torch.dtype) -> int:
    """Coordinates per fold kernel call for an accumulator of ``dtype``."""
    budget = FOLD_CHUNK_BYTES if _openmp_runtime() is not None else GRAIN_CHUNK_BYTES
    return budget // torch.empty((), dtype=dtype).element_size()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            # Kernels in the fold threads run inline: OpenMP teams inside our own threads would
            # oversubscribe the cores, and on a busy machine a descheduled member stalls every barrier.
            _POOL = ThreadPoolExecutor(
                max_workers=max(2, _fold_workers()),
                thread_name_prefix="flp-fold",
                initializer=_inline_kernels,
            )
        return _POOL


def fold_flat(
    acc: torch.Tensor,
    sources: list[torch.Tensor],
    coefs: list[float],
    chunk: int | None = None,
    acc_chunks: tuple[torch.Tensor, ...] | None = None,
    init: bool = False,
    acc_scale: float | None = None,
) -> None:
    """``acc += Σ coefs[k] · sources[k]`` (1-D, same length), cache-blocked and multi-threaded.

    With ``init=True`` it is ``acc = Σ coefs[k] · sources[k]`` instead: ``acc`` may hold anything
    (``torch.empty``), which spares zero-filling a fresh accumulator and reading those zeros back.
    With ``acc_scale`` it is ``acc = acc_scale · acc + Σ …`` (a round's last pass turning the sum into
    the mean without another pass over the accumulator).
    For each ``chunk`` of coordinates every source is added while that slice of the accumulator is in
    cache, so the accumulator is read and written once per call instead of once per source. One
    ``torch._foreach_addcmul_`` call per piece does its chunks × sources in C++ with the GIL released
    (``addcmul`` with a broadcast one carries a per-source weight). The coordinates are cut into a few
    pieces per worker that the fold threads take in turn, so a thread the OS descheduled (the machine
    is shared) does not stall the others at a fixed split; the caller waits.
    Any source dtype works (promoted chunk by chunk, never a model-sized temporary). ``chunk``
    defaults to :func:`fold_chunk` of the accumulator's dtype; ``acc_chunks`` may pass
    ``acc.split(chunk)`` made once per round (hundreds of views per call).
    """
    if not sources:
        return
    n = acc.numel()
    if chunk is None:
        chunk = fold_chunk(acc.dtype)
    if acc_chunks is None:
        acc_chunks = acc.split(chunk)
    one = torch.ones(1, dtype=acc.dtype)
    per_chunk = len(sources)

    def run(lo: int, hi: int) -> None:
        # The sources' chunk views are made here, per piece, not all up front: making views holds the
        # GIL (~1 ms per 100 MB source), and here it overlaps the other workers' kernels, which don't.
        source_chunks = [source[lo * chunk : hi * chunk].split(chunk) for source in sources]
        if init or acc_scale is not None:
            # chunk by chunk, so the freshly written or scaled slice is still in cache for the sources
            rest, rest_coefs = (source_chunks[1:], coefs[1:]) if init else (source_chunks, coefs)
            ones = [one] * len(rest)
            for index in range(hi - lo):
                target = acc_chunks[lo + index]
                if init:
                    torch.mul(source_chunks[0][index], coefs[0], out=target)
                else:
                    target.mul_(acc_scale)
                if rest:
                    torch._foreach_addcmul_([target] * len(rest), [c[index] for c in rest], ones, rest_coefs)
            return
        targets: list[torch.Tensor] = []
        tensors: list[torch.Tensor] = []
        for index in range(hi - lo):
            targets.extend([acc_chunks[lo + index]] * per_chunk)
            tensors.extend(chunks[index] for chunks in source_chunks)
        torch._foreach_addcmul_(targets, tensors, [one] * len(targets), coefs * (hi - lo))

    count = len(acc_chunks)
    workers = min(_fold_workers(), count, max(1, n * per_chunk // (4 * chunk)))
    if workers <= 1:
        run(0, count)
        return
    pieces = min(count, workers * PIECES_PER_WORKER)
    bounds = [count * i // pieces for i in range(pieces + 1)]
    taken = itertools.count()  # next() on it is atomic under the GIL
    # The pool reaches the sources only through this holder, cleared after the join: a pool thread
    # keeps its finished work item a moment after the result is set, and a cancelled work item
    # waits in the queue, so a closure over ``run`` would keep the updates alive past the call.
    holder = {"run": run}

    def drain() -> None:
        work = holder.get("run")
        while work is not None and (piece := next(taken)) < pieces:
            work(bounds[piece], bounds[piece + 1])

    # Every piece runs in the fold threads (kernels inline, no OpenMP team); the caller's own thread would
    # start an OpenMP team per kernel call of this size.
    futures = [_pool().submit(drain) for _ in range(workers)]
    try:
        for future in futures:
            future.result()
    finally:
        holder.clear()


class _WeightedSum:
    """Running ``Σ coef_i · update_i`` over some dtype groups, in flat buffers.

    ``fold`` adds several updates per pass over the accumulator (see :func:`fold_flat`): memory
    traffic per update falls from 3 passes (read update, read + write accumulator) towards 1.
    Updates whose group is not one contiguous range go through ``torch._foreach_add_`` per tensor.
    Buffers start uninitialised (``fresh``): the first fold writes them instead of adding to zeros.
    """

    def __init__(
        self, layout: FlatLayout, dtypes: Iterable[torch.dtype], accumulate: torch.dtype, chunk: int
    ):
        self.layout = layout
        self.chunk = chunk
        self.acc: dict[torch.dtype, torch.Tensor] = {
            d: torch.empty(layout.numel[d], dtype=_accumulate_dtype(d, accumulate)) for d in dtypes
        }
        self.fresh: set[torch.dtype] = set(self.acc)
        self.means: set[torch.dtype] = set()  # groups already divided by the total weight (see fold)
        self._acc_views: dict[torch.dtype, list[torch.Tensor]] = {}
        self._acc_chunks: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acc.values())

    def fold(
        self, items: list[tuple[_Update, dict[torch.dtype, float]]], mean_scale: float | None = None
    ) -> None:
        """Add ``Σ coefs[dtype] · update.sources[dtype]`` for every group.

        ``mean_scale`` (1 / total weight) marks the round's last fold: floating groups summed in their
        own dtype whose updates are flat become the mean in the same pass (listed in ``means``) instead
        of being divided by another pass later.
        """
        for dtype, acc in self.acc.items():
            flat_sources: list[torch.Tensor] = []
            flat_coefs: list[float] = []
            fuse = mean_scale is not None and dtype.is_floating_point and acc.dtype == dtype
            if fuse and any(not isinstance(update.sources[dtype], torch.Tensor) for update, _ in items):
                fuse = False
            for update, coefs in items:
                coef = coefs[dtype]
                if coef == 0.0:
                    continue
                source = update.sources[dtype]
                if isinstance(source, torch.Tensor):
                    flat_sources.append(source)
                    flat_coefs.append(coef * mean_scale if fuse else coef)
                else:
                    if dtype in self.fresh:
                        acc.zero_()
                        self.fresh.discard(dtype)
                    self._fold_tensors(dtype, acc, source, coef)
            if flat_sources:
                chunk = fold_chunk(acc.dtype)
                chunks = self._acc_chunks.get(dtype)
                if chunks is None:
                    chunks = self._acc_chunks[dtype] = acc.split(chunk)
                fresh = dtype in self.fresh
                fold_flat(
                    acc,
                    flat_sources,
                    flat_coefs,
                    chunk=chunk,
                    acc_chunks=chunks,
                    init=fresh,
                    acc_scale=mean_scale if fuse and not fresh else None,
                )
                self.fresh.discard(dtype)
                if fuse:
                    self.means.add(dtype)

    def _fold_tensors(
        self, dtype: torch.dtype, acc: torch.Tensor, tensors: list[torch.Tensor], coef: float
    ) -> None:
        views = self._acc_views.get(dtype)
        if views is None:
            views = self._acc_views[dtype] = self.layout.slot_views(acc, dtype)
        small_targets, small_sources = [], []
        for target, source in zip(views, tensors, strict=False):
            if source.numel() <= FOLD_CHUNK:
                small_targets.append(target)
                small_sources.append(source)
            else:
                fold_flat(target, [source], [coef])
        if small_targets:
            torch._foreach_add_(small_targets, small_sources, alpha=coef)

    def scale(self, factor: float) -> None:
        for dtype, buffer in self.acc.items():
            if dtype not in self.fresh:
                buffer.mul_(factor)

    def take(self) -> dict[torch.dtype, torch.Tensor]:
        """The sums (zeros for a group nothing was folded into); the object is empty afterwards."""
        for dtype in self.fresh:
            self.acc[dtype].zero_()
        acc, self.acc, self._acc_views, self._acc_chunks, self.fresh, self.means = (
            self.acc,
            {},
            {},
            {},
            set(),
            set(),
        )
        return acc


def _wire_of(state_dict: Mapping[str, torch.Tensor], sources: Sources) -> bytes | None:
    """The bytes ``state_dict`` was decoded from (zero-copy) when every source still views them."""
    if not isinstance(state_dict, WireState) or state_dict.wire is None:
        return None
    address = state_dict.address
    for source in sources.values():
        tensors = [source] if isinstance(source, torch.Tensor) else source
        for tensor in tensors:
            if tensor.numel() and tensor.untyped_storage().data_ptr() != address:
                return None  # replaced or copied by the caller: not a view of the wire bytes
    return state_dict.wire


# ----------------------------------------------------------------------------------------------------
# options


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


# ----------------------------------------------------------------------------------------------------
# base class


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
        self._unbounded = False

    def _validate_options(self) -> None:
        """Cross-option checks of subclasses."""

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
        self.layout: FlatLayout | None = None
        self.global_state = global_state
        self._global_flats: dict[torch.dtype, torch.Tensor] = {}
        self._global_copied_bytes = 0
        self.n_updates = 0
        self.total_weight = 0.0
        # Weights are divided by the round's first positive weight: the mean is scale-invariant, and
        # tiny or huge raw weights (1e-50, 1e40) would otherwise under/overflow float32 coefficients.
        self._weight_scale: float | None = None
        self._scaled_total = 0.0
        self._pending: list[_Update] = []
        self._collected: list[_Update] = []
        self._sum: _WeightedSum | None = None
        self._global_coef = 0.0  # Σ w_i (1 - clip_i): the share of the global model in the DP mean
        self._round = self._read_round(state)
        self._phase = "open"
        if global_state is not None:
            self._setup(FlatLayout(global_state))
            self.layout.check(global_state, "the global model")
            self._import_state(state or {})
        elif state:
            raise AggregatorStateError(f"aggregator {self.name!r} got a state but no global model")

    def _setup(self, layout: FlatLayout) -> None:
        self.layout = layout
        sum_dtypes = (
            list(layout.groups)
            if not self.collects
            else [d for d in layout.groups if not d.is_floating_point]
        )
        self._sum = _WeightedSum(layout, sum_dtypes, self.accumulate, self.chunk)
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
        self, state_dict: Mapping[str, torch.Tensor] | bytes | bytearray | memoryview, weight: float
    ) -> None:
        """Fold (or, for robust aggregators, keep) one update with its weight (e.g. sample count).

        The update is a state dict, or safetensors bytes: those are viewed zero-copy one flat range
        per dtype (no tensor per entry; the header is checked once per round).
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
        sources: Sources | None = None
        wire: bytes | None = None
        if isinstance(state_dict, (bytes, bytearray, memoryview)):
            data = state_dict
            if self.layout is None:
                self._setup(FlatLayout(decode_safetensors(data)))
            views = self.layout.wire_views(data)
            if views is None:  # a file laid out unlike our encoder and the safetensors library
                state_dict = decode_safetensors(data)
            else:
                sources, wire = dict(views), wire_bytes_of(data)
            del data
        if sources is None:
            if self.layout is None:
                self._setup(FlatLayout(state_dict))
            self.layout.check(state_dict)
            sources = {}
            for dtype in self.layout.groups:
                view = self.layout.flat_view(state_dict, dtype)
                sources[dtype] = view if view is not None else self.layout.tensors(state_dict, dtype)
            wire = _wire_of(state_dict, sources)
        nbytes = sum(
            self.layout.numel[d] * (s.element_size() if isinstance(s, torch.Tensor) else s[0].element_size())
            for d, s in sources.items()
        )
        clip = self._clip_factor(sources) if self.clip_norm is not None else 1.0
        if weight > 0 and self._weight_scale is None:
            self._weight_scale = float(weight)
        elif weight > 0 and weight / self._weight_scale > 2.0**64:
            self._rescale(float(weight))
        scaled = float(weight) / self._weight_scale if weight > 0 else 0.0
        update = _Update(sources, scaled, clip, nbytes, wire)
        self.n_updates += 1
        self.total_weight += float(weight)
        self._scaled_total += scaled
        if self.collects:
            self._collected.append(update)
            if self._sum.acc:
                self._sum.fold([(update, self._coefs(update))])
            return
        if weight == 0:
            return
        self._pending.append(update)
        if len(self._pending) >= self.max_fold or (
            not self._unbounded and self._owned_pending_bytes() > self._pending_budget
        ):
            self._flush()

    def _owned_pending_bytes(self) -> int:
        """Bytes of pending updates that only the aggregator keeps alive.

        A pending update decoded zero-copy from ``bytes`` that someone else keeps in memory anyway (the
        server's upload buffers, a list of blobs) costs nothing to hold, so such updates wait until
        ``max_fold`` of them fold in one pass over the accumulator. The newest update always counts (its
        caller still holds it during ``add``), and one whose bytes the caller has let go counts from
        the next ``add`` on: a stream of freshly received or loaded updates keeps the 2-model bound.
        """
        if not self._pending:
            return 0
        holders = Counter(id(u.wire) for u in self._pending if u.wire is not None)
        newest = self._pending[-1]
        return sum(
            u.nbytes
            for u in self._pending
            if u is newest or u.wire is None or not held_elsewhere(u.wire, holders[id(u.wire)])
        )

    def _rescale(self, scale: float) -> None:
        """Express everything relative to a new (much larger) weight scale."""
        self._flush()
        factor = self._weight_scale / scale
        self._sum.scale(factor)
        for update in self._collected:
            update.weight *= factor
        self._global_coef *= factor
        self._scaled_total *= factor
        self._weight_scale = scale

    def add_many(self, pairs: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> None:
        """Add updates that are all in memory already (a list): fold ``max_fold`` per pass.

        The caller holds them anyway, so pending ones cost no extra memory and the 2-model budget
        that bounds :meth:`add` does not apply.
        """
        self._unbounded = True
        try:
            for state_dict, weight in pairs:
                self.add(state_dict, weight)
                del state_dict
        finally:
            self._unbounded = False
        if self._phase == "open":
            self._flush()

    def held_bytes(self) -> int:
        """Bytes of tensors the aggregator itself holds now (accumulators, pending updates, copies)."""
        total = self._owned_pending_bytes() + self._global_copied_bytes
        if self._sum is not None:
            total += self._sum.nbytes
        if self.collects:
            total += sum(u.nbytes for u in self._collected)
        return total + self._state_bytes()

    def _state_bytes(self) -> int:
        return 0

    def _coefs(self, update: _Update) -> dict[torch.dtype, float]:
        return {d: update.weight * (update.clip if d.is_floating_point else 1.0) for d in self.layout.groups}

    def _flush(self, last: bool = False) -> None:
        if not self._pending:
            return
        items = [(u, self._coefs(u)) for u in self._pending]
        for update in self._pending:
            self._global_coef += update.weight * (1.0 - update.clip)
        # The round's last fold of a plain weighted mean also divides by the total weight (one pass
        # over the accumulator less); DP clipping still adds its share of the global model first.
        fuse = (
            last
            and type(self)._combine is Aggregator._combine
            and self.clip_norm is None
            and self._scaled_total > 0
        )
        self._sum.fold(items, mean_scale=1.0 / self._scaled_total if fuse else None)
        self._pending.clear()

    def finish(self) -> tuple[StateDict, StateDict]:
        """The new global model (state dict in the global model's key order) and the new state."""
        if self._phase != "open":
            raise AggregatorStateError("finish() needs begin() first and may be called once per round")
        self._phase = "finished"
        if self.n_updates == 0:
            raise ZeroTotalWeightError("no update was added")
        self._flush(last=True)
        flats = self._combine()
        if self.noise_multiplier > 0:
            self._add_noise(flats)
        flats = self._server_step(flats)
        for dtype, flat in flats.items():
            if dtype.is_floating_point and not _all_finite(flat, self.chunk):
                raise UpdateValidationError(
                    "the aggregate contains NaN or infinite values (an update or the state is not finite)"
                )
        result = self.layout.views(flats)
        state = self._export_state()
        self._pending, self._collected, self._sum = [], [], None
        return result, state

    # -- stages ----------------------------------------------------------------------------------

    def _global_flat(self, dtype: torch.dtype) -> torch.Tensor:
        flat = self._global_flats.get(dtype)
        if flat is None:
            flat = self.layout.flat_view(self.global_state, dtype)
            if flat is None:
                flat = self.layout.flatten(self.global_state, dtype)
                self._global_copied_bytes += flat.numel() * flat.element_size()
            self._global_flats[dtype] = flat
        return flat

    def _clip_factor(self, sources: Sources) -> float:
        squares = 0.0
        for dtype in self.layout.floating_dtypes:
            source = sources[dtype]
            reference = self._global_flat(dtype)
            if isinstance(source, torch.Tensor):
                for start, stop in chunk_ranges(source.numel(), self.chunk):
                    squares += float(
                        torch.linalg.vector_norm(source[start:stop].double() - reference[start:stop]) ** 2
                    )
            else:
                for slot, tensor in zip(self.layout.groups[dtype], source, strict=False):
                    ref = reference[slot.offset : slot.offset + slot.numel]
                    for start, stop in chunk_ranges(tensor.numel(), self.chunk):
                        squares += float(
                            torch.linalg.vector_norm(tensor[start:stop].double() - ref[start:stop]) ** 2
                        )
        norm = math.sqrt(squares)
        return 1.0 if norm <= self.clip_norm else self.clip_norm / norm

    def _mean_flats(self) -> dict[torch.dtype, torch.Tensor]:
        """Finalise the weighted sum into means in the model dtypes (in the accumulator's memory)."""
        if self._scaled_total <= 0:
            raise ZeroTotalWeightError(
                f"the weights of the {self.n_updates} update(s) sum to zero; nothing to average"
            )
        means = self._sum.means
        acc = self._sum.take()
        out: dict[torch.dtype, torch.Tensor] = {}
        for dtype, buffer in acc.items():
            if dtype in means:
                out[dtype] = buffer
                continue
            if dtype.is_floating_point and self._global_coef > 0:
                buffer.add_(self._global_flat(dtype), alpha=self._global_coef)
            out[dtype] = _finalize_inplace(buffer, self._scaled_total, dtype, self.chunk)
        return out

    def _combine(self) -> dict[torch.dtype, torch.Tensor]:
        return self._mean_flats()

    def _add_noise(self, flats: dict[torch.dtype, torch.Tensor]) -> None:
        std = self.noise_multiplier * self.clip_norm / self.n_updates
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(hash((self.seed, self._round)) & ((1 << 63) - 1))
        for dtype in self.layout.floating_dtypes:
            flat = flats[dtype]
            for start, stop in chunk_ranges(flat.numel(), self.chunk):
                noise = torch.randn(stop - start, generator=generator, dtype=torch.float32)
                flat[start:stop].add_(noise, alpha=std)

    def _server_step(self, flats: dict[torch.dtype, torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
        return flats


# ----------------------------------------------------------------------------------------------------
# weighted mean


class FedAvg(Aggregator):
    name = "fedavg"
    description = "Weighted mean of the client models (McMahan et al. 2017), streamed as updates arrive."


class FedProx(Aggregator):
    name = "fedprox"
    description = (
        "FedAvg aggregation for clients trained with a proximal term mu/2·||w - w_global||² "
        "(Li et al. 2020); proximal_mu is sent to the clients."
    )
    options = {
        "proximal_mu": OptionSpec(float, 0.01, "Weight of the clients' proximal term.", minimum=0.0),
    }

    @property
    def client_config(self) -> dict[str, Any]:
        return {"proximal_mu": self.config["proximal_mu"]}


# ----------------------------------------------------------------------------------------------------
# robust aggregators


class _Robust(Aggregator):
    """Holds every update (zero-copy views where possible) and works on coordinate blocks."""

    collects = True

    def _block_rows(
        self, dtype: torch.dtype, start: int, stop: int, updates: list[_Update], out: torch.Tensor
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
                        row[lo - start : hi - start].copy_(tensor[lo - slot.offset : hi - slot.offset])
            if update.clip != 1.0:
                reference = self._global_flat(dtype)[start:stop]
                row.sub_(reference).mul_(update.clip).add_(reference)
        return out

    def _blocks(self, dtype: torch.dtype, n: int) -> Iterable[tuple[int, int]]:
        per_row = max(1024, ROBUST_BLOCK_BYTES // (max(n, 1) * 8))
        return chunk_ranges(self.layout.numel[dtype], per_row)

    def _work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return _accumulate_dtype(dtype, self.accumulate)

    def _non_float_means(self) -> dict[torch.dtype, torch.Tensor]:
        if not self._sum.acc:
            return {}
        if self._scaled_total <= 0:
            raise ZeroTotalWeightError("the weights of the updates sum to zero; integer buffers have no mean")
        acc = self._sum.take()
        return {d: _finalize_inplace(b, self._scaled_total, d, self.chunk) for d, b in acc.items()}


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
        mean = _WeightedSum(self.layout, self.layout.floating_dtypes, self.accumulate, self.chunk)
        global_coef = 0.0
        for batch_start in range(0, len(chosen), self.max_fold):
            batch = chosen[batch_start : batch_start + self.max_fold]
            mean.fold([(u, {d: u.weight * u.clip for d in self.layout.floating_dtypes}) for u in batch])
            global_coef += sum(u.weight * (1.0 - u.clip) for u in batch)
        for dtype, buffer in mean.take().items():
            if global_coef > 0:
                buffer.add_(self._global_flat(dtype), alpha=global_coef)
            out[dtype] = _finalize_inplace(buffer, weight, dtype, self.chunk)
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


# ----------------------------------------------------------------------------------------------------
# server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"; Hsu et al. 2019 for FedAvgM)


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
        return _accumulate_dtype(dtype, self.accumulate)

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


AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, Median, TrimmedMean, Krum, MultiKrum, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}
