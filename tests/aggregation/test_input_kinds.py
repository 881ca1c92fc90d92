"""Every input kind gives the plain weighted mean: state dicts of separate tensors (folded slot by slot,
several updates per pass), safetensors bytes (one flat range per dtype), lists and generators of
each, and a round that mixes them — with weights, several dtypes, large and small tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flplatform import aggregation
from flplatform.aggregation import encode_safetensors, fedavg
from flplatform.aggregation.segments import fold_segments


def separate_model(generator: torch.Generator, shift: float) -> dict[str, torch.Tensor]:
    """Several tensors per dtype group, each allocated on its own (as a training loop leaves them):
    large ones (cut into chunks) next to small shaped ones, a transposed (non-contiguous) one, and
    float16, float64, integer and boolean groups."""
    return {
        "a.weight": torch.randn(300_001, generator=generator) + shift,  # > one fold chunk
        "b.weight": torch.randn(40, 25, generator=generator) + shift,  # small, shaped
        "c.weight": (torch.randn(30, 20, generator=generator) + shift).t(),  # non-contiguous
        "c.bias": torch.randn(20, generator=generator) + shift,
        "d.scale": torch.tensor(1.0 + shift),  # 0-dim
        "e.half": torch.randn(7, 3, generator=generator).half(),
        "e.half2": torch.randn(5, generator=generator).half(),
        "f.double": torch.randn(4, 4, generator=generator, dtype=torch.float64),
        "f.double2": torch.randn(20_000, generator=generator, dtype=torch.float64),  # > SMALL_TENSOR
        "g.steps": torch.tensor(int(shift * 10), dtype=torch.int64),
        "g.steps2": torch.tensor([int(shift * 3), 4], dtype=torch.int64),
        "h.mask": torch.rand(6, generator=generator) > 0.5,
        "h.mask2": torch.rand(2, 2, generator=generator) > 0.5,
    }


def reference_mean(pairs: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    total = sum(w for _, w in pairs)
    return {name: sum(sd[name].double() * w for sd, w in pairs) / total for name in pairs[0][0]}


def assert_mean(result: dict[str, torch.Tensor], pairs: list[tuple[dict[str, torch.Tensor], float]]) -> None:
    expected = reference_mean(pairs)
    model = pairs[0][0]
    assert set(result) == set(model)  # bytes give the file's order, state dicts their own
    for name, tensor in result.items():
        assert tensor.dtype == model[name].dtype, name
        assert tensor.shape == model[name].shape, name
        want = expected[name]
        if tensor.dtype == torch.bool:
            # A mean of exactly 0.5 is a tie: a float32 sum may land either side of it.
            clear = (want - 0.5).abs() > 1e-5
            assert torch.equal(tensor[clear], (want >= 0.5)[clear]), name
        elif not tensor.is_floating_point():
            assert torch.equal(tensor, want.round()), name
        else:
            tolerance = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}[tensor.dtype]
            assert torch.allclose(tensor.double(), want, atol=tolerance), name


FEEDS = [
    "list of state dicts",
    "generator of state dicts",
    "list of bytes",
    "generator of bytes",
    "add() one by one, state dicts",
    "mixed list",
    "mixed generator",
]


def run_feed(feed: str, pairs, accumulate: str) -> dict[str, torch.Tensor]:
    blobs = [(encode_safetensors(sd), w) for sd, w in pairs]
    mixed = [blobs[i] if i % 2 else pairs[i] for i in range(len(pairs))]
    if feed == "list of state dicts":
        return fedavg(list(pairs), accumulate_dtype=accumulate)
    if feed == "generator of state dicts":
        return fedavg(iter(pairs), accumulate_dtype=accumulate)
    if feed == "list of bytes":
        return fedavg(blobs, accumulate_dtype=accumulate)
    if feed == "generator of bytes":
        return fedavg(((bytes(b), w) for b, w in blobs), accumulate_dtype=accumulate)
    if feed == "mixed list":
        return fedavg(mixed, accumulate_dtype=accumulate)
    if feed == "mixed generator":
        return fedavg(iter(mixed), accumulate_dtype=accumulate)
    agg = aggregation.get("fedavg", accumulate_dtype=accumulate)
    agg.begin(None)
    for state, weight in pairs:
        agg.add(state, weight)
    return agg.finish()[0]


@settings(max_examples=10, deadline=None)
@given(
    n=st.sampled_from([1, 2, 3, 33, 40]),  # one update; 2 per pass; over max_fold (32) per pass
    seed=st.integers(0, 2**16),
    accumulate=st.sampled_from(["float32", "float64"]),
    feed=st.sampled_from(FEEDS),
)
def test_every_input_kind_gives_the_weighted_mean(n, seed, accumulate, feed):
    generator = torch.Generator().manual_seed(seed)
    weights = [float(1 + (i * 37 + seed) % 11) for i in range(n)]
    pairs = [(separate_model(generator, i / 7), w) for i, w in enumerate(weights)]
    assert_mean(run_feed(feed, pairs, accumulate), pairs)


def test_state_dicts_and_bytes_agree():
    generator = torch.Generator().manual_seed(3)
    pairs = [(separate_model(generator, i / 5), float(i + 1)) for i in range(6)]
    from_states = fedavg(pairs)
    from_bytes = fedavg([(encode_safetensors(sd), w) for sd, w in pairs])
    for name, tensor in from_states.items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor.double(), from_bytes[name].double(), atol=2e-3, rtol=1e-6), name
        else:
            assert torch.equal(tensor, from_bytes[name]), name


def test_equal_float64_values_average_exactly_from_state_dicts():
    # the division on the last pass happens after the sums (not a multiplication by 1/total)
    models = [
        {
            "x": torch.full((3, 3), float(i), dtype=torch.float64),
            "y": torch.full((5,), float(i), dtype=torch.float64),
        }
        for i in range(10)
    ]
    result = fedavg([(m, 1.0) for m in models])
    assert torch.all(result["x"] == 4.5) and torch.all(result["y"] == 4.5)


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("divisor", [None, 3.0])
def test_fold_segments_matches_a_plain_loop(init, divisor):
    generator = torch.Generator().manual_seed(0)
    shapes = [(1000,), (7, 3), (), (2500,), (0,)]
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
    # a chunk of 256 cuts the large targets into many units, spread over several pieces and threads
    fold_segments(targets, sources, coefs, chunk=256, init=init, divisor=divisor)
    for got, want in zip(targets, expected, strict=True):
        assert torch.equal(got, want)  # the plain loop's values, bit for bit


@pytest.mark.parametrize("chunk", [None, 256, 1000, 4096])
def test_fold_segments_with_other_source_dtypes_matches_a_plain_loop(chunk):
    # float16 and float32 updates into float32 and float64 accumulators, as scaled_into then add_
    generator = torch.Generator().manual_seed(5)
    shapes = [(5000,), (40, 25), (), (3000,)]
    for acc_dtype, src_dtype in [(torch.float32, torch.float16), (torch.float64, torch.float32)]:
        sources = [[torch.randn(s, generator=generator).to(src_dtype) for s in shapes] for _ in range(4)]
        coefs = [1.0, 1.0714285714285714, 0.3, 7.0]
        targets = [torch.full(s, float("nan"), dtype=acc_dtype) for s in shapes]
        fold_segments(targets, sources, coefs, chunk=chunk, init=True, divisor=3.7)
        for index, got in enumerate(targets):
            want = sources[0][index].to(acc_dtype).mul_(coefs[0])
            for update, coef in zip(sources[1:], coefs[1:], strict=True):
                want.add_(update[index], alpha=coef)
            assert torch.equal(got, want.div_(3.7)), (acc_dtype, index)


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 2, 33, 40])
def test_every_feed_of_state_dicts_gives_the_same_bits(n, accumulate):
    # lists fold up to 32 per pass in the fold threads, generators and add() 2 per pass (small groups
    # update by update): the same operations per element in the same order, so the same bits
    generator = torch.Generator().manual_seed(n)
    pairs = [(separate_model(generator, i / 7), float(1 + (i * 37) % 11)) for i in range(n)]
    results = {
        feed: run_feed(feed, pairs, accumulate) for feed in FEEDS[:2] + ["add() one by one, state dicts"]
    }
    reference = results.pop("list of state dicts")
    for feed, result in results.items():
        for name, tensor in result.items():
            assert torch.equal(tensor, reference[name]), (feed, name)


def test_median_and_dp_take_state_dicts_of_small_shaped_tensors():
    generator = torch.Generator().manual_seed(1)
    models = [separate_model(generator, i) for i in range(3)]
    floats = [{k: v for k, v in m.items() if v.dtype == torch.float32} for m in models]
    median = aggregation.aggregate("median", None, [(m, 1.0) for m in floats])[0]
    median_bytes = aggregation.aggregate("median", None, [(encode_safetensors(m), 1.0) for m in floats])[0]
    for name, tensor in median.items():
        assert torch.equal(tensor, median_bytes[name]), name
        assert torch.equal(tensor, torch.stack([m[name] for m in floats]).median(dim=0).values), name
    global_state = {k: torch.zeros_like(v) for k, v in floats[0].items()}
    clipped = aggregation.aggregate("fedavg", global_state, [(m, 1.0) for m in floats], dp_clip_norm=1.0)[0]
    clipped_bytes = aggregation.aggregate(
        "fedavg", global_state, [(encode_safetensors(m), 1.0) for m in floats], dp_clip_norm=1.0
    )[0]
    for name, tensor in clipped.items():
        assert torch.allclose(tensor, clipped_bytes[name], atol=1e-6), name


@pytest.mark.parametrize("huge", [True, False])
def test_accumulators_on_huge_pages_hold_the_same_values(monkeypatch, huge):
    from flplatform.aggregation import buffers

    monkeypatch.setattr(buffers, "USE_HUGE_PAGES", huge)
    for numel, dtype in [(0, torch.float32), (10, torch.float64), ((3 << 20) + 7, torch.float32)]:
        buffer = buffers.new_buffer(numel, dtype)
        assert buffer.shape == (numel,) and buffer.dtype == dtype and buffer.is_contiguous()
        buffer.fill_(1.5)
        assert bool((buffer == 1.5).all())
    generator = torch.Generator().manual_seed(4)
    pairs = [
        ({"w": torch.randn(700_000, generator=generator), "b": torch.randn(9)}, float(i + 1))
        for i in range(3)
    ]
    monkeypatch.setattr(buffers, "USE_HUGE_PAGES", not huge)
    other = fedavg(pairs)
    monkeypatch.setattr(buffers, "USE_HUGE_PAGES", huge)
    result = fedavg(pairs)
    assert all(torch.equal(result[name], other[name]) for name in result)


@pytest.mark.parametrize("width", [1000, 40])  # folded through the fold threads / inline
@pytest.mark.parametrize("kind", ["state dicts", "bytearray"])
def test_a_generator_that_refills_one_model_in_place_gives_the_mean(width, kind):
    """What a simulation loop does: one model, trained in place for each client, its state dict (or
    one reused buffer) yielded each time. A plain loop folds each before drawing the next; so must
    fedavg: an update left pending for a pass of two would be read after its tensors changed."""
    model = torch.nn.Linear(width, width)
    buffer = bytearray()

    def updates():
        for value in (0.0, 1.0, 2.0):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(value)
            if kind == "state dicts":
                yield model.state_dict(), 1.0
            else:
                buffer[:] = encode_safetensors(model.state_dict())
                yield memoryview(buffer), 1.0

    result = fedavg(updates())
    for name, tensor in result.items():
        assert torch.equal(tensor, torch.ones_like(tensor)), name
