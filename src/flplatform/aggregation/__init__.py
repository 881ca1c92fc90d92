"""Aggregation engine: pure tensor code (no web, no database, never unpickles).

Quick use
---------
::

    from flplatform import aggregation

    # Plain FedAvg over (state_dict or safetensors bytes, weight) pairs; a generator is consumed one
    # pair at a time.
    new_state = aggregation.fedavg((blob, n_samples) for blob, n_samples in uploads())

    # Any aggregator by its option name, with server state carried between rounds.
    agg = aggregation.get("fedadam", server_lr=0.05, dp_clip_norm=1.0, dp_noise_multiplier=0.5, seed=7)
    agg.begin(global_state, state=previous_state)   # previous_state: None in the first round
    for update, weight in arriving_updates:         # as uploads arrive
        agg.add(update, weight)
    new_global, new_state = agg.finish()            # new_state: dict[str, Tensor], store it as is

Public API
----------
``fedavg(updates, *, accumulate_dtype="float32") -> dict[str, Tensor]``
    Weighted mean of an iterable of ``(state_dict, weight)`` pairs (weights: sample counts or any
    non-negative numbers). A list/tuple is folded in batches (all at hand); any other iterable
    (generator) is consumed one pair at a time and the pair is folded and released before the next
    is drawn (a generator may refill one model's tensors in place), so peak extra memory stays
    ≤ 2 × model. Raises :class:`ZeroTotalWeightError` for no update or
    weights summing to 0, :class:`UpdateValidationError` for mismatching names/shapes/dtypes.

``aggregate(name, global_state, updates, state=None, **options) -> (new_global, new_state)``
    One whole round with ``get(name, **options)``: ``begin``, ``add`` of every pair, ``finish``.

``get(name, **options) -> Aggregator``
    A fresh aggregator; unknown name or option, or a value out of range →
    :class:`AggregatorOptionsError`. Its interface:

    * ``agg.begin(global_state, state=None)``: start a round. ``global_state`` (the current global
      model) may be None only for ``fedavg``/``fedprox``/``median``/``trimmed_mean``/``krum``/
      ``multi_krum`` without DP (the first update then fixes names, shapes and dtypes). ``state`` is
      the previous round's ``new_state`` (None/{} the first time); a state that does not fit the
      model → :class:`AggregatorStateError`.
    * ``agg.add(state_dict, weight)``: one update, checked against the model (same names, shapes,
      dtypes → else :class:`UpdateValidationError`). ``state_dict`` may also be the safetensors
      bytes themselves: viewed zero-copy as one flat range per dtype, no tensor per entry, the header
      checked once per round (malformed → :class:`DecodeError`) — the fastest way in for uploads. Mean-based aggregators fold it into the running
      sum, several per pass over the accumulator: updates they alone keep alive wait only while
      accumulator + pending ≤ 2 × model (two per pass); zero-copy views of ``bytes`` that someone else
      keeps in memory anyway (the server's upload buffers) cost nothing and wait for up to
      ``max_fold`` (32) to fold in one pass. Robust aggregators keep a reference (zero-copy views cost
      nothing beyond the bytes). A rejected update leaves the round as it was, unless the call
      passed ``discard_on_error=True`` (what ``fedavg`` and ``aggregate`` do with a generator: they
      drop the aggregator when ``add`` raises): a small model's update may then be folded while the
      fold thread checks it, and a rejected one leaves the round unusable (:class:`AggregatorStateError`).
    * ``agg.add_many(pairs)``: the same for updates already all in memory (batch folding).
    * ``new_global, new_state = agg.finish()``: the new global model as a state dict in the global
      model's key order (views into one flat buffer per dtype; treat as read-only or clone) and the
      state to pass to the next ``begin`` (always has ``"round"``, an int64 scalar; the FedOpt
      family adds its moments, see below). Non-finite results → :class:`UpdateValidationError`.
    * ``agg.client_config``: options the clients need (``{"proximal_mu": mu}`` for FedProx, else {}).
    * ``agg.held_bytes()``: bytes of tensors the aggregator holds now (its accumulators, pending
      updates, optimizer state, copies).
    * ``agg.n_updates``, ``agg.total_weight``; ``agg.selected()`` for ``krum``/``multi_krum``.

    An aggregator is used by one thread at a time; run it in a worker thread (``asyncio.to_thread``).

``AGGREGATOR_NAMES``
    ``("fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum", "fedavgm", "fedadam",
    "fedyogi", "fedadagrad")``: the OpenAPI enum.

``AGGREGATOR_OPTIONS``: ``{name: {option: OptionSpec}}``; ``describe_aggregators()`` gives the same as
    JSON-ready ``{name: {"description": str, "options": {option: {"type", "default", "description",
    "minimum"?, "maximum"?, "exclusive_minimum"?, "exclusive_maximum"?, "choices"?, "nullable"}}}}``
    for building Pydantic options schemas and docs.

Aggregators and their options (every aggregator also takes the common options)
------------------------------------------------------------------------------
common: ``accumulate_dtype`` ("float32" | "float64", default "float32": precision of running sums and
optimizer state for float32/16 models), ``dp_clip_norm`` (float > 0 or None), ``dp_noise_multiplier``
(float ≥ 0, default 0; > 0 needs ``dp_clip_norm``), ``seed`` (int or None).

* ``fedavg``: weighted mean (McMahan et al. 2017).
* ``fedprox``: ``proximal_mu`` = 0.01. Server side identical to FedAvg (Li et al. 2020); the
  proximal term is the clients' job, ``client_config`` hands them ``mu``.
* ``median``: coordinate-wise median (numpy convention: mean of the two middle values for even n).
* ``trimmed_mean``: ``beta`` = 0.1 in [0, 0.5): drops ``floor(beta·n)`` values at each end of every
  coordinate (as ``scipy.stats.trim_mean``).
* ``krum``: ``f`` = 0 — the update with the smallest sum of squared distances to its n−f−2 nearest
  others; needs n > 2f + 2 (else :class:`InsufficientUpdatesError`).
* ``multi_krum``: ``f`` = 0, ``m`` = None (→ n − f) — weighted mean of the m best-scored updates.
* ``fedavgm``: ``server_lr`` = 1.0, ``momentum`` = 0.9 — ``v = momentum·v + Δ; x += server_lr·v``.
* ``fedadam``: ``server_lr`` = 0.1, ``beta1`` = 0.9, ``beta2`` = 0.99, ``tau`` = 1e-9.
* ``fedyogi``: ``server_lr`` = 0.01, ``beta1`` = 0.9, ``beta2`` = 0.99, ``tau`` = 1e-3.
* ``fedadagrad``: ``server_lr`` = 0.1, ``beta1`` = 0.0, ``tau`` = 1e-9 (Adagrad has no beta2).

FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization"): ``Δ = weighted_mean − x``;
``m = β1·m + (1−β1)·Δ``; Adam ``v = β2·v + (1−β2)·Δ²``, Yogi ``v = v − (1−β2)·Δ²·sign(v − Δ²)``,
Adagrad ``v = v + Δ²``; ``x += server_lr·m/(√v + τ)``. m and v start at 0, no bias correction (as
the paper's algorithm and Flower). Their state holds ``"m.<tensor>"``/``"v.<tensor>"`` (FedAvgM:
``"momentum.<tensor>"``) for every floating tensor, plus ``"round"``.

Robust aggregators are unweighted (except Multi-Krum's final mean and integer buffers). They must
see all n updates, so they hold references to them; the statistics run over blocks of coordinates
(≈ 32 MiB of clients × coordinates at a time), never stacking whole models.

Integer and boolean buffers (e.g. BatchNorm's ``num_batches_tracked``) are never clipped, noised or
optimized: they get the weighted mean rounded half-to-even (booleans: weighted majority), computed
in float64 for 32/64-bit integers. DP, robust statistics and optimizers apply to floating tensors.

Central DP (McMahan et al. 2018; as Flower's server-side fixed clipping): each update's delta
``u − x`` over all floating tensors is scaled by ``min(1, clip_norm/‖u − x‖₂)``; after combining,
Gaussian noise of std ``noise_multiplier·clip_norm/n`` (n = updates in the round) is added to every
floating coordinate, before the server optimizer. Noise is seeded from ``(seed, round)`` when
``seed`` is set. Note: with unequal weights the weighted mean's sensitivity is
``clip_norm·max(w)/Σw``, not ``clip_norm/n``; use equal weights for the textbook guarantee. The
noise comes from torch's generator (not a cryptographic RNG).

Memory and speed
----------------
Streaming mean: one flat accumulator per dtype group (float32 sums for float32 models: 1 × model;
float64 sums: 2 ×). Pending updates that only the aggregator keeps alive are held only while
accumulator + pending ≤ 2 × model, so the aggregator never adds more than 2 models' worth of tensors
at any N (``held_bytes()``). Updates decoded by :func:`decode_safetensors` are zero-copy views whose
dtype groups are contiguous, so each group is folded with one kernel per cache-sized chunk, several
updates per pass over the accumulator (memory traffic per update: its own bytes plus 2/k of the
accumulator's for k per pass). When the decoded ``bytes`` stay referenced elsewhere (a list of
uploads, the server's buffers; judged from CPython reference counts, conservatively), holding their
views costs no memory, so up to ``max_fold`` = 32 arriving updates fold in one pass; an update whose
bytes nobody else holds counts against the budget from the next ``add`` on. The first pass writes the
(uninitialised) accumulator instead of adding to zeros; the last divides each slice by the total
weight right after adding to it and sums it there (in cache: no separate pass). A finite sum proves
every value of the mean finite, so ``finish`` reads the model no second time for its finiteness check
(only a non-finite sum takes the exact check); a sum whose updates were all folded already (a stream
whose last pass came with its last update) is divided and summed in one read. State dicts of
separate tensors (a caller's own) fold the same way, in batches of ≈ 2 MiB of accumulator (slices of large tensors, several
small tensors whole) with one ``torch._foreach_add_`` per update and batch (several updates per pass,
one thread hand-off per pass, small tensors in their own shape); a list of them folds up to
``max_fold`` per pass (the caller holds them anyway); one arriving at a time (a generator, ``add``)
is folded before ``add`` returns, with whole-tensor kernels in the caller's thread as a plain loop
does: the caller may refill the same tensors for the next update (``yield model.state_dict()`` of
one model trained in place), so nothing of theirs may wait (only immutable ``bytes`` may wait for
the next update, to fold two per pass). A small model of separate tensors (every tensor ≤ 16384 elements, accumulator ≤ 8 MiB: it
stays in cache between updates) arriving one at a time (a generator, ``add``) folds update by update
instead, in the caller's thread and, from 1 MiB of accumulator, one fold thread, right after the
update is checked (one ``torch._foreach_add_`` per update and piece; on a busy machine the fold
threads' passes measured slower for such models: waking them costs more than they save). Through
``fedavg``/``aggregate`` (which drop the aggregator on an error) the check runs in that fold thread
while the caller's thread already folds the update: the check (≈ 1 µs per tensor, reading metadata
that is not in cache) no longer comes before the fold, whose reading of the update from memory takes
the time; a list of them folds in passes like any list (the batches stay in L2 across the pass:
measured faster than update by update). Per element every state-dict feed computes what a plain loop
does (``acc = w₀·x₀``, then ``acc.add_(x, alpha=w)`` per update in order, then ``div_``, with the
weights divided by the first positive one), so lists, generators and ``add`` give the same bits.
Safetensors bytes, and dtype groups whose tensors lie back to back in one buffer (a group of one
tensor, decoded safetensors, the aggregators' own results), fold as flat ranges with ``addcmul`` (the
product rounded before the add): their floating results may differ from separate tensors' in the
last bit. Accumulators are plain 4 KiB-page memory, as torch's own tensors (:mod:`.buffers`: transparent
huge pages were faster on one VM and 6× slower on another).

Codec (:mod:`flplatform.aggregation.codec`)
-------------------------------------------
``decode_safetensors(data, copy=False)`` (zero-copy ``torch.frombuffer`` views; malformed → DecodeError),
``encode_safetensors(state, metadata=None) -> bytes`` (same layout as the safetensors library),
``read_safetensors_header(data)``, ``safetensors_order(state)``, ``FlatLayout`` (flat buffers per
dtype: ``flat_view``, ``flatten``, ``views``, ``check``).

Errors (:mod:`flplatform.aggregation.errors`): every one is an :class:`AggregationError`, a ``ValueError``.

Modules (the names above are the API; the modules are internal)
---------------------------------------------------------------
``registry`` (names → classes, ``get``, ``describe_aggregators``) · ``buffers`` (fresh accumulators,
one reserved ahead of need) · ``fedbuff`` (FedBuff's buffered
asynchronous fold with staleness weights: ``FedBuff``, ``StalenessRule``; not a round aggregator) · ``base`` (``Aggregator``: the round's
life cycle, memory budget, DP hooks) · strategies ``fedavg`` (FedAvg, FedProx), ``robust`` (median,
trimmed mean, (Multi-)Krum), ``fedopt`` (FedAvgM, FedAdam, FedYogi, FedAdagrad) · ``dp`` (clipping
factor, Gaussian noise) · ``options`` (``OptionSpec``, common options) · ``accumulator`` (the running
weighted sum) · ``kernels`` (the multi-threaded fold, OpenMP team size, chunked helpers) ·
``segments`` (folds of state dicts of separate tensors: batched passes, inline) · ``codec``
(safetensors and the flat layout) · ``errors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .base import Aggregator
from .codec import FlatLayout, StateDict, decode_safetensors, encode_safetensors, read_safetensors_header
from .errors import (
    AggregationError,
    AggregatorOptionsError,
    AggregatorStateError,
    DecodeError,
    InsufficientUpdatesError,
    UnsafeFormatError,
    UpdateValidationError,
    ZeroTotalWeightError,
)
from .fedavg import FedAvg, FedProx
from .fedbuff import FEDBUFF_OPTIONS, FedBuff, StalenessRule, parse_fedbuff_options
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from .options import COMMON_OPTIONS, OptionSpec
from .registry import AGGREGATOR_NAMES, AGGREGATOR_OPTIONS, AGGREGATORS, describe_aggregators, get
from .robust import Krum, Median, MultiKrum, TrimmedMean


def _feed(agg: Aggregator, updates: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> None:
    if isinstance(updates, Sequence):
        agg.add_many(updates, flush=False)  # finish() follows: its fold divides by the total weight
        return
    iterator = iter(updates)
    while True:
        try:
            pair = next(iterator)
        except StopIteration:
            return
        state_dict, weight = pair
        del pair  # drop our references before drawing the next pair: ≤ 2 models in flight
        agg.add(state_dict, weight, discard_on_error=True)  # (an error ends the call: agg is ours)
        del state_dict


def fedavg(
    updates: Iterable[tuple[Mapping[str, torch.Tensor], float]], *, accumulate_dtype: str = "float32"
) -> StateDict:
    """Weighted mean of ``(state_dict, weight)`` pairs, consumed one at a time (see module docs)."""
    agg = FedAvg(accumulate_dtype=accumulate_dtype)
    agg.begin(None)
    _feed(agg, updates)
    return agg.finish()[0]


def aggregate(
    name: str,
    global_state: Mapping[str, torch.Tensor] | None,
    updates: Iterable[tuple[Mapping[str, torch.Tensor], float]],
    state: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> tuple[StateDict, StateDict]:
    """One whole round: ``get(name, **options)``, ``begin``, ``add`` every pair, ``finish``."""
    agg = get(name, **options)
    agg.begin(global_state, state)
    _feed(agg, updates)
    return agg.finish()


__all__ = [
    "AGGREGATORS",
    "AGGREGATOR_NAMES",
    "AGGREGATOR_OPTIONS",
    "COMMON_OPTIONS",
    "FEDBUFF_OPTIONS",
    "AggregationError",
    "Aggregator",
    "AggregatorOptionsError",
    "AggregatorStateError",
    "DecodeError",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "FedYogi",
    "FlatLayout",
    "InsufficientUpdatesError",
    "Krum",
    "Median",
    "MultiKrum",
    "OptionSpec",
    "StalenessRule",
    "StateDict",
    "TrimmedMean",
    "UnsafeFormatError",
    "UpdateValidationError",
    "ZeroTotalWeightError",
    "aggregate",
    "decode_safetensors",
    "describe_aggregators",
    "encode_safetensors",
    "fedavg",
    "get",
    "parse_fedbuff_options",
    "read_safetensors_header",
]
