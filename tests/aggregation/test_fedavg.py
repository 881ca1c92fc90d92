"""Streaming weighted mean: hand values, order independence, generators, errors, integer buffers."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flplatform import aggregation
from flplatform.aggregation import (
    AggregatorStateError,
    UpdateValidationError,
    ZeroTotalWeightError,
    decode_safetensors,
    encode_safetensors,
    fedavg,
)


def constant_model(value: float, count: int = 0) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.full((4, 3, 2, 2), float(value)),
        "conv.bias": torch.full((4,), float(value)),
        "bn.running_mean": torch.full((4,), float(value)),
        "bn.num_batches_tracked": torch.tensor(count, dtype=torch.int64),
        "fc.weight": torch.full((2, 4), float(value), dtype=torch.float64),
    }


def reference_mean(pairs):
    """Plain float64 per-tensor weighted mean (the reference implementation). Weights are first
    divided by the largest (the same mean), so subnormal weights such as 5e-324, which Hypothesis
    finds, do not round every ``w · x`` to a multiple of 5e-324."""
    scale = max(w for _, w in pairs)
    scaled = [(sd, w / scale) for sd, w in pairs]
    total = sum(w for _, w in scaled)
    return {name: sum(sd[name].double() * w for sd, w in scaled) / total for name in pairs[0][0]}


def test_equal_weights_over_models_0_to_9_is_4_5():
    result = fedavg([(constant_model(i), 1.0) for i in range(10)])
    for name, tensor in result.items():
        if tensor.is_floating_point():
            assert torch.all(tensor == 4.5), name
    assert result["fc.weight"].dtype == torch.float64
    assert list(result) == list(constant_model(0))


def test_sample_size_weights_0_1_2_over_models_0_1_2():
    result = fedavg([(constant_model(i), n) for i, n in zip(range(3), [0, 1, 2], strict=False)])
    assert torch.allclose(result["conv.weight"], torch.full((4, 3, 2, 2), 5 / 3))
    assert result["fc.weight"][0, 0].item() == pytest.approx(5 / 3, rel=1e-15)


def test_generator_is_consumed_one_pair_at_a_time():
    drawn = []

    def updates():
        for i in range(10):
            drawn.append(i)
            yield constant_model(i), 1

    result = fedavg(updates())
    assert drawn == list(range(10))
    assert torch.all(result["conv.bias"] == 4.5)


def test_decoded_safetensors_and_plain_state_dicts_give_the_same_result():
    torch.manual_seed(0)
    models = [
        {
            k: torch.randn_like(v.double()).to(v.dtype) if v.is_floating_point() else v
            for k, v in constant_model(0, count=i).items()
        }
        for i in range(6)
    ]
    weights = [3, 1, 4, 1, 5, 9]
    plain = fedavg(list(zip(models, weights, strict=False)))
    decoded = fedavg(
        [(decode_safetensors(encode_safetensors(m)), w) for m, w in zip(models, weights, strict=False)]
    )
    streamed = fedavg(
        (decode_safetensors(encode_safetensors(m)), w) for m, w in zip(models, weights, strict=False)
    )
    expected = reference_mean(list(zip(models, weights, strict=False)))
    for name in expected:
        if expected[name].is_floating_point() and models[0][name].is_floating_point():
            tol = 1e-12 if models[0][name].dtype == torch.float64 else 1e-6
            assert torch.allclose(plain[name].double(), expected[name], atol=tol), name
            assert torch.allclose(decoded[name], plain[name], atol=tol), name
            assert torch.allclose(streamed[name], plain[name], atol=tol), name


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
    accumulate=st.sampled_from(["float32", "float64"]),
)
def test_order_independence_against_reference(weights, seed, accumulate):
    if sum(weights) <= 0:
        weights = [*weights[:-1], 1.0]
    generator = torch.Generator().manual_seed(seed)
    pairs = [
        ({"a": torch.randn(37, generator=generator), "b": torch.randn(3, 5, generator=generator)}, w)
        for w in weights
    ]
    shuffled = pairs[:]
    random.Random(seed).shuffle(shuffled)
    one = fedavg(pairs, accumulate_dtype=accumulate)
    two = fedavg(iter(shuffled), accumulate_dtype=accumulate)
    expected = reference_mean(pairs)
    for name in expected:
        assert torch.allclose(one[name].double(), expected[name], atol=1e-5, rtol=1e-5)
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=1e-5)


def test_large_tensor_uses_every_chunk_and_worker():
    torch.manual_seed(1)
    pairs = [({"big": torch.randn(300_001), "small": torch.randn(7)}, float(i + 1)) for i in range(5)]
    result = fedavg(pairs)
    expected = reference_mean(pairs)
    assert torch.allclose(result["big"].double(), expected["big"], atol=1e-6)
    assert torch.allclose(result["small"].double(), expected["small"], atol=1e-6)


def test_zero_total_weight_and_no_update_raise():
    with pytest.raises(ZeroTotalWeightError):
        fedavg([(constant_model(1), 0), (constant_model(2), 0.0)])
    with pytest.raises(ZeroTotalWeightError):
        fedavg([])
    with pytest.raises(ZeroTotalWeightError):
        fedavg(iter(()))


def test_integer_buffers_are_rounded_weighted_means():
    pairs = [(constant_model(0, count=c), w) for c, w in [(10, 1), (20, 1), (31, 2)]]
    result = fedavg(pairs)
    # (10 + 20 + 62) / 4 = 23.0
    assert result["bn.num_batches_tracked"].dtype == torch.int64
    assert result["bn.num_batches_tracked"].item() == 23
    # half to even: (1 + 2) / 2 = 1.5 -> 2, (2 + 3) / 2 = 2.5 -> 2
    assert (
        fedavg([(constant_model(0, 1), 1), (constant_model(0, 2), 1)])["bn.num_batches_tracked"].item() == 2
    )
    assert (
        fedavg([(constant_model(0, 2), 1), (constant_model(0, 3), 1)])["bn.num_batches_tracked"].item() == 2
    )
    big = 2**40 + 1  # exact in float64 accumulation
    assert (
        fedavg([(constant_model(0, big), 1), (constant_model(0, big), 3)])["bn.num_batches_tracked"].item()
        == big
    )


def test_small_integer_and_bool_buffers():
    def model(i):
        return {
            "w": torch.full((3,), float(i)),
            "q": torch.tensor([i, 2 * i], dtype=torch.int8),
            "mask": torch.tensor([i >= 1, i >= 2, False]),
            "h": torch.full((2,), float(i)).half(),
        }

    result = fedavg([(model(i), 1) for i in range(3)])
    assert result["q"].tolist() == [1, 2]
    assert result["mask"].tolist() == [True, False, False]
    assert result["h"].dtype == torch.float16 and result["h"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**constant_model(1), "extra": torch.zeros(1)}, "unexpected"),
        ({k: v for k, v in constant_model(1).items() if k != "conv.bias"}, "missing"),
        ({**constant_model(1), "conv.bias": torch.zeros(5)}, "shape"),
        ({**constant_model(1), "conv.bias": torch.zeros(4, dtype=torch.float64)}, "dtype"),
        ({**constant_model(1), "conv.bias": [0.0] * 4}, "not a tensor"),
    ],
)
def test_mismatching_update_is_rejected(bad, message):
    agg = aggregation.get("fedavg")
    agg.begin(constant_model(0))
    agg.add(constant_model(1), 1)
    with pytest.raises(UpdateValidationError, match=message):
        agg.add(bad, 1)
    # the round goes on with the good updates
    agg.add(constant_model(3), 1)
    assert torch.all(agg.finish()[0]["conv.weight"] == 2.0)


@pytest.mark.parametrize("weight", [-1, float("nan"), float("inf"), "3", True])
def test_bad_weights_are_rejected(weight):
    agg = aggregation.get("fedavg")
    agg.begin(None)
    with pytest.raises(UpdateValidationError, match="weight"):
        agg.add(constant_model(1), weight)


def test_non_finite_aggregate_is_reported():
    bad = constant_model(1)
    bad["conv.bias"] = torch.tensor([1.0, math.nan, 0.0, 0.0])
    with pytest.raises(UpdateValidationError, match="NaN"):
        fedavg([(constant_model(1), 1), (bad, 1)])


def test_life_cycle_errors():
    agg = aggregation.get("fedavg")
    with pytest.raises(AggregatorStateError):
        agg.add(constant_model(1), 1)
    agg.begin(None)
    agg.add(constant_model(1), 1)
    agg.finish()
    with pytest.raises(AggregatorStateError):
        agg.finish()
    with pytest.raises(AggregatorStateError):
        agg.add(constant_model(1), 1)
    agg.begin(constant_model(0))  # a new round on the same object
    agg.add(constant_model(2), 1)
    new_global, state = agg.finish()
    assert torch.all(new_global["conv.weight"] == 2.0)
    assert state["round"].item() == 1


def test_result_can_be_encoded_by_both_encoders():
    from safetensors.torch import load, save

    result = fedavg([(constant_model(i, i), 1) for i in range(3)])
    ours = decode_safetensors(encode_safetensors(result))
    theirs = load(save({k: v.clone() for k, v in result.items()}))
    for name in result:
        assert torch.equal(ours[name], result[name]) and torch.equal(theirs[name], result[name])


def test_aggregate_helper_and_fedprox_client_config():
    new_global, state = aggregation.aggregate(
        "fedprox", constant_model(0), [(constant_model(2), 1), (constant_model(4), 1)], proximal_mu=0.5
    )
    assert torch.all(new_global["conv.weight"] == 3.0)
    assert state["round"].item() == 1
    assert aggregation.get("fedprox", proximal_mu=0.5).client_config == {"proximal_mu": 0.5}
    assert aggregation.get("fedavg").client_config == {}


def mixed_model(generator: torch.Generator, shift: float) -> dict[str, torch.Tensor]:
    return {
        "big": torch.randn(300_001, generator=generator) + shift,  # several chunks and fold threads
        "half": torch.randn(33, generator=generator).half(),
        "double": torch.randn(5, generator=generator, dtype=torch.float64),
        "steps": torch.tensor(int(shift * 10), dtype=torch.int64),
    }


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 75),
    seed=st.integers(0, 2**16),
    accumulate=st.sampled_from(["float32", "float64"]),
    feed=st.sampled_from(["resident views", "generator", "list", "resident bytes", "bytes generator"]),
)
def test_decoded_updates_in_any_pass_structure_match_the_reference(n, seed, accumulate, feed):
    # Flat (decoded) updates take the multi-source kernel: first pass written into an uninitialised
    # accumulator, passes of up to 32 (resident views, lists) or 2 (generator), and the last pass
    # dividing by the total weight in place — each of these must give the plain weighted mean.
    generator = torch.Generator().manual_seed(seed)
    blobs = [encode_safetensors(mixed_model(generator, i / 7)) for i in range(n)]
    weights = [float(1 + (i * 37 + seed) % 11) for i in range(n)]
    if feed == "resident views":
        agg = aggregation.get("fedavg", accumulate_dtype=accumulate)
        agg.begin(None)
        for blob, weight in zip(blobs, weights, strict=False):
            agg.add(decode_safetensors(blob), weight)
        result, _ = agg.finish()
    elif feed == "generator":
        result = fedavg(
            ((decode_safetensors(bytes(blob)), w) for blob, w in zip(blobs, weights, strict=False)),
            accumulate_dtype=accumulate,
        )
    elif feed == "resident bytes":  # safetensors bytes straight into add(): one view per dtype group
        agg = aggregation.get("fedavg", accumulate_dtype=accumulate)
        agg.begin(None)
        for blob, weight in zip(blobs, weights, strict=False):
            agg.add(blob, weight)
        result, _ = agg.finish()
    elif feed == "bytes generator":
        result = fedavg(
            ((bytes(blob), w) for blob, w in zip(blobs, weights, strict=False)), accumulate_dtype=accumulate
        )
    else:
        result = fedavg(
            [(decode_safetensors(blob), w) for blob, w in zip(blobs, weights, strict=False)],
            accumulate_dtype=accumulate,
        )
    expected = reference_mean(
        [(decode_safetensors(blob), w) for blob, w in zip(blobs, weights, strict=False)]
    )
    assert torch.allclose(result["big"].double(), expected["big"], atol=1e-5)
    assert torch.allclose(result["double"], expected["double"], atol=1e-12)
    assert torch.allclose(result["half"].double(), expected["half"], atol=2e-3)
    assert result["steps"].item() == round(float(expected["steps"]))
    assert [result[k].dtype for k in ("big", "half", "double", "steps")] == [
        torch.float32,
        torch.float16,
        torch.float64,
        torch.int64,
    ]


def test_safetensors_bytes_are_checked_like_state_dicts():
    agg = aggregation.get("fedavg")
    agg.begin(constant_model(0.0))
    good = encode_safetensors(constant_model(1.0, 3))
    agg.add(good, 1.0)
    with pytest.raises(aggregation.DecodeError):
        agg.add(good[:-3], 1.0)  # truncated
    wrong_shape = {**constant_model(1.0), "conv.bias": torch.zeros(5)}
    with pytest.raises(UpdateValidationError, match="conv.bias"):
        agg.add(encode_safetensors(wrong_shape), 1.0)
    with pytest.raises(UpdateValidationError, match="missing"):
        agg.add(encode_safetensors({"conv.weight": torch.zeros(4, 3, 2, 2)}), 1.0)
    agg.add(bytearray(encode_safetensors(constant_model(3.0, 5))), 1.0)  # mutable buffers work too
    result, _ = agg.finish()
    assert torch.all(result["conv.weight"] == 2.0) and result["bn.num_batches_tracked"].item() == 4


def test_safetensors_bytes_in_an_unusual_order_are_decoded_tensor_by_tensor():
    # A hand-written file whose float32 tensors are not back to back in our order still aggregates.
    import json
    import struct

    tensors = {"b": torch.arange(3, dtype=torch.float32), "a": torch.arange(4, dtype=torch.float32) + 10}
    header, offset, chunks = {}, 0, []
    for name in ("b", "a"):  # reverse of the (dtype, name) order the layout expects
        raw = tensors[name].numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        chunks.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    blob = struct.pack("<Q", len(text)) + text + b"".join(chunks)
    result = fedavg([(blob, 1.0), (encode_safetensors({k: v * 3 for k, v in tensors.items()}), 1.0)])
    assert torch.equal(result["a"], tensors["a"] * 2) and torch.equal(result["b"], tensors["b"] * 2)
