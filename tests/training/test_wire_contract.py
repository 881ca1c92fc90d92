"""The DLR wire contract, checked against the OpenAPI document: every route and method the DLR
clients call exists with the reference's success code, and the multipart/JSON field names and
enum strings are the reference's. (Routers only: the whole application's document is slow.)"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from flplatform.routers import groups, inference, models, trainings, users

# (path, method, success status) — issue 4, "Wire contract".
ROUTES = [
    ("/api/users/", "get", "200"),
    ("/api/users/", "post", "201"),
    ("/api/users/myself/", "get", "200"),
    ("/api/users/{user_id}/", "get", "200"),
    ("/api/users/groups/", "get", "200"),
    ("/api/users/trainings/", "get", "200"),
    ("/api/groups/", "get", "200"),
    ("/api/groups/", "post", "201"),
    ("/api/groups/{group_id}/", "get", "200"),
    ("/api/groups/{group_id}/", "put", "200"),
    ("/api/groups/{group_id}/", "delete", "204"),
    ("/api/models/", "get", "200"),
    ("/api/models/", "post", "201"),
    ("/api/models/{model_id}/", "get", "200"),
    ("/api/models/{model_id}/", "post", "201"),
    ("/api/models/{model_id}/", "delete", "200"),
    ("/api/models/{model_id}/metadata/", "get", "200"),
    ("/api/models/{model_id}/metrics/", "get", "200"),
    ("/api/models/{model_id}/metrics/", "post", "201"),
    ("/api/models/{model_id}/preprocessing/", "get", "200"),
    ("/api/models/{model_id}/preprocessing/", "post", "202"),
    ("/api/models/{model_id}/swag/", "post", "201"),
    ("/api/trainings/", "get", "200"),
    ("/api/trainings/", "post", "201"),
    ("/api/trainings/{training_id}/", "get", "200"),
    ("/api/trainings/{training_id}/", "delete", "200"),
    ("/api/trainings/{training_id}/clients/", "put", "202"),
    ("/api/trainings/{training_id}/clients/", "delete", "200"),
    ("/api/trainings/{training_id}/start/", "post", "202"),
    ("/api/trainings/{training_id}/models/", "get", "200"),
    ("/api/trainings/{training_id}/models/latest/", "get", "200"),
    ("/api/inference/", "post", "200"),
]


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    app = FastAPI()
    for router in (
        trainings.users_router,
        groups.users_groups_router,
        users.router,
        groups.groups_router,
        inference.router,
        models.router,
        trainings.router,
    ):
        app.include_router(router)
    return app.openapi()


def _schema(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _fields(spec: dict[str, Any], path: str, method: str, content: str) -> set[str]:
    contents = spec["paths"][path][method]["requestBody"]["content"]
    if content == "multipart/form-data" and content not in contents:  # file-less forms: either encoding works
        content = "application/x-www-form-urlencoded"
    body = contents[content]["schema"]
    return set(_schema(spec, body).get("properties", {}))


@pytest.mark.parametrize(("path", "method", "status"), ROUTES, ids=[f"{m} {p}" for p, m, _ in ROUTES])
def test_every_dlr_route_exists_with_the_reference_status(spec, path, method, status):
    assert path in spec["paths"], f"missing route {path}"
    operation = spec["paths"][path].get(method)
    assert operation is not None, f"missing {method.upper()} {path}"
    assert status in operation["responses"], (path, method, sorted(operation["responses"]))


def test_multipart_and_json_field_names_are_the_references(spec):
    assert {
        "name",
        "description",
        "type",
        "round",
        "input_shape",
        "model_file",
        "model_preprocessing_file",
        "models",
    } <= _fields(spec, "/api/models/", "post", "multipart/form-data")
    assert {"model_file", "round", "sample_size", "metric_names", "metric_values"} <= _fields(
        spec, "/api/models/{model_id}/", "post", "multipart/form-data"
    )
    assert {"metric_names", "metric_values"} <= _fields(
        spec, "/api/models/{model_id}/metrics/", "post", "multipart/form-data"
    )
    assert {"model_preprocessing_file"} <= _fields(
        spec, "/api/models/{model_id}/preprocessing/", "post", "multipart/form-data"
    )
    assert {"round", "sample_size", "first_moment_file", "second_moment_file"} <= _fields(
        spec, "/api/models/{model_id}/swag/", "post", "multipart/form-data"
    )
    assert {
        "model_id",
        "target_num_updates",
        "metric_names",
        "aggregation_method",
        "uncertainty_method",
        "options",
        "clients",
    } <= _fields(spec, "/api/trainings/", "post", "application/json")
    assert {"clients"} <= _fields(spec, "/api/trainings/{training_id}/clients/", "put", "application/json")
    for content in ("application/json", "multipart/form-data"):
        assert {"model_id", "model_input", "return_format"} <= _fields(
            spec, "/api/inference/", "post", content
        )
    user_fields = _fields(spec, "/api/users/", "post", "application/json")
    assert {
        "username",
        "password",
        "first_name",
        "last_name",
        "email",
        "message_endpoint",
        "actor",
        "client",
    } <= user_fields


def test_enum_strings_are_the_references(spec):
    schemas = spec["components"]["schemas"]

    def enum_of(name: str) -> set[str]:
        return set(schemas[name]["enum"])

    assert {"FedAvg", "FedDC", "FedProx"} <= enum_of("AggregationMethod")
    assert enum_of("UncertaintyMethod") == {"NONE", "ENSEMBLE", "MC_DROPOUT", "SWAG"}
    assert enum_of("TrainingState") == {"I", "O", "C", "E", "S"}
    upload = spec["paths"]["/api/models/"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(_schema(spec, upload)["properties"]["type"]["enum"]) == {"GLOBAL", "SWAG", "MEAN"}
    user = _schema(
        spec,
        spec["paths"]["/api/users/"]["post"]["responses"]["201"]["content"]["application/json"]["schema"],
    )
    assert "token" in user["properties"]  # creating a user returns its token, as the reference
