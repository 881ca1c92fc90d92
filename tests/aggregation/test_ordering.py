"""A streamed mean with ``track_order`` gives bitwise the fixed order's result whatever the order
the updates were added in (settle, then redo in the fixed order): the server folds on arrival by
default on that guarantee (flplatform.aggregation.ordering)."""

from __future__ import annotations

import random

import pytest
import torch

from flplatform import aggregation
from flplatform.aggregation import encode_safetensors

FAMILIES = [
    ("fedavg", {}),
    ("fedprox", {"proximal_mu": 0.1}),
    ("fedavgm", {"server_lr": 0.7}),
    ("fedadam", {}),
    ("fedyogi", {}),
    ("fedadagrad", {}),
]


def _run(
    name: str,
    options: dict,
    updates: list,
    weights: list[float],
    order: list[int],
    *,
    redo: bool = True,
    global_state: dict | None = None,
) -> dict[str, torch.Tensor]:
    agg = aggregation.get(name, accumulate_dtype="float64", **options)
    agg.track_order = True
    agg.begin(global_state if agg.needs_global else None)
    for index in order:
        agg.add(updates[index], weights[index])
        agg.fold_pending()  # one at a time, as the server folds on arrival
    if agg.settle() and redo:
        for update, weight in zip(updates, weights, strict=True):
            agg.redo(update, weight)
    result, _ = agg.finish()
    return {k: v.clone() for k, v in result.items()}


def _adversarial(k: int, n: int, seed: int) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Updates whose float64 sums differ by order and land near float32 rounding midpoints: a big
    value, half a float32 ulp of it (the mean sits on a midpoint), and tiny terms of both signs below
    the float64 ulp of the big one (kept or lost depending on when they are added); plus mixed
    exponents, cancellation (x, -x) and exact zeros; integer and boolean buffers."""
    g = torch.Generator().manual_seed(seed)
    weights = [1.0] * k  # a power-of-two total: the division is exact, the midpoints survive it
    big = (1 + torch.rand(n, generator=g)).float() * 8 * k
    half_ulp = (torch.nextafter(big, torch.full_like(big, float("inf"))) - big) / 2
    rows = [big, half_ulp]
    for _ in range(k - 2):
        tiny = torch.ldexp(torch.rand(n, generator=g) + 0.5, torch.randint(-58, -48, (n,), generator=g))
        rows.append((tiny * torch.sign(torch.randn(n, generator=g))).float())
    mixed = [
        torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float())
        for _ in range(k)
    ]
    mixed[1] = -mixed[0]  # cancellation
    updates = []
    for i in range(k):
        updates.append(
            {
                "a.mid": rows[i],
                "b.mixed": mixed[i],
                "c.zero": torch.zeros(33),
                "d.count": torch.randint(0, 7, (5,), generator=g),
                "e.mask": torch.rand(9, generator=g) > 0.5,
                "f.half": torch.randn(40, generator=g).half(),
            }
        )
    return updates, weights


@pytest.mark.parametrize(("name", "options"), FAMILIES)
def test_any_arrival_order_gives_the_fixed_orders_bits(name, options):
    k, n = 8, 4099  # not a multiple of the bound's block
    updates, weights = _adversarial(k, n, seed=3)
    wire = [encode_safetensors(u) for u in updates]
    global_state = {
        key: torch.zeros_like(v) if v.is_floating_point() else v.clone() for key, v in updates[0].items()
    }
    fixed = _run(name, options, wire, weights, list(range(k)), global_state=global_state)
    rng = random.Random(7)
    differs_without_redo = 0
    for _ in range(12):
        order = list(range(k))
        rng.shuffle(order)
        got = _run(name, options, wire, weights, order, global_state=global_state)
        for key in fixed:
            assert torch.equal(got[key], fixed[key]), (name, order, key)
        plain = _run(name, options, wire, weights, order, redo=False, global_state=global_state)
        differs_without_redo += sum(int((plain[key] != fixed[key]).sum()) for key in fixed)
    # the data is adversarial enough: without the recomputation some orders do differ
    assert differs_without_redo > 0


def test_integer_sample_sizes_and_state_dicts():
    """Uneven integer weights, updates given as state dicts of separate tensors (the coarser bound)."""
    rng = random.Random(11)
    k, n = 6, 3000
    updates, _ = _adversarial(k, n, seed=5)
    weights = [float(rng.randint(1, 100_000)) for _ in range(k)]
    fixed = _run("fedavg", {}, updates, weights, list(range(k)))
    for _ in range(8):
        order = list(range(k))
        rng.shuffle(order)
        got = _run("fedavg", {}, updates, weights, order)
        assert all(torch.equal(got[key], fixed[key]) for key in fixed)


def test_bits_near_midpoints_are_listed_and_ordinary_ones_are_not():
    """A realistic model lists few coordinates: with integer weights its float64 sums are exact (so
    are the ties on float32 midpoints, about one in ``total`` coordinates, that the bound alone
    would list); exact zeros of all-zero blocks are not listed, those sharing a block with values
    are."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(100_000, generator=g) * 0.05
    updates = [
        encode_safetensors({"w": base + torch.randn(100_000, generator=g) * 1e-3, "z": torch.zeros(128)})
    ]
    updates += [
        encode_safetensors({"w": base + torch.randn(100_000, generator=g) * 1e-3, "z": torch.zeros(128)})
        for _ in range(7)
    ]
    agg = aggregation.get("fedavg", accumulate_dtype="float64")
    agg.track_order = True
    agg.begin(None)
    for i, update in enumerate(updates):
        agg.add(update, float(100 + i))
    listed = agg.settle()
    assert listed < 100  # of 100 128 coordinates (32 zeros sharing a block with w + a few, measured)


def _close_updates(k: int, n: int, seed: int) -> list[bytes]:
    """One round's updates: a model plus small per-client changes (their float64 sums are exact)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(n, generator=g) * 2 - 1) * 0.0156
    return [encode_safetensors({"w": base + 0.001 * (i + 1)}) for i in range(k)]


def _listed(updates: list, weights: list[float]) -> int:
    agg = aggregation.get("fedavg", accumulate_dtype="float64")
    agg.track_order = True
    agg.begin(None)
    for update, weight in zip(updates, weights, strict=True):
        agg.add(update, weight)
        agg.fold_pending()
    return agg.settle()


def test_exact_sums_are_not_listed_unless_a_weight_or_a_clip_makes_them_inexact(monkeypatch):
    """Close updates with equal integer sample sizes: their sums in float64 are exact, the same in
    every order, and next to none is listed where the bound alone lists ~20 % (their means land on
    float32 midpoints: the total weight is a power of two). A fractional weight makes the products
    round: then the bound decides alone, as with the exactness test off (so does a clipped update)."""
    from flplatform.aggregation import ordering

    k, n = 8, 64 * 1000
    updates = _close_updates(k, n, seed=2)
    cases = {
        "integer weights": [16.0] * k,
        "fractional weights": [16.5] * k,
    }
    listed = {case: _listed(updates, weights) for case, weights in cases.items()}
    monkeypatch.setattr(ordering, "EXACT_RATIO", 0.0)  # no block is ever known exact
    bound_only = {case: _listed(updates, weights) for case, weights in cases.items()}
    assert listed["integer weights"] < n // 1000 < n // 10 < bound_only["integer weights"]
    assert listed["fractional weights"] == bound_only["fractional weights"] > 0


@pytest.mark.parametrize("ratio", [2.0**28, 2.0**80])
def test_blocks_of_inexact_sums_are_still_listed(monkeypatch, ratio):
    """The exactness test must not vouch for blocks whose sums round: with it made lax (2**80) the
    adversarial data differs between orders after the redo; with the real one it never does."""
    from flplatform.aggregation import ordering

    monkeypatch.setattr(ordering, "EXACT_RATIO", ratio)
    k, n = 8, 4099
    updates, weights = _adversarial(k, n, seed=3)
    wire = [encode_safetensors(u) for u in updates]
    fixed = _run("fedavg", {}, wire, weights, list(range(k)))
    rng = random.Random(5)
    differ = 0
    for _ in range(12):
        order = list(range(k))
        rng.shuffle(order)
        got = _run("fedavg", {}, wire, weights, order)
        differ += sum(int((got[key] != fixed[key]).sum()) for key in fixed)
    assert (differ == 0) == (ratio == 2.0**28)


def test_without_track_order_nothing_changes():
    agg = aggregation.get("fedavg", accumulate_dtype="float64")
    agg.begin(None)
    agg.add({"w": torch.ones(3)}, 2.0)
    assert agg.settle() == 0
    result, _ = agg.finish()
    assert torch.equal(result["w"], torch.ones(3))


def test_zero_total_weight_still_says_so():
    agg = aggregation.get("fedavg", accumulate_dtype="float64")
    agg.track_order = True
    agg.begin(None)
    agg.add({"w": torch.ones(3)}, 0.0)
    assert agg.settle() == 0
    with pytest.raises(aggregation.ZeroTotalWeightError):
        agg.finish()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.bool])
def test_finalize_checked_is_chunking_independent(threads: int, out_dtype: torch.dtype) -> None:
    """The fused pass writes the mean over the accumulator's own bytes, chunk by chunk in the fold
    threads (a chunk waits for the chunks whose bytes it overwrites): whatever the chunk size and the
    number of threads, the values are finalize_inplace's and the listed coordinates the same."""
    from flplatform.aggregation import kernels, ordering

    g = torch.Generator().manual_seed(7)
    n = 64 * 1000 + 37  # a partial last block
    base = torch.randn(n, generator=g, dtype=torch.float64) * 37.3
    if out_dtype == torch.bool:
        base = torch.rand(n, generator=g, dtype=torch.float64) * 8
    # bounds from 1e6 to 1e13 (a quotient's interval reaches from ~1e-9 to ~1e-2): some listed in every dtype
    bound = torch.pow(10.0, 6 + 7 * torch.rand(-(-n // ordering.BLOCK), generator=g, dtype=torch.float64))
    expected = kernels.finalize_inplace(base.clone(), 7.0, out_dtype, n)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        listed = []
        for chunk in (64, 64 * 7, 1 << 18):
            out, index = ordering.finalize_checked(base.clone(), 7.0, out_dtype, bound, 8, chunk)
            assert torch.equal(out[:n], expected[:n])
            listed.append(index)
    finally:
        torch.set_num_threads(previous)
    assert listed[0].numel() > 0
    assert all(torch.equal(index, listed[0]) for index in listed)


@pytest.mark.parametrize("explicit_settle", [True, False])
def test_an_order_tracked_float64_group_is_divided_once_without_a_redo(explicit_settle):
    # a float64 group summed in float64 becomes the mean in the last fold; settle() used to divide
    # it again, so a caller that did not redo (or finish() settling by itself) got mean / total
    agg = aggregation.get("fedavg", accumulate_dtype="float64")
    agg.track_order = True
    agg.begin(None)
    for weight in (1.0, 2.0, 5.0):
        agg.add({"w": torch.full((5,), 2.0, dtype=torch.float64), "v": torch.full((4,), 3.0)}, weight)
    if explicit_settle:
        assert agg.settle() == 5  # the float64 group is recomputed whole by a redo
    result = agg.finish()[0]
    assert torch.equal(result["w"], torch.full((5,), 2.0, dtype=torch.float64))
    assert torch.equal(result["v"], torch.full((4,), 3.0))


@pytest.mark.parametrize("passes", [1, 3])
def test_the_bound_the_fold_takes_is_the_bound_taken_before_it(monkeypatch, passes):
    """A flat update's share of the order bound is taken by the fold itself, range by range while
    the range is in cache (``ordering.DeferredBound``): the same bounds and floors, the same listed
    coordinates and the same bits as a pass of its own before the fold. Several-update passes,
    a partial last block, two float dtypes and a state dict among flat updates (a pass the fold
    does not report: the flat updates' shares are then taken whole at the end) included."""
    from flplatform.aggregation import kernels, ordering

    monkeypatch.setattr(kernels, "RELEASE_BYTES", 64 * 1024)  # many windows, several pieces
    g = torch.Generator().manual_seed(11)
    n = 64 * 5000 + 37
    base = {
        "w": torch.randn(n, generator=g),
        "v": torch.randn(999, generator=g),
        "h": torch.randn(3000, generator=g).half(),
    }
    updates = [
        {k: v + (0.01 * (i + 1) * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
        for i in range(7)
    ]
    sources = [encode_safetensors(u) if i != 4 else u for i, u in enumerate(updates)]
    weights = [float(10 + i) for i in range(7)]

    def run(defer: bool) -> tuple[dict, dict, int, dict, int]:
        taken_whole = 0
        add, block_max = ordering.OrderBound.add, ordering._block_max

        def counted(*args, **kwargs):
            nonlocal taken_whole
            taken_whole += 1
            return block_max(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(ordering, "_block_max", counted)
            if not defer:
                patch.setattr(
                    ordering.OrderBound, "add", lambda self, *a, defer=False, **k: add(self, *a, **k)
                )
            agg = aggregation.get("fedavg", accumulate_dtype="float64")
            agg.track_order = True
            agg.begin(None)
            for start in range(0, len(sources), passes):
                for index in range(start, min(start + passes, len(sources))):
                    agg.add(sources[index], weights[index], stable=True)
                agg.fold_pending()
            agg._flush(last=True)
            order = agg._order
            bounds = {d: b.clone() for d, b in order.bound.items()}
            floors = {d: f.clone() for d, f in order.floor.items()}
            listed = agg.settle()
            for source, weight in zip(sources, weights, strict=True):
                agg.redo(source, weight)
            result, _ = agg.finish()
        return bounds, floors, listed, result, taken_whole

    deferred, before = run(True), run(False)
    for got, expected in zip(deferred[:2], before[:2], strict=True):
        assert got.keys() == expected.keys()
        for dtype in got:
            assert torch.equal(got[dtype], expected[dtype]), dtype
    assert deferred[2] == before[2]
    for key in base:
        assert torch.equal(deferred[3][key], before[3][key]), key
    # Passes of its own: before, one per flat group of every update (the state dict's float32 pair
    # is bounded per tensor); deferred, only the state dict's own float16 one, and with passes of 3
    # the two flat float32 groups of the state dict's pass (separate tensors: folded per slot, not
    # reported), taken whole at the end.
    assert before[4] == 2 * 6 + 1
    assert deferred[4] == (1 if passes == 1 else 3)
