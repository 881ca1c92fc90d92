"""Peak memory of the streaming mean: never more than 2 models' worth of tensors, whatever N."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

from flplatform import aggregation
from flplatform.aggregation import accumulator, decode_safetensors, encode_safetensors

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


# The tests above count the tensors the aggregator holds; this one measures the process itself, so
# temporaries inside a kernel (e.g. a whole-model ``torch.isfinite`` mask in ``finish``) count too.
RSS_PROBE = r"""
import json, sys
import torch
from flplatform import aggregation
from flplatform.aggregation import accumulator, decode_safetensors, encode_safetensors

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096

def peak():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")

n, params = int(sys.argv[1]), int(sys.argv[2])
blobs = [encode_safetensors({"conv.weight": torch.full((params // 2,), float(i)),
                             "fc.weight": torch.full((params - params // 2 - 10,), float(i)),
                             "fc.bias": torch.full((10,), float(i)),
                             "bn.num_batches_tracked": torch.tensor(i)}) for i in range(4)]
model_bytes = 4 * params + 8
aggregation.fedavg(((decode_safetensors(blobs[i % 4]), 1.0) for i in range(4)))  # warm-up
out = {}
for mode in ("generator", "stream", "stream-float64", "stream-float64-ordered"):
    before = rss()
    reset_peak()
    if mode == "generator":
        result = aggregation.fedavg((decode_safetensors(blobs[i % 4]), i + 1) for i in range(n))
    else:
        agg = aggregation.get("fedavg", accumulate_dtype="float32" if mode == "stream" else "float64")
        agg.track_order = mode.endswith("ordered")  # the server's close: settle, redo, finish
        agg.begin(None)
        for i in range(n):
            agg.add(decode_safetensors(blobs[i % 4]), i + 1)
        if agg.settle():
            for i in range(n):
                agg.redo(decode_safetensors(blobs[i % 4]), i + 1)
        result, _ = agg.finish()
        del agg
    out[mode] = (peak() - before) / model_bytes
    del result
out["threads"] = torch.get_num_threads()
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_process_peak_memory_of_a_round_is_at_most_two_models():
    # N=20 updates of 5M float32 parameters arriving as safetensors bytes (already in memory, as
    # uploads are): decoding is zero-copy, so the round's extra memory is the accumulator (float32:
    # 1 model; float64: 2 models) plus kernel temporaries, which must stay small.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(N), str(PARAMS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    # Chunk-sized temporaries (≤ 2 MiB each), thread-local buffers, interpreter objects: a fixed few
    # MiB, not a fraction of the model (a whole-model float32 temporary is 20 MB = 1 model).
    slack = (8 << 20) / MODEL_BYTES
    assert peaks["generator"] <= 1 + slack, peaks
    assert peaks["stream"] <= 1 + slack, peaks
    assert peaks["stream-float64"] <= 2 + slack, peaks
    # The server's close (order tracked: settle, redo, finish) converts the float64 sums in the
    # accumulator's own memory: each fold thread's chunk buffers (≈ 4.3 MiB), the redo's few sums,
    # never a second model in its own dtype (which its pieces' temporaries used to add up to).
    ordered_slack = ((8 << 20) + (5 << 20) * peaks["threads"]) / MODEL_BYTES
    assert peaks["stream-float64-ordered"] <= 2 + ordered_slack, peaks


def _count_folds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Updates per pass over the accumulator, as the aggregator folds them."""
    from flplatform.aggregation.accumulator import WeightedSum

    passes: list[int] = []
    original = WeightedSum.fold

    def fold(self, items, **options):
        passes.append(len(items))
        return original(self, items, **options)

    monkeypatch.setattr(WeightedSum, "fold", fold)
    return passes


def small_update(i: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1000,), float(i)), "b": torch.full((10,), float(i))}


def test_views_of_bytes_kept_elsewhere_wait_to_fold_many_per_pass(monkeypatch):
    passes = _count_folds(monkeypatch)
    uploads = [encode_safetensors(small_update(i)) for i in range(40)]  # resident, as received uploads are
    agg = aggregation.get("fedavg")
    agg.begin(None)
    model_bytes = 1010 * 4
    for blob in uploads:
        agg.add(decode_safetensors(blob), 1.0)
        # the waiting views cost nothing: accumulator + the update being added
        assert agg.held_bytes() <= 2 * model_bytes
    result, _ = agg.finish()
    assert passes == [32, 8]
    assert torch.allclose(result["w"], torch.full((1000,), 19.5))
    assert sum(passes) == 40


def test_views_whose_bytes_are_let_go_keep_the_two_model_bound(monkeypatch):
    passes = _count_folds(monkeypatch)
    agg = aggregation.get("fedavg")
    agg.begin(None)
    alive: list[weakref.ref] = []
    for i in range(10):
        state = decode_safetensors(encode_safetensors(small_update(i)))  # nobody else keeps these bytes
        alive.append(weakref.ref(state["w"]))
        agg.add(state, 1.0)
        del state
        assert sum(ref() is not None for ref in alive) <= 1
    agg.finish()
    assert passes == [2] * 5


@pytest.mark.parametrize("make_buffer", [bytearray, lambda blob: memoryview(bytearray(blob))])
def test_views_of_mutable_buffers_never_wait(monkeypatch, make_buffer):
    # the owner of a bytearray may refill it for the next update: such views are folded before add returns
    passes = _count_folds(monkeypatch)
    buffers = [make_buffer(encode_safetensors(small_update(i))) for i in range(6)]
    agg = aggregation.get("fedavg")
    agg.begin(None)
    for buffer in buffers:
        agg.add(decode_safetensors(buffer), 1.0)
    agg.finish()
    assert passes == [1] * 6


def test_stable_views_wait_for_fold_pending_and_fold_in_one_pass(monkeypatch):
    # what the server passes: views of memory-mapped immutable blobs, kept mapped until the pass
    passes = _count_folds(monkeypatch)
    buffers = [bytearray(encode_safetensors(small_update(i))) for i in range(5)]
    agg = aggregation.get("fedavg", accumulate_dtype="float64")
    agg.begin(None)
    for buffer in buffers[:3]:
        agg.add(memoryview(buffer), 1.0, stable=True)
    assert passes == [] and agg.held_bytes() == agg._weighted_sum.nbytes  # waiting, not owned
    agg.fold_pending()
    agg.add(memoryview(buffers[3]), 1.0, stable=True)
    agg.add(memoryview(buffers[4]), 1.0)  # not stable: folded with the one waiting before add returns
    assert passes == [3, 2]
    result, _ = agg.finish()
    assert torch.allclose(result["w"], torch.full((1000,), 2.0))


def test_views_of_bytes_released_while_waiting_are_folded_at_the_next_add(monkeypatch):
    passes = _count_folds(monkeypatch)
    uploads = [encode_safetensors(small_update(i)) for i in range(5)]
    agg = aggregation.get("fedavg")
    agg.begin(None)
    for blob in uploads:
        agg.add(decode_safetensors(blob), 1.0)
    del blob
    uploads.clear()  # the owner lets go of the waiting updates' bytes: now they cost memory
    agg.add(decode_safetensors(encode_safetensors(small_update(5))), 1.0)
    assert passes == [6]
    result, _ = agg.finish()
    assert torch.allclose(result["w"], torch.full((1000,), 2.5))


def test_a_caller_replacing_a_decoded_tensor_is_not_mistaken_for_views(monkeypatch):
    # a model this small would fold update by update (inline); the judgement matters for larger ones
    monkeypatch.setattr(accumulator, "INLINE_FOLD_BYTES", 0)
    passes = _count_folds(monkeypatch)
    uploads = [encode_safetensors(small_update(i)) for i in range(4)]
    agg = aggregation.get("fedavg")
    agg.begin(None)
    for blob in uploads:
        state = decode_safetensors(blob)
        state["w"] = state["w"].clone()  # owned by the caller now, whatever the bytes do
        agg.add(state, 1.0)
        del state
    agg.finish()
    assert passes == [1] * 4  # the caller's tensor may change: folded before add returns
