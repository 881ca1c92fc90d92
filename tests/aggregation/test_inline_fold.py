"""Small models of separate tensors fold update by update in the caller's thread (``fold_inline``),
checked by a per-layout plan (``GatherPlan``): the same values as the multi-threaded pass over the
same updates, the same errors for updates that do not match, and nothing folded from a rejected one."""

from __future__ import annotations

import threading
import time
import weakref

import pytest
import torch

from flplatform import aggregation
from flplatform.aggregation import UpdateValidationError, accumulator, fedavg, kernels, segments
from flplatform.aggregation.accumulator import WeightedSum
from flplatform.aggregation.segments import fold_inline


def small_model(generator: torch.Generator, shift: float) -> dict[str, torch.Tensor]:
    """Separately allocated small tensors of every dtype group (all ≤ SMALL_TENSOR elements)."""
    return {
        "a.weight": torch.randn(100, 100, generator=generator) + shift,
        "a.bias": torch.randn(100, generator=generator) + shift,
        "b.weight": (torch.randn(30, 20, generator=generator) + shift).t(),  # non-contiguous
        "c.scale": torch.tensor(1.0 + shift),  # 0-dim
        "d.half": torch.randn(7, 3, generator=generator).half(),
        "e.double": torch.randn(4, 4, generator=generator, dtype=torch.float64),
        "f.steps": torch.tensor([int(shift * 10), 3], dtype=torch.int64),
        "g.mask": torch.rand(6, generator=generator) > 0.5,
    }


def pairs_of(n: int, seed: int = 0) -> list[tuple[dict[str, torch.Tensor], float]]:
    generator = torch.Generator().manual_seed(seed)
    return [(small_model(generator, i / 7), float(1 + (i * 37) % 11)) for i in range(n)]


def test_a_small_model_of_separate_tensors_folds_inline():
    generator = torch.Generator().manual_seed(0)
    agg = aggregation.get("fedavg")
    agg.begin(None)
    agg.add(small_model(generator, 0.0), 1.0)
    weighted_sum = agg._weighted_sum
    assert weighted_sum.inline == frozenset(weighted_sum.acc)
    # a tensor above SMALL_TENSOR elements, or an accumulator above INLINE_FOLD_BYTES: passes instead
    large = aggregation.get("fedavg")
    large.begin(None)
    large.add({"w": torch.zeros(accumulator.SMALL_TENSOR + 1), "b": torch.zeros(3)}, 1.0)
    assert large._weighted_sum.inline == frozenset()


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
@pytest.mark.parametrize("feed", ["list", "generator", "add"])
@pytest.mark.parametrize("n", [1, 2, 33, 40])
def test_inline_fold_gives_the_values_of_the_threaded_pass(monkeypatch, accumulate, feed, n):
    pairs = pairs_of(n)

    def run() -> dict[str, torch.Tensor]:
        if feed == "list":
            return fedavg(pairs, accumulate_dtype=accumulate)
        if feed == "generator":
            return fedavg(iter(pairs), accumulate_dtype=accumulate)
        agg = aggregation.get("fedavg", accumulate_dtype=accumulate)
        agg.begin(None)
        for state, weight in pairs:
            agg.add(state, weight)
        return agg.finish()[0]

    inline = run()
    monkeypatch.setattr(accumulator, "INLINE_FOLD_BYTES", 0)  # every fold a multi-threaded pass
    passes = run()
    for name, tensor in inline.items():
        assert tensor.dtype == pairs[0][0][name].dtype, name
        assert torch.equal(tensor, passes[name]), name  # bit for bit


SHARED_SHAPES = [(100, 100)] * 30 + [(7, 3), (), (0,), (16384,)]  # 1.3 MB: shared with a fold thread


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("divisor", [None, 3.0])
@pytest.mark.parametrize(
    "shapes", [[(1000,), (7, 3), (), (2500,), (0,)], SHARED_SHAPES], ids=["one", "shared"]
)
def test_fold_inline_matches_a_plain_loop(init, divisor, shapes):
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(s, generator=generator) for s in shapes]
    expected = [t.clone() for t in targets]
    if init:
        for t in targets:
            t.fill_(float("nan"))  # init: whatever the buffer holds is overwritten
    sources = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(5)]
    coefs = [0.5, 2.0, 1.0, 3.0, 0.25]
    for index, target in enumerate(expected):
        if init:
            target.zero_()
        for update, coef in zip(sources, coefs, strict=True):
            target.add_(update[index], alpha=coef)
        if divisor is not None:
            target.div_(divisor)
    total = fold_inline(targets, sources, coefs, init=init, divisor=divisor)
    for got, want in zip(targets, expected, strict=True):
        assert torch.equal(got, want)  # the plain loop's values, bit for bit
    if divisor is not None:
        assert total == pytest.approx(sum(float(t.double().sum()) for t in expected), rel=1e-4)


def test_a_shared_inline_fold_cuts_pieces_by_bytes_and_runs_in_two_threads(monkeypatch):
    targets = [torch.zeros(s) for s in SHARED_SHAPES]
    bounds = segments.inline_pieces(targets)
    assert bounds[0] == 0 and bounds[-1] == len(targets) and bounds == sorted(set(bounds))
    assert len(bounds) - 1 == -(-sum(t.numel() * 4 for t in targets) // segments.INLINE_PIECE_BYTES)
    assert segments.inline_pieces(targets[:2]) == [0, 2]  # under INLINE_SHARED_MIN_BYTES: one piece
    threads: set[str] = set()
    original = segments.run_beside

    def run_beside(run, pieces, check=None):
        def traced(lo, hi):
            threads.add(threading.current_thread().name)
            time.sleep(0.01)  # long enough for the fold thread to wake and take its share
            run(lo, hi)

        original(traced, pieces, check)

    monkeypatch.setattr(segments, "run_beside", run_beside)
    sources = [[torch.ones(s) for s in SHARED_SHAPES]]
    fold_inline(targets, sources, [2.0])
    assert len(threads) == 2 and all(torch.equal(t, torch.full_like(t, 2.0)) for t in targets)


def test_run_beside_runs_every_piece_once_even_with_its_fold_thread_busy():
    release = threading.Event()
    busy = [kernels._pool().submit(release.wait) for _ in range(kernels._pool()._max_workers)]
    done: list[int] = []
    try:
        kernels.run_beside(lambda lo, hi: done.extend(range(lo, hi)), [0, 3, 5, 9])
    finally:
        release.set()
        for future in busy:
            future.result()
    assert sorted(done) == list(range(9))  # the caller did every piece (its fold thread was busy)


def _bad_updates(good: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, object], str]]:
    def changed(name: str, value: object) -> dict[str, object]:
        return {**good, name: value}

    missing = dict(good)
    del missing["a.bias"]
    return [
        ("dtype", changed("a.weight", good["a.weight"].double()), "dtype"),
        ("shape", changed("a.bias", torch.zeros(101)), "shape"),
        # broadcastable into the model's tensor: an add_ loop would take it silently
        ("broadcastable shape", changed("a.weight", torch.zeros(1, 100)), "shape"),
        ("same numel, other shape", changed("a.weight", torch.zeros(10_000)), "shape"),
        ("not a tensor", changed("a.bias", [0.0] * 100), "not a tensor"),
        ("numpy array", changed("a.bias", good["a.bias"].numpy()), "not a tensor"),
        ("missing", missing, "missing"),
        ("extra", changed("z.extra", torch.zeros(1)), "unexpected"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_a_mismatching_update_is_rejected_and_nothing_of_it_is_folded(case):
    pairs = pairs_of(4, seed=1)
    label, bad, message = _bad_updates(pairs[0][0])[case]
    agg = aggregation.get("fedavg")
    agg.begin(None)
    for state, weight in pairs[:2]:
        agg.add(state, weight)
    with pytest.raises(UpdateValidationError, match=message):
        agg.add(bad, 5.0)  # type: ignore[arg-type]
    for state, weight in pairs[2:]:
        agg.add(state, weight)
    result, _ = agg.finish()
    expected = fedavg(pairs)
    assert agg.n_updates == 4, label
    for name, tensor in result.items():
        assert torch.equal(tensor, expected[name]), (label, name)


def test_a_generator_of_small_state_dicts_keeps_at_most_one_update(monkeypatch):
    passes: list[int] = []
    original = WeightedSum.fold

    def fold(self, items, **options):
        passes.append(len(items))
        return original(self, items, **options)

    monkeypatch.setattr(WeightedSum, "fold", fold)
    alive: list[weakref.ref] = []
    in_flight: list[int] = []

    def updates():
        generator = torch.Generator().manual_seed(2)
        for i in range(10):
            state = small_model(generator, i / 7)  # made as it is drawn, like a loaded upload
            alive.append(weakref.ref(state["a.weight"]))
            in_flight.append(sum(ref() is not None for ref in alive))
            yield state, float(i + 1)
            del state

    fedavg(updates())
    assert max(in_flight) == 1  # each update is folded in its add(): only the one just drawn is alive
    assert passes == [1] * 10  # one update per fold, the last one (in finish) turning sums into means


@pytest.mark.parametrize("numel", [1, 16_384, 100_000, (1 << 21) + 1])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_the_finiteness_check_of_small_and_large_buffers(numel, bad):
    from flplatform.aggregation.kernels import DEFAULT_CHUNK, all_finite

    flat = torch.ones(numel)
    if bad is not None:
        flat[numel // 2] = bad
    assert all_finite(flat, DEFAULT_CHUNK) is (bad is None)
    # finite values whose sum overflows are still finite
    flat = torch.full((numel,), 3e38)
    assert all_finite(flat, DEFAULT_CHUNK)


def test_generators_of_small_state_dicts_fold_one_by_one_and_lists_in_passes(monkeypatch):
    # a stream: inline folds, one update each (the accumulator stays in cache between updates); a
    # list (all at hand): max_fold per pass, the batches stay in cache across the pass
    passes: list[int] = []
    original = WeightedSum.fold

    def fold(self, items, **options):
        passes.append(len(items))
        return original(self, items, **options)

    monkeypatch.setattr(WeightedSum, "fold", fold)
    # every group of separate tensors (a group of one tensor is one flat range, folded in passes)
    generator = torch.Generator().manual_seed(3)
    pairs = [
        ({"w": torch.randn(50, 40, generator=generator), "b": torch.randn(40, generator=generator)}, 1.0 + i)
        for i in range(70)
    ]
    fedavg(pairs)
    assert passes == [32, 32, 6]
    passes.clear()
    fedavg(iter(pairs))
    assert passes == [1] * 70


@pytest.mark.parametrize("feed", ["list", "generator"])
def test_small_and_large_models_of_every_dtype_match_a_plain_loop(feed):
    # bfloat16 sums in float32, int32/uint8 in float (rounded back), bool by majority, float64 in
    # float64: the plain loop's operations in the accumulator's dtype, bit for bit (every floating
    # group has separate tensors: a group of one tensor is a flat range, folded as bytes are)
    generator = torch.Generator().manual_seed(11)
    pairs = []
    for i in range(5):
        state = {
            "bf16": torch.randn(40, 30, generator=generator).bfloat16(),
            "bf16_large": torch.randn(20_000, generator=generator).bfloat16(),
            "f64": torch.randn(50, generator=generator, dtype=torch.float64),
            "f64_2": torch.randn(5, 5, generator=generator, dtype=torch.float64),
            "i32": torch.randint(-1000, 1000, (7,), generator=generator, dtype=torch.int32),
            "u8": torch.randint(0, 255, (9,), generator=generator, dtype=torch.uint8),
            "mask": torch.rand(6, generator=generator) > 0.5,
        }
        pairs.append((state, float(2 + 3 * i)))
    result = fedavg(pairs if feed == "list" else iter(pairs))
    first = pairs[0][1]
    total = sum(w / first for _, w in pairs)
    for name, tensor in pairs[0][0].items():
        acc_dtype = torch.float64 if tensor.dtype in (torch.float64, torch.int32) else torch.float32
        want = tensor.to(acc_dtype) * (pairs[0][1] / first)
        for state, weight in pairs[1:]:
            want.add_(state[name], alpha=weight / first)
        want.div_(total)
        got = result[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        if tensor.dtype == torch.bool:
            assert torch.equal(got, want >= 0.5), name
        elif not tensor.is_floating_point():
            assert torch.equal(got, want.round().to(tensor.dtype)), name
        else:
            assert torch.equal(got, want.to(tensor.dtype)), name


@pytest.mark.parametrize("bad", [False, True])
def test_a_shared_last_fold_sums_its_pieces_past_empty_tensors(bad):
    # a list of 33 updates folds as 32 + 1: the last one alone, shared, divided and summed per piece;
    # empty tensors sit where pieces begin and end (an empty view's data_ptr() is 0)
    generator = torch.Generator().manual_seed(5)
    shapes = {f"t{i:02d}": (0,) if i % 7 == 0 else (9000,) for i in range(60)}
    pairs = [
        ({name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}, 1.0 + i)
        for i in range(33)
    ]
    if bad:
        pairs[-1][0]["t59"][-1] = float("inf")
        with pytest.raises(UpdateValidationError, match="not finite"):
            fedavg(pairs)
        return
    mean = fedavg(pairs)
    total = sum(w for _, w in pairs)
    for name in shapes:
        expected = sum(state[name].double() * w for state, w in pairs) / total
        assert torch.allclose(mean[name].double(), expected, atol=1e-5)
