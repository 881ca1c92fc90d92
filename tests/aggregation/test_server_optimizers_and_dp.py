"""FedOpt one-step values derived by hand, state round trips, central DP clipping and noise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flplatform import aggregation
from flplatform.aggregation import (
    AGGREGATOR_NAMES,
    AGGREGATOR_OPTIONS,
    AggregatorOptionsError,
    AggregatorStateError,
    decode_safetensors,
    describe_aggregators,
    encode_safetensors,
)


def model(value: float, count: int = 5) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((2, 3), float(value)),
        "b": torch.full((3,), float(value)),
        "n": torch.tensor(count),
    }


def one_round(name, global_value=1.0, update_values=(1.25, 1.75), state=None, **options):
    agg = aggregation.get(name, **options)
    agg.begin(model(global_value), state)
    for value in update_values:
        agg.add(model(value), 1)
    return agg.finish()


# The two updates average to 1.5, the global model is 1.0: delta = 0.5 everywhere.


def test_fedavgm_one_and_two_steps():
    new, state = one_round("fedavgm", server_lr=1.0, momentum=0.9)
    assert torch.allclose(new["w"], torch.full((2, 3), 1.5))  # v = 0.5; x = 1 + 0.5
    assert torch.allclose(state["momentum.w"], torch.full((2, 3), 0.5))
    new2, state2 = one_round(
        "fedavgm", global_value=1.5, update_values=(1.5,), state=state, server_lr=0.5, momentum=0.9
    )
    # delta = 0; v = 0.9 * 0.5 = 0.45; x = 1.5 + 0.5 * 0.45 = 1.725
    assert torch.allclose(new2["b"], torch.full((3,), 1.725))
    assert state2["round"].item() == 2
    assert new2["n"].item() == 5  # integer buffers: plain rounded mean


def test_fedadam_one_step():
    new, state = one_round("fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    m, v = 0.1 * 0.5, 0.01 * 0.25  # 0.05, 0.0025
    expected = 1.0 + 0.1 * m / (math.sqrt(v) + 1e-9)
    assert torch.allclose(new["w"], torch.full((2, 3), expected))
    assert torch.allclose(state["m.w"], torch.full((2, 3), m))
    assert torch.allclose(state["v.b"], torch.full((3,), v))


def test_fedyogi_one_step_from_zero_and_from_a_given_state():
    new, state = one_round("fedyogi", server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    # v = 0 - 0.01 * 0.25 * sign(0 - 0.25) = 0.0025
    assert torch.allclose(new["w"], torch.full((2, 3), 1.0 + 0.01 * 0.05 / (0.05 + 1e-3)))
    assert torch.allclose(state["v.w"], torch.full((2, 3), 0.0025))
    given = {
        "round": torch.tensor(4),
        "m.w": torch.full((2, 3), 0.2),
        "m.b": torch.full((3,), 0.2),
        "v.w": torch.full((2, 3), 1.0),
        "v.b": torch.full((3,), 1.0),
    }
    new, state = one_round("fedyogi", state=given, server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    m = 0.9 * 0.2 + 0.1 * 0.5  # 0.23
    v = 1.0 - 0.01 * 0.25 * 1.0  # sign(1 - 0.25) = +1 -> 0.9975
    assert torch.allclose(state["v.b"], torch.full((3,), v))
    assert torch.allclose(new["b"], torch.full((3,), 1.0 + 0.01 * m / (math.sqrt(v) + 1e-3)))
    assert state["round"].item() == 5


def test_fedadagrad_one_step():
    new, state = one_round("fedadagrad", server_lr=0.1, beta1=0.0, tau=1e-9)
    assert torch.allclose(new["w"], torch.full((2, 3), 1.0 + 0.1 * 0.5 / (0.5 + 1e-9)))
    assert torch.allclose(state["v.w"], torch.full((2, 3), 0.25))
    new2, _ = one_round("fedadagrad", state=state, server_lr=0.1, beta1=0.0, tau=1e-9)
    assert torch.allclose(new2["w"], torch.full((2, 3), 1.0 + 0.1 * 0.5 / math.sqrt(0.5)))


def test_optimizer_state_survives_safetensors_and_is_checked():
    _, state = one_round("fedadam")
    restored = decode_safetensors(encode_safetensors(state))
    again, _ = one_round("fedadam", state=restored)
    assert torch.isfinite(again["w"]).all()
    bad = dict(restored)
    bad.pop("m.w")
    with pytest.raises(AggregatorStateError, match="missing"):
        one_round("fedadam", state=bad)
    with pytest.raises(AggregatorStateError, match="shape"):
        one_round("fedadam", state={**restored, "v.b": torch.zeros(4)})
    with pytest.raises(AggregatorStateError):
        one_round("fedavg", state=restored)
    with pytest.raises(AggregatorStateError, match="global model"):
        aggregation.get("fedadam").begin(None)


def test_dp_clipping_bounds_every_update_norm():
    clip = 1.0
    glob = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    generator = torch.Generator().manual_seed(0)
    updates = []
    for scale in (0.001, 0.5, 3.0, 100.0):
        updates.append(
            {
                "w": scale * torch.randn(1000, generator=generator) / math.sqrt(1000),
                "b": scale * torch.randn(10, generator=generator) / math.sqrt(10),
            }
        )
    for update in updates:  # a single update: the result IS the clipped update
        for name in ("fedavg", "median", "trimmed_mean", "fedprox"):
            agg = aggregation.get(name, dp_clip_norm=clip)
            agg.begin(glob)
            agg.add(update, 3.0)
            result, _ = agg.finish()
            norm = math.sqrt(sum(float((result[k].double() - glob[k]).pow(2).sum()) for k in glob))
            original = math.sqrt(sum(float(update[k].double().pow(2).sum()) for k in glob))
            assert norm <= clip * (1 + 1e-5), name
            assert norm == pytest.approx(min(original, clip), rel=1e-4), name
    # any combination of clipped deltas stays inside the ball (it is convex)
    for name in ("krum", "multi_krum", "median", "fedavg"):
        agg = aggregation.get(name, dp_clip_norm=clip)
        agg.begin(glob)
        for update in updates:
            agg.add(update, 1.0)
        result, _ = agg.finish()
        norm = math.sqrt(sum(float(result[k].double().pow(2).sum()) for k in glob))
        assert norm <= clip * (1 + 1e-5), name
    # the mean of clipped updates: every delta clipped separately
    agg = aggregation.get("fedavg", dp_clip_norm=clip)
    agg.begin(glob)
    for update in updates:
        agg.add(decode_safetensors(encode_safetensors(update)), 1.0)
    result, _ = agg.finish()
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in glob.items()}
    for update in updates:
        norm = math.sqrt(sum(float(update[k].double().pow(2).sum()) for k in glob))
        factor = min(1.0, clip / norm)
        for k in glob:
            expected[k] += update[k].double() * factor / len(updates)
    for k in glob:
        assert torch.allclose(result[k].double(), expected[k], atol=1e-6)


def test_dp_noise_has_the_stated_std_and_is_seeded_per_round():
    glob = {"w": torch.zeros(200_000)}

    def noisy(seed, state=None, n=4):
        agg = aggregation.get("fedavg", dp_clip_norm=2.0, dp_noise_multiplier=1.5, seed=seed)
        agg.begin(glob, state)
        for _ in range(n):
            agg.add(glob, 1.0)
        return agg.finish()

    first, state = noisy(7)
    assert float(first["w"].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.02)
    assert float(first["w"].mean()) == pytest.approx(0.0, abs=0.01)
    again, _ = noisy(7)
    assert torch.equal(first["w"], again["w"])
    next_round, _ = noisy(7, state)
    assert not torch.equal(first["w"], next_round["w"])
    unseeded, _ = noisy(None)
    assert not torch.equal(first["w"], unseeded["w"])


def test_options_are_described_and_validated():
    assert AGGREGATOR_NAMES == (
        "fedavg",
        "fedprox",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
    )
    described = json.loads(json.dumps(describe_aggregators()))
    assert set(described) == set(AGGREGATOR_NAMES)
    for name in AGGREGATOR_NAMES:
        options = described[name]["options"]
        assert {"dp_clip_norm", "dp_noise_multiplier", "seed", "accumulate_dtype"} <= set(options)
        assert described[name]["description"]
        # every default is accepted
        aggregation.get(name, **{k: spec.default for k, spec in AGGREGATOR_OPTIONS[name].items()})
    assert described["fedadam"]["options"]["beta2"]["default"] == 0.99
    assert described["trimmed_mean"]["options"]["beta"]["exclusive_maximum"] is True
    bad_calls = [
        ("nope", {}),
        ("fedavg", {"server_lr": 1.0}),
        ("fedadam", {"beta1": 1.0}),
        ("fedadam", {"server_lr": 0}),
        ("fedadam", {"tau": "x"}),
        ("trimmed_mean", {"beta": 0.5}),
        ("krum", {"f": -1}),
        ("krum", {"f": 1.5}),
        ("krum", {"m": 2}),
        ("multi_krum", {"m": 0}),
        ("fedavg", {"dp_noise_multiplier": 1.0}),
        ("fedavg", {"dp_clip_norm": 0.0}),
        ("fedavg", {"dp_clip_norm": float("inf")}),
        ("fedavg", {"accumulate_dtype": "float16"}),
        ("fedadagrad", {"beta2": 0.9}),
    ]
    for name, options in bad_calls:
        with pytest.raises(AggregatorOptionsError):
            aggregation.get(name, **options)
