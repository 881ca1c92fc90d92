"""Unit tests of the training building blocks (no database)."""

from __future__ import annotations

import io
import random
import uuid

import pytest
import torch
from pydantic import ValidationError

from flplatform.errors import BadRequest
from flplatform.models import files as model_files
from flplatform.models.files import ModelFileError
from flplatform.routers.models import parse_input_shape
from flplatform.trainings import notifications as notify
from flplatform.trainings.aggregate import WeightedMean, aggregator_options, check_aggregator_options
from flplatform.trainings.phases import derangement
from flplatform.trainings.schemas import TrainingCreate, TrainingOptions
from tests.training.conftest import as_safetensors, scripted_bytes, tiny_net


def test_derangement_has_no_fixed_points_and_is_a_permutation():
    rng = random.Random(1)
    for n in (2, 3, 5, 8):
        items = [uuid.uuid4() for _ in range(n)]
        for _ in range(50):
            perm = derangement(items, rng)
            assert sorted(perm, key=str) == sorted(items, key=str)
            assert all(a != b for a, b in zip(perm, items, strict=True))
    single = [uuid.uuid4()]
    assert derangement(single, rng) == single  # nobody to swap with


def test_derangement_is_uniform_enough():
    rng = random.Random(7)
    items = [uuid.UUID(int=i) for i in range(3)]
    seen = {tuple(derangement(items, rng)) for _ in range(200)}
    assert len(seen) == 2  # the two derangements of 3 elements both occur


def test_parse_input_shape():
    assert parse_input_shape(["None", "1", "28", "28"]) == [None, 1, 28, 28]
    assert parse_input_shape(["null", "4"]) == [None, 4]
    assert parse_input_shape(["[null, 3]"]) == [None, 3]
    assert parse_input_shape(["None"]) is None
    assert parse_input_shape([]) is None
    with pytest.raises(BadRequest):
        parse_input_shape(["x"])
    with pytest.raises(BadRequest):
        parse_input_shape(["-1"])


def test_detect_format_and_refusals():
    state = tiny_net().state_dict()
    assert model_files.detect_format(scripted_bytes(tiny_net())) == model_files.TORCHSCRIPT
    assert model_files.detect_format(as_safetensors(state)) == model_files.SAFETENSORS
    buf = io.BytesIO()
    torch.save(state, buf)
    assert model_files.detect_format(buf.getvalue()) == model_files.TORCH_STATE_DICT
    decoded, fmt = model_files.decode_state_dict(buf.getvalue())
    assert fmt == model_files.TORCH_STATE_DICT and decoded.keys() == state.keys()
    module_pickle = io.BytesIO()
    torch.save(tiny_net(), module_pickle)
    with pytest.raises(ModelFileError, match="Accepted formats"):
        model_files.decode_state_dict(module_pickle.getvalue())
    for junk in (b"", b"\x80\x04junk-junk", b"PK\x03\x04broken-zip-bytes"):
        with pytest.raises(ModelFileError):
            model_files.decode_state_dict(junk)


def test_validate_state_dict_against_global_spec():
    state = {k: v.clone() for k, v in tiny_net().state_dict().items()}
    spec = model_files.spec_of(state)
    model_files.validate_state_dict(state, spec)
    with pytest.raises(ModelFileError, match="shape"):
        model_files.validate_state_dict({**state, "fc2.bias": torch.zeros(3)}, spec)
    with pytest.raises(ModelFileError, match="dtype"):
        model_files.validate_state_dict({**state, "fc2.bias": torch.zeros(2, dtype=torch.float64)}, spec)
    with pytest.raises(ModelFileError, match="NaN"):
        model_files.validate_state_dict({**state, "fc2.bias": torch.tensor([1.0, float("inf")])}, spec)
    with pytest.raises(ModelFileError, match="unexpected"):
        model_files.validate_state_dict({**state, "extra": torch.zeros(1)}, spec)


async def test_rebuild_torchscript_replaces_weights_and_keeps_the_architecture():
    template = scripted_bytes(tiny_net())
    new = {
        k: (torch.full_like(v, 0.5) if v.is_floating_point() else v)
        for k, v in tiny_net().state_dict().items()
    }
    rebuilt = torch.jit.load(
        io.BytesIO(await model_files.rebuild_torchscript(template, new))
    )  # in the sandbox
    assert torch.equal(rebuilt.state_dict()["fc1.weight"], torch.full((3, 4), 0.5))
    assert rebuilt(torch.randn(2, 4)).shape == (2, 2)


async def test_flat_tensor_decoding():
    vec = torch.arange(5, dtype=torch.float32)
    assert torch.equal(model_files.decode_flat_tensor(as_safetensors({"m": vec}), length=5, what="m"), vec)
    buf = io.BytesIO()
    torch.save(vec, buf)
    assert torch.equal(model_files.decode_flat_tensor(buf.getvalue(), length=5, what="m"), vec)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("moment", vec.clone())

        def forward(self) -> torch.Tensor:
            return self.moment

    holder = scripted_bytes(Holder())
    assert torch.equal(await model_files.decode_flat_tensor_async(holder, length=5, what="m"), vec)  # sandbox
    with pytest.raises(ModelFileError, match="sandbox"):
        model_files.decode_flat_tensor(holder, length=5, what="m")  # never loaded in-process
    with pytest.raises(ModelFileError, match="expected 6"):
        model_files.decode_flat_tensor(as_safetensors({"m": vec}), length=6, what="m")
    with pytest.raises(ModelFileError, match="exactly one"):
        model_files.decode_flat_tensor(as_safetensors({"a": vec, "b": vec.clone()}), length=5, what="m")
    with pytest.raises(ModelFileError, match="flat"):
        model_files.decode_flat_tensor(as_safetensors({"m": torch.zeros(2, 2)}), length=4, what="m")


def test_weighted_mean_of_moments():
    mean = WeightedMean()
    mean.add({"m": torch.tensor([0.0, 2.0])}, 1)
    mean.add({"m": torch.tensor([3.0, 2.0])}, 2)
    assert torch.allclose(mean.result()["m"], torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError):
        WeightedMean().result()


def test_options_schema():
    opts = TrainingOptions()
    assert opts.aggregator.value == "fedavg" and opts.uncertainty.N == 10
    with pytest.raises(ValidationError):
        TrainingOptions.model_validate({"nope": 1})
    with pytest.raises(ValidationError):
        TrainingOptions.model_validate({"min_quorum": 0})
    with pytest.raises(ValidationError):
        TrainingCreate.model_validate(
            {"model_id": str(uuid.uuid4()), "target_num_updates": 1, "aggregation_method": "FedDC"}
        )
    name, kwargs = aggregator_options(
        {"aggregator": "fedprox", "mu": 0.1, "dp": {"clip_norm": 1.0, "noise_multiplier": 0.5, "seed": 3}}
    )
    assert name == "fedprox" and kwargs == {
        "dp_clip_norm": 1.0,
        "dp_noise_multiplier": 0.5,
        "seed": 3,
        "proximal_mu": 0.1,
    }
    check_aggregator_options({"aggregator": "trimmed_mean", "aggregator_options": {"beta": 0.2}})
    with pytest.raises(ValueError):
        check_aggregator_options({"aggregator": "trimmed_mean", "aggregator_options": {"beta": 0.9}})


def test_notification_signature_roundtrip():
    user = uuid.uuid4()
    body = notify.payload("UPDATE_ROUND_START", uuid.uuid4(), {"round": 1}).encode()
    header = notify.signature(user, "1700000000", body)
    key = notify.notification_key(user)
    assert header.startswith("sha256=")
    assert notify.verify_signature(key, "1700000000", body, header)
    assert not notify.verify_signature(key, "1700000001", body, header)
    assert not notify.verify_signature(notify.notification_key(uuid.uuid4()), "1700000000", body, header)
