"""The two shapes of an inference answer, against values computed by hand (issue 22).

The reference's form (no ``return_scores``, as a DLR client sends it) puts the class indices
(argmax over dimension 1) in ``inference`` for NONE and the mean outputs for every other method;
``return_scores=true`` puts the mean outputs (scores) in ``inference`` for NONE too. Both keep
``prediction``. JSON and safetensors answers, the synchronous route and the jobs, on both
databases.

Models are linear layers with fixed weights, so every number below is exact in float32:

    A(x) = [x0, x1 + 0.5, x0 + x1 - 1]          B(x) = [0, x0 + x1 + 1, x1]

    X = [[1, 2], [3, -1]]
    A(X) = [[1, 2.5, 2], [3, -0.5, 1]]          argmax: [1, 0]
    B(X) = [[0, 4, 2],   [0, 3, -1]]
    mean = (A + B) / 2 = [[0.5, 3.25, 2], [1.5, 1.25, 0]]            argmax: [1, 0]
    ENSEMBLE variance (exact, over the two members) = ((A − B) / 2)²
         = [[0.25, 0.5625, 0], [2.25, 3.0625, 1]],  std = [[0.5, 0.75, 0], [1.5, 1.75, 1]]
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from torch import nn

from flplatform.inference.jobs import query_from_payload
from flplatform.orm import UncertaintyMethod
from tests.inference.conftest import flat_parameters

X = [[1.0, 2.0], [3.0, -1.0]]
A_OUT = [[1.0, 2.5, 2.0], [3.0, -0.5, 1.0]]
A_CLASSES = [1, 0]
MEAN_OUT = [[0.5, 3.25, 2.0], [1.5, 1.25, 0.0]]
MEAN_CLASSES = [1, 0]
VARIANCE = [[0.25, 0.5625, 0.0], [2.25, 3.0625, 1.0]]
STD = [[0.5, 0.75, 0.0], [1.5, 1.75, 1.0]]


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def model_a() -> nn.Linear:
    return linear([[1, 0], [0, 1], [1, 1]], [0, 0.5, -1])


def model_b() -> nn.Linear:
    return linear([[0, 0], [1, 1], [0, 1]], [0, 1, 0])


def test_the_hand_computed_values_are_the_models_outputs():
    """The docstring's arithmetic, checked once in eager PyTorch."""
    x = torch.tensor(X)
    with torch.no_grad():
        a, b = model_a()(x), model_b()(x)
    assert a.tolist() == A_OUT and a.argmax(1).tolist() == A_CLASSES
    assert ((a + b) / 2).tolist() == MEAN_OUT
    assert torch.stack([a, b]).var(0, correction=0).tolist() == VARIANCE


async def infer(client: Any, account: Any, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/inference/", json=body, headers=account.headers)
    assert response.status_code == 200, response.text
    return response.json()


async def infer_binary(
    client: Any, account: Any, **fields: Any
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Multipart (whose default answer is binary): the safetensors tensors and metadata."""
    data = {key: value if isinstance(value, str) else json.dumps(value) for key, value in fields.items()}
    response = await client.post("/api/inference/", data=data, headers=account.headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    return load_safetensors(response.content), _metadata(response.content)


def _metadata(data: bytes) -> dict[str, str]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as file:
        file.write(data)
        file.flush()
        with safe_open(file.name, framework="pt") as opened:
            return opened.metadata()


@pytest.fixture
async def models(alice: Any, add_model: Any) -> dict[str, str]:
    a = await add_model(alice, model_a(), input_shape=[None, 2])
    b = await add_model(alice, model_b(), input_shape=[None, 2])
    mean = await add_model(alice, kind="mean", members=[a, b], input_shape=[None, 2])
    return {"a": str(a), "b": str(b), "mean": str(mean)}


# --------------------------------------------------------------------------- NONE


async def test_none_in_the_reference_form_answers_class_indices(client, alice, models):
    body = await infer(client, alice, model_id=models["a"], model_input=X)
    assert body["inference"] == A_CLASSES and body["prediction"] == A_CLASSES
    assert body["uncertainty"] == {} and body["return_scores"] is False
    assert body["uncertainty_method"] == "NONE" and body["samples"] == 1
    # As the DLR client sends it, with return_format spelled out.
    assert (await infer(client, alice, model_id=models["a"], model_input=X, return_format="json")) == body
    # A mean model's NONE pass averages its members, then takes the argmax.
    assert (await infer(client, alice, model_id=models["mean"], model_input=X))["inference"] == MEAN_CLASSES


async def test_none_with_return_scores_answers_the_outputs(client, alice, models):
    body = await infer(client, alice, model_id=models["a"], model_input=X, return_scores=True)
    assert body["inference"] == A_OUT and body["prediction"] == A_CLASSES
    assert body["uncertainty"] == {} and body["return_scores"] is True
    mean = await infer(client, alice, model_id=models["mean"], model_input=X, return_scores=True)
    assert mean["inference"] == MEAN_OUT and mean["prediction"] == MEAN_CLASSES
    explicit = await infer(client, alice, model_id=models["a"], model_input=X, return_scores=False)
    assert explicit["inference"] == A_CLASSES


async def test_none_binary_in_both_shapes(client, alice, models):
    tensors, metadata = await infer_binary(client, alice, model_id=models["a"], model_input=X)
    assert set(tensors) == {"inference", "prediction"}
    assert tensors["inference"].dtype == torch.int64 and tensors["inference"].tolist() == A_CLASSES
    assert tensors["prediction"].tolist() == A_CLASSES
    assert metadata["return_scores"] == "false" and metadata["uncertainty_method"] == "NONE"

    tensors, metadata = await infer_binary(
        client, alice, model_id=models["a"], model_input=X, return_scores="true"
    )
    assert tensors["inference"].dtype == torch.float32 and tensors["inference"].tolist() == A_OUT
    assert tensors["prediction"].tolist() == A_CLASSES and metadata["return_scores"] == "true"

    # A JSON body asking for binary, reference form.
    response = await client.post(
        "/api/inference/",
        json={"model_id": models["a"], "model_input": X, "return_format": "binary"},
        headers=alice.headers,
    )
    assert (
        response.status_code == 200 and load_safetensors(response.content)["inference"].tolist() == A_CLASSES
    )


async def test_outputs_without_a_class_dimension_are_returned_as_they_are(client, alice, add_model):
    class RowSum(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1)

    model_id = str(await add_model(alice, RowSum(), input_shape=[None, 2]))
    for return_scores in (False, True):
        body = await infer(client, alice, model_id=model_id, model_input=X, return_scores=return_scores)
        assert body["inference"] == [3.0, 2.0] and body["prediction"] is None


# --------------------------------------------------------------------------- ENSEMBLE (and SWAG)


async def test_ensemble_answers_the_mean_outputs_in_both_shapes(client, alice, models):
    reference = await infer(
        client, alice, model_id=models["mean"], model_input=X, uncertainty_method="ENSEMBLE"
    )
    assert reference["inference"] == MEAN_OUT and reference["prediction"] == MEAN_CLASSES
    assert reference["uncertainty"] == {
        "variance": VARIANCE,
        "std": STD,
    }  # scores, not probabilities: no entropies
    assert reference["samples"] == 2 and reference["return_scores"] is False
    scores = await infer(
        client,
        alice,
        model_id=models["mean"],
        model_input=X,
        uncertainty_method="ENSEMBLE",
        return_scores=True,
    )
    assert scores == {**reference, "return_scores": True}


async def test_ensemble_binary_in_both_shapes(client, alice, models):
    for flag in ("false", "true"):
        tensors, metadata = await infer_binary(
            client,
            alice,
            model_id=models["mean"],
            model_input=X,
            uncertainty_method="ENSEMBLE",
            return_scores=flag,
        )
        assert set(tensors) == {"inference", "prediction", "uncertainty.variance", "uncertainty.std"}
        assert tensors["inference"].tolist() == MEAN_OUT and tensors["prediction"].tolist() == MEAN_CLASSES
        assert (
            tensors["uncertainty.variance"].tolist() == VARIANCE
            and tensors["uncertainty.std"].tolist() == STD
        )
        assert metadata["uncertainty_method"] == "ENSEMBLE" and metadata["samples"] == "2"
        assert metadata["return_scores"] == flag


async def test_ensemble_is_the_method_of_the_training_in_the_reference_form(
    client, alice, models, add_training
):
    """What a DLR client does: no method in the request; the mean model's training says ENSEMBLE."""
    await add_training(uuid.UUID(models["mean"]), alice, method=UncertaintyMethod.ENSEMBLE)
    body = await infer(client, alice, model_id=models["mean"], model_input=X)
    assert body["uncertainty_method"] == "ENSEMBLE" and body["inference"] == MEAN_OUT
    assert body["uncertainty"]["variance"] == VARIANCE


async def test_swag_answers_the_mean_outputs_in_both_shapes(client, alice, add_model):
    # Moments with zero variance (clamped to min_var): every draw is model A, to within 1e-15.
    module = model_a()
    mean = flat_parameters(module)
    model_id = str(
        await add_model(alice, module, kind="swag", moments=(mean, mean**2), input_shape=[None, 2])
    )
    for return_scores in (False, True):
        body = await infer(
            client,
            alice,
            model_id=model_id,
            model_input=X,
            uncertainty_method="SWAG",
            options={"N": 3, "seed": 0},
            return_scores=return_scores,
        )
        assert torch.allclose(torch.tensor(body["inference"]), torch.tensor(A_OUT), atol=1e-6)
        assert body["prediction"] == A_CLASSES and body["samples"] == 3
        assert torch.allclose(torch.tensor(body["uncertainty"]["std"]), torch.zeros(2, 3), atol=1e-6)


# --------------------------------------------------------------------------- form values, jobs


async def test_return_scores_must_be_a_boolean(client, alice, models):
    bad = await client.post(
        "/api/inference/",
        json={"model_id": models["a"], "model_input": X, "return_scores": "perhaps"},
        headers=alice.headers,
    )
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
    form = await client.post(
        "/api/inference/",
        data={"model_id": models["a"], "model_input": json.dumps(X), "return_scores": "perhaps"},
        headers=alice.headers,
    )
    assert form.status_code == 422


async def _job_result(client: Any, account: Any, body: dict[str, Any]) -> dict[str, Any]:
    accepted = await client.post("/api/inference/jobs/", json=body, headers=account.headers)
    assert accepted.status_code == 202, accepted.text
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        job = (await client.get(accepted.json()["url"], headers=account.headers)).json()
        if job["status"] in ("done", "error"):
            assert job["status"] == "done", job
            return job["result"]
        assert loop.time() < deadline, job
        await asyncio.sleep(0.05)


async def test_jobs_answer_the_shape_the_request_asked_for(client, alice, models):
    reference = await _job_result(client, alice, {"model_id": models["a"], "model_input": X})
    assert reference == await infer(client, alice, model_id=models["a"], model_input=X)
    assert reference["inference"] == A_CLASSES
    scores = await _job_result(
        client, alice, {"model_id": models["a"], "model_input": X, "return_scores": True}
    )
    assert (
        scores["inference"] == A_OUT and scores["prediction"] == A_CLASSES and scores["return_scores"] is True
    )
    ensemble = await _job_result(
        client, alice, {"model_id": models["mean"], "model_input": X, "uncertainty_method": "ENSEMBLE"}
    )
    assert ensemble["inference"] == MEAN_OUT and ensemble["uncertainty"]["std"] == STD


def test_a_job_queued_before_return_scores_existed_keeps_the_scores_it_was_asked_for():
    legacy = {
        "model_id": "5f0c6f3e-5b7d-4e56-9a55-0c8d3c2f1a10",
        "model_input": X,
        "uncertainty_method": None,
        "options": None,
        "round": None,
    }
    assert query_from_payload(legacy).return_scores is True
    assert query_from_payload({**legacy, "return_scores": False}).return_scores is False


# --------------------------------------------------------------------------- Swagger


def test_openapi_shows_both_shapes_with_examples():
    from fastapi import FastAPI

    from flplatform.routers.inference import router

    application = FastAPI()
    application.include_router(router)
    spec = application.openapi()
    for path in ("/api/inference/", "/api/inference/jobs/"):
        operation = spec["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        examples = content["application/json"]["examples"]
        assert "return_scores" not in examples["reference"]["value"]
        assert examples["scores"]["value"]["return_scores"] is True
        assert "return_scores" in content["application/json"]["schema"]["properties"]
        assert "return_scores" in content["multipart/form-data"]["schema"]["properties"]
        assert "return_scores" in operation["description"]
    answers = spec["paths"]["/api/inference/"]["post"]["responses"]["200"]["content"]["application/json"][
        "examples"
    ]
    assert answers["reference"]["value"]["inference"] == answers["reference"]["value"]["prediction"]
    assert isinstance(answers["scores"]["value"]["inference"][0], list)
    assert "class indices" in spec["paths"]["/api/inference/"]["post"]["description"]
