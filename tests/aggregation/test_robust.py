"""Median, trimmed mean, Krum and Multi-Krum against plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import trim_mean

from flplatform import aggregation
from flplatform.aggregation import InsufficientUpdatesError, decode_safetensors, encode_safetensors
from flplatform.aggregation import robust as robust_module


def random_models(n: int, seed: int, sizes=((5, 7), (13,))) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {f"t{i}": torch.randn(size, generator=generator) for i, size in enumerate(sizes)} for _ in range(n)
    ]


def run(name: str, models, weights=None, global_state=None, **options):
    agg = aggregation.get(name, **options)
    agg.begin(global_state)
    for i, model in enumerate(models):
        agg.add(model, 1.0 if weights is None else weights[i])
    return agg, agg.finish()[0]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**16), decoded=st.booleans())
def test_median_equals_numpy_exactly(n, seed, decoded):
    models = random_models(n, seed)
    if decoded:
        models = [decode_safetensors(encode_safetensors(m)) for m in models]
    _, result = run("median", models, weights=[float(i + 1) for i in range(n)])
    for name in models[0]:
        expected = np.median(np.stack([m[name].numpy() for m in models]), axis=0)
        assert np.array_equal(result[name].numpy(), expected), name


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**16), beta=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]))
def test_trimmed_mean_equals_scipy(n, seed, beta):
    models = random_models(n, seed)
    _, result = run("trimmed_mean", models, beta=beta)
    for name in models[0]:
        stacked = np.stack([m[name].numpy().astype(np.float64) for m in models])
        expected = trim_mean(stacked, beta, axis=0)
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_robust_statistics_work_over_many_coordinate_blocks(monkeypatch):
    monkeypatch.setattr(robust_module, "ROBUST_BLOCK_BYTES", 4096)  # forces ~100 blocks
    models = random_models(7, 3, sizes=((40, 30), (17,)))
    _, median = run("median", models)
    _, trimmed = run("trimmed_mean", models, beta=0.2)
    for name in models[0]:
        stacked = np.stack([m[name].numpy() for m in models])
        assert np.array_equal(median[name].numpy(), np.median(stacked, axis=0))
        np.testing.assert_allclose(
            trimmed[name].numpy(), trim_mean(stacked.astype(np.float64), 0.2, axis=0), rtol=1e-6
        )


def test_median_resists_outliers_and_averages_integer_buffers():
    models = [{"w": torch.full((4,), v), "n": torch.tensor(c)} for v, c in [(1.0, 10), (2.0, 20), (1e9, 30)]]
    _, result = run("median", models)
    assert result["w"].tolist() == [2.0] * 4
    assert result["n"].item() == 20


def krum_setup(n_honest=8, f=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(500, generator=generator)
    honest = [{"w": center + 0.01 * torch.randn(500, generator=generator)} for _ in range(n_honest)]
    attackers = [{"w": center + 50.0 * torch.randn(500, generator=generator)} for _ in range(f)]
    # attackers first and last, so a positional bug shows
    models = attackers[:1] + honest + attackers[1:]
    honest_indices = set(range(1, 1 + n_honest))
    return models, honest, honest_indices


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krum_picks_an_honest_update(seed):
    models, honest, honest_indices = krum_setup(seed=seed)
    agg, result = run("krum", models, f=2)
    (chosen,) = agg.selected()
    assert chosen in honest_indices
    assert torch.equal(result["w"], models[chosen]["w"])


def test_multi_krum_averages_only_honest_updates():
    models, honest, honest_indices = krum_setup(seed=4)
    weights = [float(i + 1) for i in range(len(models))]
    agg, result = run("multi_krum", models, weights=weights, f=2)  # m = n - f = 8
    assert set(agg.selected()) == honest_indices
    expected = sum(models[i]["w"].double() * weights[i] for i in honest_indices) / sum(
        weights[i] for i in honest_indices
    )
    assert torch.allclose(result["w"].double(), expected, atol=1e-5)
    agg, _ = run("multi_krum", models, f=2, m=3)
    assert len(agg.selected()) == 3 and set(agg.selected()) <= honest_indices


def test_krum_needs_more_than_2f_plus_2_updates():
    with pytest.raises(InsufficientUpdatesError, match="more than 6"):
        run("krum", random_models(6, 0), f=2)
    run("krum", random_models(7, 0), f=2)
    with pytest.raises(InsufficientUpdatesError):
        run("multi_krum", random_models(4, 0), f=0, m=5)


def test_robust_aggregators_accept_separate_and_decoded_tensors_alike():
    models = random_models(5, 9)
    decoded = [decode_safetensors(encode_safetensors(m)) for m in models]
    for name in ("median", "trimmed_mean", "krum", "multi_krum"):
        _, one = run(name, models)
        _, two = run(name, decoded)
        for key in one:
            assert torch.allclose(one[key], two[key], atol=1e-6), (name, key)
