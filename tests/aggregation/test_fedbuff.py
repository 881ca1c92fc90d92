"""FedBuff's fold (aggregation/fedbuff.py): staleness weights, the update rule against each
update's own base version, and its reduction to FedAvg when nothing is stale."""

from __future__ import annotations

import math

import pytest
import torch

from flplatform.aggregation import (
    AggregatorOptionsError,
    FedBuff,
    StalenessRule,
    UpdateValidationError,
    ZeroTotalWeightError,
    encode_safetensors,
    fedavg,
    parse_fedbuff_options,
)


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
        "steps": torch.tensor(10 + seed, dtype=torch.int64),
    }


def test_staleness_weights():
    poly = StalenessRule()  # FedBuff's default
    assert [poly(s) for s in (0, 3, 8)] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert poly(5) == pytest.approx(1 / math.sqrt(6))
    assert StalenessRule("polynomial", exponent=1.0)(4) == pytest.approx(0.2)
    assert StalenessRule("constant")(1000) == 1.0
    hinge = StalenessRule("hinge", hinge_a=2.0, hinge_b=3)
    assert [hinge(s) for s in (0, 3)] == [1.0, 1.0]
    assert hinge(5) == pytest.approx(1 / (2 * 2 + 1))
    with pytest.raises(AggregatorOptionsError):
        StalenessRule("exponential")
    with pytest.raises(UpdateValidationError):
        poly(-1)


def test_fresh_updates_with_unit_server_lr_are_fedavg():
    current = _model(0)
    updates = [(_model(i), n) for i, n in ((1, 30), (2, 10), (3, 5))]
    fold = FedBuff()
    fold.begin(current)
    for state, n in updates:
        assert fold.add(encode_safetensors(state), current, staleness=0, sample_size=n) == 1.0
    got = fold.finish()
    want = fedavg([(s, float(n)) for s, n in updates], accumulate_dtype="float64")
    for key in current:
        assert got[key].dtype == current[key].dtype
        assert torch.allclose(got[key].double(), want[key].double(), atol=1e-6), key


def test_stale_update_moves_by_its_discounted_delta_from_its_own_base():
    old, current = _model(0), _model(1)
    fresh, stale = _model(2), _model(3)
    fold = FedBuff(server_lr=0.5)
    fold.begin(current)
    fold.add(fresh, current, staleness=0, sample_size=2)
    assert fold.add(stale, old, staleness=3, sample_size=6) == 0.5
    got = fold.finish()
    for key in ("w", "b"):
        delta = 2 * (fresh[key].double() - current[key].double()) + 0.5 * 6 * (
            stale[key].double() - old[key].double()
        )
        want = current[key].double() + 0.5 * delta / 8
        assert torch.allclose(got[key].double(), want, atol=1e-6), key
    steps = (
        current["steps"]
        + 0.5 * (2 * (fresh["steps"] - current["steps"]) + 3 * (stale["steps"] - old["steps"])) / 8
    )
    assert got["steps"].item() == round(float(steps))
    assert fold.weights == [(0, 1.0), (3, 0.5)]


def test_unweighted_is_the_papers_mean_over_k():
    current = _model(0)
    a, b = _model(1), _model(2)
    fold = FedBuff.from_options({"weight_by_samples": False, "staleness": "constant", "server_lr": 2.0})
    fold.begin(current)
    fold.add(a, current, staleness=1, sample_size=100)
    fold.add(b, current, staleness=7, sample_size=1)
    got = fold.finish()
    want = current["w"] + 2.0 * ((a["w"] - current["w"]) + (b["w"] - current["w"])) / 2
    assert torch.allclose(got["w"], want, atol=1e-5)


def test_refusals():
    current = _model(0)
    fold = FedBuff()
    fold.begin(current)
    with pytest.raises(UpdateValidationError):
        fold.add({"w": current["w"]}, current, staleness=0, sample_size=1)
    with pytest.raises(UpdateValidationError):
        fold.add({**current, "w": current["w"].double()}, current, staleness=0, sample_size=1)
    fold.add(current, current, staleness=0, sample_size=0)
    with pytest.raises(ZeroTotalWeightError):
        fold.finish()
    with pytest.raises(AggregatorOptionsError):
        parse_fedbuff_options({"buffer": 3})
    with pytest.raises(AggregatorOptionsError):
        parse_fedbuff_options({"buffer_size": 0})
    with pytest.raises(AggregatorOptionsError):
        parse_fedbuff_options({"weight_by_samples": 1})
    assert parse_fedbuff_options(None)["buffer_size"] == 2


def test_pieces_and_zero_copy_inputs_give_the_whole_tensor_rule_bitwise(monkeypatch):
    """FedBuff's float64 arithmetic runs in pieces (bounded temporaries) and reads updates as
    zero-copy views of their bytes (a memory-mapped blob): the very bits of ``x + η Σ α n (u - b)
    / Σ n`` computed on whole tensors, for state dicts, bytes and memoryviews alike."""
    from flplatform.aggregation import fedbuff

    monkeypatch.setattr(fedbuff, "PIECE", 7)  # pieces cut inside every tensor
    current, base = _model(0), _model(9)
    updates = [(_model(i), 10 + i, i % 3) for i in range(1, 5)]
    rule = StalenessRule()
    acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in current.items()}
    for state, n, staleness in updates:
        against = current if staleness == 0 else base
        for key in acc:
            delta = state[key].to(torch.float64) - against[key].to(torch.float64)
            acc[key].add_(delta, alpha=rule(staleness) * n)
    total = sum(n for _, n, _ in updates)
    want = {}
    for key, ref in current.items():
        value = ref.to(torch.float64) + acc[key] * (0.5 / total)
        want[key] = value.to(ref.dtype) if ref.is_floating_point() else torch.round(value).to(ref.dtype)
    for kind in (dict, encode_safetensors, lambda s: memoryview(encode_safetensors(s))):
        fold = FedBuff(server_lr=0.5)
        fold.begin(current)
        for state, n, staleness in updates:
            fold.add(kind(state), current if staleness == 0 else base, staleness=staleness, sample_size=n)
        got = fold.finish()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (kind, key)
