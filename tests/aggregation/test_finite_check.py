"""The finished mean's finiteness check, fused into the pass that divides it (the last fold, or the
division of a sum whose updates were all folded already): the same errors as the separate check,
the same values, and no separate read of the model when the mean is finite."""

from __future__ import annotations

import math

import pytest
import torch

from flplatform import aggregation
from flplatform.aggregation import UpdateValidationError, base, encode_safetensors, fedavg
from flplatform.aggregation.kernels import DEFAULT_CHUNK, divide_checked


def model(shift: float, numel: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(int(shift * 100))
    return {
        "a.weight": torch.randn(numel, generator=generator) + shift,
        "b.weight": torch.randn(30, 20, generator=generator) + shift,
        "b.bias": torch.randn(20, generator=generator) + shift,
        "c.double": torch.randn(numel // 3 + 1, generator=generator, dtype=torch.float64),
    }


FEEDS = ["list", "generator", "list_bytes", "generator_bytes", "add"]


def run(feed: str, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    pairs = [(state, float(i + 1)) for i, state in enumerate(states)]
    if feed.endswith("bytes"):
        pairs = [(encode_safetensors(state), w) for state, w in pairs]
    if feed.startswith("generator"):
        return fedavg(pair for pair in pairs)
    if feed == "add":
        agg = aggregation.get("fedavg")
        agg.begin(None)
        for state, w in pairs:
            agg.add(state, w)
        return agg.finish()[0]
    return fedavg(pairs)


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("numel", [1_000, 600_001])  # inline folds / passes in the fold threads
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["a.weight", "b.bias", "c.double"])
def test_a_non_finite_update_is_rejected_whatever_the_feed(feed, numel, n, bad, where):
    states = [model(i / 3, numel) for i in range(n)]
    states[n // 2][where].view(-1)[-1] = bad
    with pytest.raises(UpdateValidationError, match="NaN or infinite"):
        run(feed, states)


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("numel", [1_000, 600_001])
def test_finite_values_whose_sum_overflows_pass(feed, numel):
    # large values: the weighted sum (1e38 + 2e38) stays finite, the sum over the coordinates that the
    # fused check takes does not; the exact check then runs and finds every value finite
    states = [{"a.weight": torch.full((numel,), 1e38), "b.bias": torch.full((7,), -1e38)} for _ in range(2)]
    result = run(feed, states)
    assert torch.isfinite(result["a.weight"]).all() and torch.isfinite(result["b.bias"]).all()


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("numel", [1_000, 600_001])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_a_finite_mean_needs_no_separate_check(monkeypatch, feed, numel, n):
    calls: list[int] = []
    original = base.all_finite

    def counted(flat: torch.Tensor, chunk: int) -> bool:
        calls.append(flat.numel())
        return original(flat, chunk)

    monkeypatch.setattr(base, "all_finite", counted)
    states = [model(i / 3, numel) for i in range(n)]
    result = run(feed, states)
    assert calls == []
    want = run("list", states)  # the same values whichever pass divided (and checked) the sum
    for name, tensor in want.items():
        assert torch.equal(result[name], tensor) or feed.endswith("bytes"), name


def test_fedopt_and_dp_noise_still_check_their_own_results(monkeypatch):
    calls: list[int] = []
    original = base.all_finite
    monkeypatch.setattr(base, "all_finite", lambda flat, chunk: calls.append(1) or original(flat, chunk))
    global_state = {"w": torch.zeros(1000)}
    aggregation.aggregate("fedadam", global_state, [({"w": torch.ones(1000)}, 1.0)])
    assert calls  # the server step changes the values after the mean was checked
    calls.clear()
    aggregation.aggregate(
        "fedavg", global_state, [({"w": torch.ones(1000)}, 1.0)], dp_clip_norm=1.0, dp_noise_multiplier=0.1
    )
    assert calls


@pytest.mark.parametrize("numel", [10, 5000, (1 << 21) + 3, 3 * DEFAULT_CHUNK + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_divide_checked_divides_as_div_and_sees_every_bad_value(numel, dtype):
    generator = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=generator, dtype=dtype) * 1e3
    acc = values.clone()
    assert divide_checked(acc, 7.3, DEFAULT_CHUNK)
    assert torch.equal(acc, values / 7.3)
    for index in (0, numel // 2, numel - 1):
        bad = values.clone()
        bad[index] = math.nan
        assert not divide_checked(bad, 7.3, DEFAULT_CHUNK)
