"""POST /api/inference/ and GET /api/models/{id}/metadata/ over HTTP, on both databases."""

from __future__ import annotations

import base64
import io
import json
import pickle

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from flplatform.inference.config import InferenceSettings
from flplatform.orm import UncertaintyMethod
from tests.inference.conftest import DropoutMLP, ImagePreprocessing, flat_parameters

X = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]]


def reference_output(module: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(torch.tensor(x, dtype=torch.float32))


async def infer(client, account, **body):
    return await client.post("/api/inference/", json=body, headers=account.headers)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def image_bytes(fmt: str, mode: str = "L") -> bytes:
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:4, :4] = 255  # top-left quadrant white
    image = Image.fromarray(pixels, mode="L").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# --------------------------------------------------------------------------- methods


async def test_none_returns_class_indices_or_on_request_scores_and_empty_uncertainty(
    client, alice, add_model
):
    torch.manual_seed(0)
    module = DropoutMLP()
    model_id = await add_model(alice, module, input_shape=[None, 4])
    expected = reference_output(module, X)
    # The reference's form: class indices in `inference` (the argmax, also in `prediction`).
    response = await infer(client, alice, model_id=str(model_id), model_input=X)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["inference"] == body["prediction"] == expected.argmax(1).tolist()
    assert body["return_scores"] is False
    assert body["uncertainty"] == {} and body["uncertainty_method"] == "NONE" and body["samples"] == 1
    # return_scores: the scores in `inference`, the argmax in `prediction`.
    body = (await infer(client, alice, model_id=str(model_id), model_input=X, return_scores=True)).json()
    assert torch.allclose(torch.tensor(body["inference"]), expected, atol=1e-6)
    assert body["prediction"] == expected.argmax(1).tolist() and body["return_scores"] is True
    assert body["uncertainty"] == {} and body["uncertainty_method"] == "NONE" and body["samples"] == 1
    # Repeated inference reuses the loaded module.
    cache = client._transport.app.state.inference_runtime.cache
    misses = cache.misses
    assert (await infer(client, alice, model_id=str(model_id), model_input=X)).status_code == 200
    assert cache.misses == misses and cache.hits >= 1


async def test_method_and_options_come_from_the_training_unless_given(
    client, alice, bob, add_model, add_training
):
    model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    await add_training(
        model_id,
        alice,
        [bob],
        method=UncertaintyMethod.MC_DROPOUT,
        options={"uncertainty": {"N": 7, "seed": 3}},
    )
    first = (await infer(client, bob, model_id=str(model_id), model_input=X)).json()
    assert (
        first["uncertainty_method"] == "MC_DROPOUT" and first["samples"] == 7 and first["dropout_layers"] == 1
    )
    assert all(v > 0 for row in first["uncertainty"]["variance"] for v in row)
    assert "mutual_info" not in first["uncertainty"]  # raw scores are not probabilities
    again = (await infer(client, bob, model_id=str(model_id), model_input=X)).json()
    assert again["inference"] == first["inference"]  # seeded by the training's options
    soft = (
        await infer(
            client, bob, model_id=str(model_id), model_input=X, options={"softmax": True, "N": 5, "seed": 1}
        )
    ).json()
    assert soft["samples"] == 5
    assert {"predictive_entropy", "expected_entropy", "mutual_info"} <= set(soft["uncertainty"])
    assert len(soft["uncertainty"]["mutual_info"]) == 2
    assert all(abs(sum(row) - 1) < 1e-5 for row in soft["inference"])
    plain = (
        await infer(client, bob, model_id=str(model_id), model_input=X, uncertainty_method="NONE")
    ).json()
    assert plain["uncertainty"] == {} and plain["samples"] == 1


async def test_ensemble_of_identical_and_of_different_members(client, alice, add_model):
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    id_a = await add_model(alice, a, input_shape=[None, 4])
    id_b = await add_model(alice, b, input_shape=[None, 4])
    same = await add_model(alice, kind="mean", members=[id_a], input_shape=[None, 4])
    twin = await add_model(alice, a, input_shape=[None, 4])
    identical = await add_model(alice, kind="mean", members=[id_a, twin], input_shape=[None, 4])
    different = await add_model(alice, kind="mean", members=[id_a, id_b], input_shape=[None, 4])

    body = (
        await infer(client, alice, model_id=str(identical), model_input=X, uncertainty_method="ENSEMBLE")
    ).json()
    assert body["samples"] == 2 and all(v == 0 for row in body["uncertainty"]["variance"] for v in row)

    body = (
        await infer(client, alice, model_id=str(different), model_input=X, uncertainty_method="ENSEMBLE")
    ).json()
    ya, yb = reference_output(a, X), reference_output(b, X)
    assert torch.allclose(torch.tensor(body["inference"]), (ya + yb) / 2, atol=1e-6)
    exact = ((ya - yb) / 2) ** 2  # population variance of two values
    assert torch.allclose(torch.tensor(body["uncertainty"]["variance"]), exact, atol=1e-6)

    # NONE on a mean model: its forward pass averages the members.
    body = (await infer(client, alice, model_id=str(different), model_input=X, return_scores=True)).json()
    assert body["uncertainty"] == {} and torch.allclose(
        torch.tensor(body["inference"]), (ya + yb) / 2, atol=1e-6
    )
    reference = (await infer(client, alice, model_id=str(different), model_input=X)).json()
    assert reference["inference"] == ((ya + yb) / 2).argmax(1).tolist()
    assert (
        await infer(client, alice, model_id=str(same), model_input=X, uncertainty_method="ENSEMBLE")
    ).json()["samples"] == 1
    wrong = await infer(client, alice, model_id=str(id_a), model_input=X, uncertainty_method="ENSEMBLE")
    assert wrong.status_code == 400 and wrong.json()["code"] == "method_not_applicable"


async def test_swag_draws_independent_samples_from_the_moments(client, alice, add_model, add_training):
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    mean = flat_parameters(module)
    model_id = await add_model(
        alice, module, kind="swag", moments=(mean, mean**2 + 0.04), input_shape=[None, 4]
    )
    await add_training(model_id, alice, method=UncertaintyMethod.SWAG, options={"uncertainty": {"N": 30}})
    body = (await infer(client, alice, model_id=str(model_id), model_input=X, options={"seed": 4})).json()
    assert body["uncertainty_method"] == "SWAG" and body["samples"] == 30
    variance = torch.tensor(body["uncertainty"]["variance"])
    # Each output is y = W x + b with independent N(0, 0.04) parameters: Var = 0.04 (|x|² + 1).
    x = torch.tensor(X)
    expected = 0.04 * ((x**2).sum(1, keepdim=True) + 1).expand(2, 3)
    assert torch.allclose(variance, expected, rtol=0.6)
    assert torch.allclose(torch.tensor(body["inference"]), reference_output(module, X), atol=0.5)

    empty = await add_model(alice, module, kind="swag", input_shape=[None, 4])
    missing = await infer(client, alice, model_id=str(empty), model_input=X, uncertainty_method="SWAG")
    assert missing.status_code == 409 and missing.json()["code"] == "swag_moments_missing"
    bad = await add_model(alice, module, kind="swag", moments=(torch.zeros(3), torch.ones(3)))
    wrong_length = await infer(client, alice, model_id=str(bad), model_input=X, uncertainty_method="SWAG")
    assert wrong_length.status_code == 409 and "parameters" in wrong_length.json()["detail"]
    plain = await add_model(alice, module)
    not_swag = await infer(client, alice, model_id=str(plain), model_input=X, uncertainty_method="SWAG")
    assert not_swag.status_code == 400


# --------------------------------------------------------------------------- input formats


async def test_every_input_format_gives_the_same_answer(client, alice, add_model):
    module = nn.Linear(4, 3)
    model_id = await add_model(alice, module, input_shape=[None, 4])
    expected = reference_output(module, X)
    array = np.array(X, dtype=np.float32)
    safetensors_bytes = save_safetensors({"model_input": torch.tensor(X)})
    other_name = save_safetensors({"x": torch.tensor(X, dtype=torch.float64)})
    big_endian = npy_bytes(array.astype(">f8"))

    json_inputs = [
        X,
        b64(safetensors_bytes),
        b64(other_name),
        b64(npy_bytes(array)),
        b64(big_endian),
        "data:application/octet-stream;base64," + b64(npy_bytes(array)),
        base64.urlsafe_b64encode(safetensors_bytes).decode(),
    ]
    for value in json_inputs:
        response = await infer(client, alice, model_id=str(model_id), model_input=value, return_scores=True)
        assert response.status_code == 200, response.text
        assert torch.allclose(torch.tensor(response.json()["inference"]), expected, atol=1e-5)

    multipart_inputs = [
        {"files": {"model_input": ("x.safetensors", safetensors_bytes)}},
        {"files": {"model_input": ("x.npy", npy_bytes(array))}},
        {"files": {"model_input": ("x.npy", npy_bytes(np.array(X, dtype=np.float16)))}},
        {"data": {"model_input": json.dumps(X)}},
        {"data": {"model_input": b64(npy_bytes(array))}},
    ]
    for extra in multipart_inputs:
        data = {
            "model_id": str(model_id),
            "return_format": "json",
            "return_scores": "true",
            **extra.pop("data", {}),
        }
        response = await client.post("/api/inference/", data=data, headers=alice.headers, **extra)
        assert response.status_code == 200, response.text
        assert torch.allclose(torch.tensor(response.json()["inference"]), expected, atol=1e-2)


async def test_images_run_through_the_preprocessing_module(client, alice, add_model):
    module = nn.Linear(4, 2)
    model_id = await add_model(alice, module, input_shape=[None, 4], preprocessing=ImagePreprocessing())
    expected = reference_output(module, [[1.0, 0.0, 0.0, 0.0]])
    for fmt, mode in (("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB")):
        data = image_bytes(fmt, mode)
        response = await client.post(
            "/api/inference/",
            data={"model_id": str(model_id), "return_format": "json", "return_scores": "true"},
            files={"model_input": (f"x.{fmt.lower()}", data)},
            headers=alice.headers,
        )
        assert response.status_code == 200, response.text
        assert torch.allclose(torch.tensor(response.json()["inference"]), expected, atol=0.05)
    base64_png = await infer(client, alice, model_id=str(model_id), model_input=b64(image_bytes("PNG")))
    assert base64_png.status_code == 200
    plain = await add_model(alice, module, input_shape=[None, 4])
    refused = await infer(client, alice, model_id=str(plain), model_input=b64(image_bytes("PNG")))
    assert refused.status_code == 400 and refused.json()["code"] == "preprocessing_required"


async def test_binary_responses_are_safetensors(client, alice, add_model):
    module = DropoutMLP()
    model_id = await add_model(alice, module, input_shape=[None, 4])
    response = await client.post(
        "/api/inference/",
        data={
            "model_id": str(model_id),
            "uncertainty_method": "MC_DROPOUT",
            "options": '{"N": 4, "softmax": true}',
        },
        files={"model_input": ("x.npy", npy_bytes(np.array(X, dtype=np.float32)))},
        headers=alice.headers,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    tensors = load_safetensors(response.content)
    assert set(tensors) == {
        "inference", "prediction", "uncertainty.variance", "uncertainty.std",
        "uncertainty.predictive_entropy", "uncertainty.expected_entropy", "uncertainty.mutual_info",
    }  # fmt: skip
    assert tensors["inference"].shape == (2, 3) and tensors["prediction"].dtype == torch.int64
    json_body = await infer(
        client, alice, model_id=str(model_id), model_input=X, return_format="binary", return_scores=True
    )
    assert load_safetensors(json_body.content)["inference"].shape == (2, 3)


async def test_non_finite_outputs_are_null_in_json(client, alice, add_model):
    class Log(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x)

    model_id = await add_model(alice, Log())
    body = (
        await infer(client, alice, model_id=str(model_id), model_input=[[-1.0, 1.0]], return_scores=True)
    ).json()
    assert body["inference"] == [[None, 0.0]]


# --------------------------------------------------------------------------- refusals


async def test_malformed_inputs_get_clear_4xx(client, app, alice, add_model):
    app.state.inference_settings = InferenceSettings(max_batch=4, max_samples=50)
    model_id = str(await add_model(alice, nn.Linear(4, 3), input_shape=[None, 4]))
    tensor = torch.tensor(X)
    torch_save = io.BytesIO()
    torch.save(tensor, torch_save)
    object_npy = io.BytesIO()
    np.save(object_npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    cases = [
        ([[1.0, 2.0, 3.0]], 400, "input_shape_mismatch"),  # wrong width
        ([1.0, 2.0, 3.0, 4.0], 400, "input_shape_mismatch"),  # wrong rank
        ([[[1.0, 2.0, 3.0, 4.0]]], 400, "input_shape_mismatch"),  # rank 3
        ([[0.0] * 4] * 5, 413, "batch_too_large"),
        ([[1.0, 2.0], [3.0]], 400, "invalid_model_input"),  # ragged
        ([["a", "b", "c", "d"]], 400, "invalid_model_input"),
        ("/etc/passwd", 400, "invalid_model_input"),  # strings are never paths
        (b64(b"\x00\x01garbage bytes that are nothing"), 400, "invalid_model_input"),
        (b64(save_safetensors({"x": tensor})[:-5]), 400, "invalid_model_input"),  # truncated
        (b64(pickle.dumps(tensor)), 400, "invalid_model_input"),
        (b64(pickle.dumps([[1.0, 2.0, 3.0, 4.0]], protocol=2)), 400, "invalid_model_input"),
        (b64(torch_save.getvalue()), 400, "invalid_model_input"),
        (b64(object_npy.getvalue()), 400, "invalid_model_input"),
        (b64(npy_bytes(np.array(X, dtype=np.float32))[:-3]), 400, "invalid_model_input"),
        (b64(npy_bytes(np.array([["a", "b", "c", "d"]]))), 400, "invalid_model_input"),
        (b64(b"\x89PNG\r\n\x1a\n" + b"broken"), 400, "invalid_model_input"),
        ([[float("1e39")] * 4], 400, "invalid_model_input"),  # inf in float32
    ]
    for model_input, status, code in cases:
        response = await infer(client, alice, model_id=model_id, model_input=model_input)
        assert (response.status_code, response.json()["code"]) == (status, code), (model_input, response.text)
        assert response.json()["detail"]
    pickled = await client.post(
        "/api/inference/",
        data={"model_id": model_id},
        files={"model_input": ("x.pt", pickle.dumps(tensor))},
        headers=alice.headers,
    )
    assert pickled.status_code == 400 and "pickle" in pickled.json()["detail"]

    too_many = await infer(
        client, alice, model_id=model_id, model_input=X, uncertainty_method="MC_DROPOUT", options={"N": 51}
    )
    assert too_many.status_code == 422
    assert (await infer(client, alice, model_id=model_id, model_input=X, options={"N": 1})).status_code == 422
    assert (await infer(client, alice, model_id=model_id, model_input=X, colour="red")).status_code == 422
    assert (await infer(client, alice, model_id=model_id)).status_code == 422
    assert (await infer(client, alice, model_id="not-a-uuid", model_input=X)).status_code == 422
    assert (await infer(client, alice, model_id=model_id, model_input={"a": 1})).status_code == 422
    malformed = await client.post(
        "/api/inference/", content=b"{not json", headers={**alice.headers, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 400 and malformed.json()["code"] == "malformed_json"
    deep = await client.post(
        "/api/inference/",
        content=b'{"model_id": "%s", "model_input": ' % model_id.encode()
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
        headers={**alice.headers, "Content-Type": "application/json"},
    )
    assert deep.status_code == 400
    text = await client.post(
        "/api/inference/", content=b"hello", headers={**alice.headers, "Content-Type": "text/plain"}
    )
    assert text.status_code == 415
    no_input = await client.post("/api/inference/", data={"model_id": model_id}, headers=alice.headers)
    assert no_input.status_code == 400 and no_input.json()["code"] == "missing_model_input"


async def test_models_that_cannot_run_are_conflicts(client, alice, add_model):
    corrupt = await add_model(alice, weights=b"PK\x03\x04 not a torchscript archive")
    response = await infer(client, alice, model_id=str(corrupt), model_input=X)
    assert response.status_code == 409 and response.json()["code"] == "model_not_runnable"
    weights_only = await add_model(
        alice, weights=save_safetensors({"w": torch.zeros(2)}), weights_format="safetensors"
    )
    assert (await infer(client, alice, model_id=str(weights_only), model_input=X)).status_code == 409
    empty_mean = await add_model(alice, kind="mean")
    assert (await infer(client, alice, model_id=str(empty_mean), model_input=X)).status_code == 409

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    pair = await add_model(alice, Pair())
    failing = await infer(client, alice, model_id=str(pair), model_input=X)
    assert failing.status_code == 400 and failing.json()["code"] == "inference_failed"


async def test_only_owner_training_actor_and_participants_may_query(
    client, make_user, alice, bob, add_model, add_training
):
    carol = await make_user("carol")
    module = nn.Linear(4, 3)
    model_id = await add_model(alice, module, input_shape=[None, 4])
    assert (await infer(client, bob, model_id=str(model_id), model_input=X)).status_code == 404
    await add_training(model_id, carol, [bob])
    for account in (alice, bob, carol):
        assert (await infer(client, account, model_id=str(model_id), model_input=X)).status_code == 200
    dave = await make_user("dave")
    assert (await infer(client, dave, model_id=str(model_id), model_input=X)).status_code == 404
    assert (await client.get(f"/api/models/{model_id}/metadata/", headers=dave.headers)).status_code == 404
    unknown = await infer(client, alice, model_id="00000000-0000-0000-0000-000000000001", model_input=X)
    assert unknown.status_code == 404
    anonymous = await client.post("/api/inference/", json={"model_id": str(model_id), "model_input": X})
    assert anonymous.status_code == 401


# --------------------------------------------------------------------------- metadata and docs


async def test_metadata_reports_counts_layers_and_shapes(client, alice, add_model):
    module = DropoutMLP()
    model_id = await add_model(alice, module, input_shape=[None, 4], preprocessing=ImagePreprocessing())
    response = await client.get(f"/api/models/{model_id}/metadata/", headers=alice.headers)
    assert response.status_code == 200, response.text
    meta = response.json()
    assert meta["type"] == "GLOBAL" and meta["has_preprocessing"] is True and meta["input_shape"] == [None, 4]
    assert meta["total_params"] == 4 * 16 + 16 + 16 * 3 + 3 == meta["trainable_params"]
    assert meta["output_shape"] == [1, 3]
    layers = {layer["name"]: layer for layer in meta["layers"]}
    assert layers["fc1"]["class_name"] == "Linear" and layers["fc1"]["num_params"] == 80
    assert layers["drop"]["class_name"] == "Dropout" and layers["drop"]["is_leaf"]
    assert meta["stats"]["total_params"] == meta["total_params"] and meta["stats"]["summary_list"]

    other = await add_model(alice, nn.Linear(4, 2), input_shape=[None, 4])
    mean_id = await add_model(alice, kind="mean", members=[model_id, other], input_shape=[None, 4])
    mean = (await client.get(f"/api/models/{mean_id}/metadata/", headers=alice.headers)).json()
    assert mean["type"] == "MEAN" and set(mean["members"]) == {str(model_id), str(other)}
    assert mean["total_params"] == meta["total_params"] + 10

    swag_module = nn.Linear(4, 2)
    mean_vector = flat_parameters(swag_module)
    swag_id = await add_model(alice, swag_module, kind="swag", moments=(mean_vector, mean_vector**2))
    swag = (await client.get(f"/api/models/{swag_id}/metadata/", headers=alice.headers)).json()
    assert swag["type"] == "SWAG" and swag["has_swag_moments"] is True and swag["output_shape"] is None

    weights_only = await add_model(
        alice, weights=save_safetensors({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}),
        weights_format="safetensors",
    )  # fmt: skip
    flat = (await client.get(f"/api/models/{weights_only}/metadata/", headers=alice.headers)).json()
    assert flat["total_params"] == 15 and {layer["name"] for layer in flat["layers"]} == {
        "fc.weight",
        "fc.bias",
    }


def test_openapi_documents_both_bodies_and_the_formulas():
    # The router alone (the whole application's document takes seconds to build).
    from fastapi import FastAPI

    from flplatform.routers.inference import router

    application = FastAPI()
    application.include_router(router)
    spec = application.openapi()
    operation = spec["paths"]["/api/inference/"]["post"]
    assert operation["tags"] == ["inference"] and operation["summary"]
    assert {"application/json", "multipart/form-data"} <= set(operation["requestBody"]["content"])
    assert "$defs" not in json.dumps(operation["requestBody"])
    assert (
        "mutual_info" in operation["description"]
        and "clamp(E[θ²] − E[θ]², min_var)" in operation["description"]
    )
    assert "application/octet-stream" in operation["responses"]["200"]["content"]
    assert "/api/models/{model_id}/metadata/" in spec["paths"]


async def test_round_runs_the_weights_of_the_models_history(client, app, alice, add_model):
    from flplatform.blobs import open_store
    from flplatform.orm import GlobalModel, GlobalModelRound
    from tests.inference.conftest import torchscript_bytes

    old, new = nn.Linear(4, 3), nn.Linear(4, 3)
    model_id = await add_model(alice, new, input_shape=[None, 4])
    async with app.state.sessionmaker() as session:
        model = await session.get(GlobalModel, model_id)
        model.round = 2
        for round_, module in ((0, old), (2, new)):
            data = await open_store(app.state.settings).put(torchscript_bytes(module))
            session.add(GlobalModelRound(model_id=model_id, round=round_, weights_digest=data.digest,
                                         weights_format="torchscript", weights_size=data.size))  # fmt: skip
        await session.commit()
    for round_, module in ((0, old), (1, old), (2, new), (None, new)):
        body = (
            await infer(
                client, alice, model_id=str(model_id), model_input=X, round=round_, return_scores=True
            )
        ).json()
        assert torch.allclose(torch.tensor(body["inference"]), reference_output(module, X), atol=1e-6), round_
        assert body["round"] == (2 if round_ is None else round_)
    assert (await infer(client, alice, model_id=str(model_id), model_input=X, round=3)).status_code == 404
    mean_id = await add_model(alice, kind="mean", members=[model_id])
    assert (await infer(client, alice, model_id=str(mean_id), model_input=X, round=1)).status_code == 400
