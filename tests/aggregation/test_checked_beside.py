"""``fedavg`` and ``aggregate`` over a generator of a small model's state dicts check each update in
the fold thread while the caller's thread already folds it (``Aggregator.add(...,
discard_on_error=True)``, ``kernels.run_beside(..., check)``): the same values as checking first,
and every bad update still rejected with the error that says why."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flplatform import aggregation
from flplatform.aggregation import AggregatorStateError, UpdateValidationError, fedavg, kernels, segments

from .test_inline_fold import _bad_updates, small_model


def shared_model(generator: torch.Generator, shift: float) -> dict[str, torch.Tensor]:
    """``small_model`` plus 30 separate 100 × 100 tensors: a float32 group of 1.3 MB, folded inline
    by both threads (over ``segments.INLINE_SHARED_MIN_BYTES``)."""
    extra = {f"s{i}.weight": torch.randn(100, 100, generator=generator) + shift for i in range(30)}
    return {**small_model(generator, shift), **extra}


def shared_pairs(n: int, seed: int = 0) -> list[tuple[dict[str, torch.Tensor], float]]:
    generator = torch.Generator().manual_seed(seed)
    return [(shared_model(generator, i / 7), float(1 + (i * 37) % 11)) for i in range(n)]


def test_the_shared_model_folds_inline_in_two_threads():
    pairs = shared_pairs(1)
    agg = aggregation.get("fedavg")
    agg.begin(None)
    agg.add(*pairs[0])
    weighted_sum = agg._weighted_sum
    assert weighted_sum.inline == frozenset(weighted_sum.acc)
    targets = weighted_sum._acc_views[torch.float32]
    assert len(segments.inline_pieces(targets)) > 3 or kernels._fold_workers() < 2


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 2, 9])
def test_a_generator_checked_beside_its_folds_gives_the_values_of_add(accumulate, n):
    pairs = shared_pairs(n)
    streamed = fedavg(iter(pairs), accumulate_dtype=accumulate)
    agg = aggregation.get("fedavg", accumulate_dtype=accumulate)
    agg.begin(None)
    for state, weight in pairs:
        agg.add(state, weight)  # checked first
    expected = agg.finish()[0]
    for name, tensor in streamed.items():
        assert torch.equal(tensor, expected[name]), name  # bit for bit


def test_a_generator_that_refills_one_model_in_place_is_averaged():
    generator = torch.Generator().manual_seed(3)
    model = shared_model(generator, 0.0)
    copies = []

    def refilled():
        for i in range(5):
            for tensor in model.values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype) + i)
            copies.append(({k: v.clone() for k, v in model.items()}, 1.0 + i))
            yield model, 1.0 + i

    streamed = fedavg(refilled())
    expected = fedavg(copies)
    for name, tensor in streamed.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("at", [1, 3])
def test_a_generator_with_a_bad_update_raises_what_is_wrong(case, at):
    pairs = shared_pairs(5, seed=2)
    label, bad, message = _bad_updates(pairs[0][0])[case]
    pairs[at] = (bad, 5.0)  # type: ignore[assignment]
    with pytest.raises(UpdateValidationError, match=message):
        fedavg(iter(pairs))
    with pytest.raises(UpdateValidationError, match=message):
        aggregation.aggregate("fedavgm", pairs[0][0], iter(pairs))


def test_a_round_whose_update_failed_its_check_beside_the_fold_is_unusable():
    pairs = shared_pairs(3)
    label, bad, message = _bad_updates(pairs[0][0])[0]  # a dtype: folded, then refused
    agg = aggregation.get("fedavg")
    agg.begin(None)
    agg.add(*pairs[0], discard_on_error=True)
    with pytest.raises(UpdateValidationError, match=message):
        agg.add(bad, 1.0, discard_on_error=True)
    with pytest.raises(AggregatorStateError):
        agg.add(*pairs[1], discard_on_error=True)
    with pytest.raises(AggregatorStateError):
        agg.finish()


def _pieces(count: int) -> list[int]:
    return list(range(count + 1))


def test_run_beside_runs_the_check_once_and_every_piece_once():
    done: list[int] = []
    checks: list[str] = []
    kernels.run_beside(
        lambda lo, hi: done.extend(range(lo, hi)),
        _pieces(40),
        lambda: checks.append(threading.current_thread().name),
    )
    assert sorted(done) == list(range(40)) and len(checks) == 1


def test_run_beside_raises_the_failed_check_over_the_pieces_own_error():
    def run(lo: int, hi: int) -> None:
        raise TypeError("a kernel refused an unchecked input")

    def check() -> None:
        raise UpdateValidationError("the check says why")

    with pytest.raises(UpdateValidationError, match="the check says why"):
        kernels.run_beside(run, _pieces(4), check)
    with pytest.raises(TypeError, match="refused"):
        kernels.run_beside(run, _pieces(4), lambda: None)  # a passed check: the pieces' error


def test_run_beside_runs_the_check_itself_when_its_fold_thread_is_busy():
    release = threading.Event()
    busy = [kernels._pool().submit(release.wait) for _ in range(kernels._pool()._max_workers)]
    done: list[int] = []
    checks: list[str] = []
    try:
        with pytest.raises(UpdateValidationError):

            def check() -> None:
                checks.append(threading.current_thread().name)
                raise UpdateValidationError("bad")

            kernels.run_beside(lambda lo, hi: done.extend(range(lo, hi)), _pieces(6), check)
        kernels.run_beside(lambda lo, hi: done.extend(range(lo, hi)), _pieces(6), lambda: checks.append("ok"))
    finally:
        release.set()
        for future in busy:
            future.result()
    assert checks == [threading.current_thread().name, "ok"]  # the caller checked, after its pieces
    assert sorted(done) == sorted(list(range(6)) * 2)


def test_run_pieces_lets_the_caller_take_pieces_with_its_kernels_inline_then_restores_its_team():
    threads: dict[str, int] = {}
    team = torch.get_num_threads()

    def run(lo: int, hi: int) -> None:
        # every piece runs with kernels inline: in the fold threads, and in the caller's thread too
        threads[threading.current_thread().name] = torch.get_num_threads()
        time.sleep(0.01)  # long enough for a fold thread to wake and take its share

    kernels._run_pieces(run, _pieces(12), 2)
    assert set(threads.values()) == {1} or kernels._openmp_runtime() is None
    if kernels._openmp_runtime() is not None:
        assert threading.current_thread().name in threads  # the caller worked instead of waiting
        assert len(threads) == 2  # with one fold thread (workers - 1)
    assert torch.get_num_threads() == team  # the caller's own team is back


def test_run_pieces_raises_a_piece_error_after_every_thread_stopped():
    done: list[int] = []

    def run(lo: int, hi: int) -> None:
        if lo == 3:
            raise RuntimeError("piece 3 failed")
        time.sleep(0.002)
        done.append(lo)

    team = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="piece 3"):
        kernels._run_pieces(run, _pieces(8), 2)
    settled = list(done)
    time.sleep(0.05)
    assert done == settled  # nothing ran after the call returned
    assert len(done) < 7  # and the others stopped taking pieces once one failed
    assert torch.get_num_threads() == team
