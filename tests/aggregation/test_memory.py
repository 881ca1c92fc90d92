"""Peak memory of the streaming mean: never more than 2 models' worth of tensors, whatever N."""

from __future__ import annotations

import weakref

import torch

from flplatform import aggregation
from flplatform.aggregation import decode_safetensors, encode_safetensors

PARAMS = 5_000_000
N = 20


def make_update(i: int) -> dict[str, torch.Tensor]:
    # 5M float32 parameters in a few tensors of different sizes, one integer buffer
    return {
        "conv.weight": torch.full((1000, 4000), float(i)),
        "fc.weight": torch.full((999_000,), float(i)),
        "fc.bias": torch.full((1000,), float(i)),
        "bn.num_batches_tracked": torch.tensor(i, dtype=torch.int64),
    }


MODEL_BYTES = sum(t.numel() * t.element_size() for t in make_update(0).values())


def test_update_size_is_5m_params():
    assert sum(t.numel() for t in make_update(0).values()) == PARAMS + 1


def test_accumulator_holds_at_most_two_models_at_any_n():
    agg = aggregation.get("fedavg")
    agg.begin(None)
    alive: list[weakref.ref] = []
    peak_held = 0
    for i in range(N):
        update = make_update(i)
        alive.append(weakref.ref(update["conv.weight"]))
        agg.add(update, 1.0)
        del update
        peak_held = max(peak_held, agg.held_bytes())
        # updates still referenced by anyone (only the aggregator may hold one, pending)
        assert sum(ref() is not None for ref in alive) <= 1
    assert peak_held <= 2 * MODEL_BYTES
    result, _ = agg.finish()
    assert torch.all(result["fc.weight"] == (N - 1) / 2)
    assert result["bn.num_batches_tracked"].item() == 10  # 9.5 rounds half to even


def test_fedavg_generator_of_decoded_bytes_releases_every_update():
    alive: list[weakref.ref] = []
    in_flight = []

    def uploads():
        for i in range(N):
            blob = encode_safetensors(make_update(i))
            state = decode_safetensors(blob)
            alive.append(weakref.ref(state["fc.weight"]))
            del blob
            in_flight.append(sum(ref() is not None for ref in alive))
            yield state, float(i + 1)
            del state

    result = aggregation.fedavg(uploads())
    # the update just drawn plus at most one held pending by the accumulator
    assert max(in_flight) <= 2
    expected = sum(i * (i + 1) for i in range(N)) / sum(range(1, N + 1))
    assert torch.allclose(result["conv.weight"], torch.full((1000, 4000), expected))


def test_float64_accumulation_holds_no_pending_update():
    agg = aggregation.get("fedavg", accumulate_dtype="float64")
    agg.begin(None)
    for i in range(4):
        agg.add(make_update(i), 1.0)
        assert agg.held_bytes() <= 2 * MODEL_BYTES + 16
    result, _ = agg.finish()
    assert result["fc.weight"].dtype == torch.float32
    assert torch.all(result["fc.weight"] == 1.5)
