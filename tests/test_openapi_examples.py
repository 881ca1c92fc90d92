"""The OpenAPI document leads into success: every example request body validates against its own
schema (and the server's model), every error response shows the project's error shape with an
example of its own status, and the model upload form's examples are accepted as they are."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import torch
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import BaseModel, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from flplatform.app import create_app
from flplatform.openapi import ERROR_EXAMPLES
from flplatform.settings import Settings

SPEC_URI = "urn:flplatform-openapi"


@pytest.fixture(scope="module")
def application() -> Any:
    return create_app(Settings(database_url="sqlite+aiosqlite:///unused.db"))


@pytest.fixture(scope="module")
def spec(application: Any) -> dict[str, Any]:
    return application.openapi()


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = spec
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def json_body_examples(spec: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """(path, method, where, example) for every example of every JSON request body."""
    found = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if media is None:
                continue
            if "example" in media:
                found.append((path, method, "media example", media["example"]))
            for name, example in media.get("examples", {}).items():
                found.append((path, method, f"media examples[{name}]", example["value"]))
            schema = _resolve(spec, media.get("schema", {}))
            for index, example in enumerate(schema.get("examples", [])):
                found.append((path, method, f"schema examples[{index}]", example))
            if "example" in schema:
                found.append((path, method, "schema example", schema["example"]))
    return found


def test_every_json_request_example_validates_against_its_schema(spec, application):
    registry = Registry().with_resource(
        SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    examples = json_body_examples(spec)
    assert len(examples) >= 15, "too few examples found: is the walk broken?"
    models = _request_models()
    problems, checked_by_model = [], 0
    for path, method, where, example in examples:
        pointer = _pointer("paths", path, method, "requestBody", "content", "application/json", "schema")
        validator = Draft202012Validator(
            {"$ref": f"{SPEC_URI}#/{pointer}"}, registry=registry, format_checker=FormatChecker()
        )
        problems += [
            f"{method.upper()} {path} ({where}): {e.message}" for e in validator.iter_errors(example)
        ]
        # The same example through the Pydantic model the body schema was generated from: what the server runs.
        ref = (
            spec["paths"][path][method]["requestBody"]["content"]["application/json"]
            .get("schema", {})
            .get("$ref")
        )
        model = models.get(ref.rsplit("/", 1)[-1]) if ref else None
        if model is not None:
            checked_by_model += 1
            try:
                model.model_validate(example)
            except ValidationError as exc:
                problems.append(f"{method.upper()} {path} ({where}): the server refuses it: {exc}")
    assert problems == []
    assert checked_by_model >= 10


def _request_models() -> dict[str, type[BaseModel]]:
    """Every Pydantic model class by name (the OpenAPI component names); ambiguous names left out."""
    found: dict[str, type[BaseModel] | None] = {}
    pending = list(BaseModel.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("flplatform."):
            found[cls.__name__] = None if cls.__name__ in found and found[cls.__name__] is not cls else cls
    return {name: cls for name, cls in found.items() if cls is not None}


def test_error_responses_show_their_own_status(spec):
    seen = set()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if int(code) < 400:
                    continue
                media = response["content"]["application/json"]
                assert media["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (
                    f"{method} {path} {code}"
                )
                example = media["example"]
                if int(code) in ERROR_EXAMPLES and not (path == "/api/auth/token/" and code == "401"):
                    assert example == ERROR_EXAMPLES[int(code)], f"{method} {path} {code}"
                seen.add(example["code"])
    assert {"not_authenticated", "permission_denied", "not_found", "conflict", "validation_error"} <= seen
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # a shape this server never sends
    assert "examples" not in spec["components"]["schemas"]["ErrorBody"]  # no one example for every status


def test_tags_in_workflow_order_and_oauth_dialog_without_client_fields(spec, application):
    names = [tag["name"] for tag in spec["tags"]]
    assert names[:6] == ["auth", "users", "models", "trainings", "inference", "broker"]
    assert names.index("organizations") < names.index("billing") < names.index("audit")
    used = {tag for ops in spec["paths"].values() for op in ops.values() for tag in op.get("tags", [])}
    assert used <= set(names)


def _upload_form_examples(spec: dict[str, Any]) -> dict[str, Any]:
    form = spec["paths"]["/api/models/"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = {}
    for name, prop in form["properties"].items():
        assert "uuid" not in json.dumps(prop.get("example", "")), f"{name}: an invented id points nowhere"
        assert prop.get("type") != "array", f"{name}: Swagger UI would send a list as one joined field"
        if prop.get("format") != "binary" and ("example" in prop or "default" in prop):
            fields[name] = str(prop.get("example", prop.get("default")))
    return fields


async def test_model_upload_form_examples_are_accepted_as_they_are(client, alice, application):
    fields = _upload_form_examples(application.openapi())
    assert fields["input_shape"] == "[null, 4]"
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), buffer)
    uploaded = await client.post(
        "/api/models/",
        headers=alice.headers,
        data=fields,
        files={"model_file": ("model.pt", buffer.getvalue())},
    )
    assert uploaded.status_code == 201, uploaded.text
    metadata = await client.get(f"/api/models/{uploaded.json()['model_id']}/metadata/", headers=alice.headers)
    assert metadata.status_code == 200 and metadata.json()["input_shape"] == [None, 4]
