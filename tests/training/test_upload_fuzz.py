"""No bad upload produces a 500: a table of malformed multipart/JSON bodies for every upload
route, plus seeded byte-level mutations of valid files. The client here does NOT re-raise app
exceptions, so an unhandled error shows up as the 500 a real client would get."""

from __future__ import annotations

import pickle
import random
from typing import Any

import httpx
import torch

from tests.training.conftest import (
    as_safetensors,
    create_training,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
    upload_global,
)

HUGE = str(2**63 + 5)  # overflows a 64-bit integer column
BIG = str(2**31 + 5)  # overflows a 32-bit integer column


FAILURES: list[Any] = []


def _no_500(r: httpx.Response, case: Any, allowed: tuple[int, ...] = ()) -> None:
    """Collects every offender (so one run lists them all); the test asserts none at the end."""
    if r.status_code in allowed:
        return
    if not 400 <= r.status_code < 500 or not r.json().get("detail"):
        FAILURES.append((case, r.status_code, r.text[:300]))


def _mutations(data: bytes, count: int, seed: int) -> list[bytes]:
    """Bit flips, truncations, splices and byte runs of a valid file (deterministic)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        buf = bytearray(data)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(buf))
                buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf = buf[: rng.randrange(1, len(buf))]
        elif kind == 2:
            a, b = sorted(rng.sample(range(len(buf)), 2))
            buf = buf[:a] + buf[b:]
        else:
            pos = rng.randrange(len(buf))
            buf[pos : pos + 16] = bytes([rng.randrange(256)]) * 16
        out.append(bytes(buf))
    return out


async def test_no_bad_upload_produces_a_500(app, alice, make_user):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        c0, c1 = await make_user("f0", client=True), await make_user("f1", client=True)
        initial = scripted_bytes(tiny_net())
        state = state_of(initial)
        good = as_safetensors(shifted(state, 0.5))
        model_id = await upload_global(client, alice.headers, initial)
        swag_id = await upload_global(client, alice.headers, initial, kind="SWAG")
        training_id = await create_training(client, alice.headers, model_id, [c0.id, c1.id])
        assert (
            await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
        ).status_code == 202
        h = c0.headers

        # ---- POST /api/models/ (global model upload)
        def upload(data: dict[str, Any], files: dict[str, Any] | None = None) -> Any:
            return client.post(
                "/api/models/",
                headers=alice.headers,
                data=data,
                files=files if files is not None else {"model_file": ("m.pt", initial)},
            )

        base = {"name": "n", "description": "d"}
        global_cases: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
            ("round huge", {**base, "round": HUGE}, None),
            ("round 32-bit overflow", {**base, "round": BIG}, None),
            ("round negative", {**base, "round": "-1"}, None),
            ("round float", {**base, "round": "1.5"}, None),
            ("input_shape huge", {**base, "input_shape": ["None", HUGE]}, None),
            ("input_shape bad json", {**base, "input_shape": "[1, 2"}, None),
            ("input_shape nested", {**base, "input_shape": '[[1], {"a": 2}]'}, None),
            ("input_shape text", {**base, "input_shape": ["four"]}, None),
            ("models bad json", {**base, "type": "MEAN", "models": "[not json"}, {}),
            ("models not ids", {**base, "type": "MEAN", "models": ["nope"]}, {}),
            ("models json of junk", {**base, "type": "MEAN", "models": "[1, null, {}]"}, {}),
            (
                "models unknown id",
                {**base, "type": "MEAN", "models": ["00000000-0000-0000-0000-000000000000"]},
                {},
            ),
            ("models local/self", {**base, "type": "MEAN", "models": []}, {}),
            ("name with NUL", {"name": "a\x00b", "description": "d"}, None),
            ("description with NUL", {"name": "n", "description": "d\x00"}, None),
            ("model_file as text field", {**base, "model_file": "not a file"}, {}),
            (
                "preprocessing junk",
                base,
                {"model_file": ("m.pt", initial), "model_preprocessing_file": ("p", b"junk")},
            ),
            ("pickled module", base, {"model_file": ("m.pt", pickle.dumps({"a": 1}))}),
            ("empty file", base, {"model_file": ("m.pt", b"")}),
        ]
        for name, data, files in global_cases:
            _no_500(await upload(data, files), name)
        for name, body in [
            ("json MEAN bad ids", {"name": "e", "type": "MEAN", "models": ["x"]}),
            ("json MEAN round huge", {"name": "e", "type": "MEAN", "models": [model_id], "round": int(HUGE)}),
            ("json MEAN NUL name", {"name": "e\x00", "type": "MEAN", "models": [model_id]}),
            ("json GLOBAL", {"name": "e", "type": "GLOBAL", "models": [model_id]}),
            ("json extra key", {"name": "e", "type": "MEAN", "models": [model_id], "is_superuser": True}),
        ]:
            _no_500(await client.post("/api/models/", headers=alice.headers, json=body), name)
        for name, content in [("json broken", b"{"), ("json list", b"[1,2]"), ("json deep", b"[" * 50_000)]:
            _no_500(
                await client.post(
                    "/api/models/",
                    headers={**alice.headers, "Content-Type": "application/json"},
                    content=content,
                ),
                name,
            )
        _no_500(
            await client.post(
                "/api/models/",
                headers={**alice.headers, "Content-Type": "multipart/form-data"},
                content=b"--x\r\nbroken",
            ),
            "multipart without boundary",
        )
        _no_500(
            await client.post(
                "/api/models/",
                headers={**alice.headers, "Content-Type": "multipart/form-data; boundary=x"},
                content=b"--x\r\nContent-Disposition: form-data\r\n\r\nbroken",
            ),
            "broken multipart",
        )

        # ---- POST /api/models/{id}/ (client update)
        def update(
            data: dict[str, Any], blob: bytes = good, who: dict[str, str] = h, target: str = model_id
        ) -> Any:
            return client.post(
                f"/api/models/{target}/", headers=who, data=data, files={"model_file": ("u", blob)}
            )

        update_cases: list[tuple[str, dict[str, Any], bytes]] = [
            ("sample_size huge", {"round": "0", "sample_size": HUGE}, good),
            ("sample_size 32-bit overflow", {"round": "0", "sample_size": BIG}, good),
            ("sample_size negative", {"round": "0", "sample_size": "-3"}, good),
            ("sample_size text", {"round": "0", "sample_size": "ten"}, good),
            ("round huge", {"round": HUGE, "sample_size": "1"}, good),
            ("round text", {"round": "zero", "sample_size": "1"}, good),
            (
                "metrics length",
                {"round": "0", "sample_size": "1", "metric_names": ["a", "b"], "metric_values": ["1"]},
                good,
            ),
            (
                "metric name NUL",
                {"round": "0", "sample_size": "1", "metric_names": ["a\x00"], "metric_values": ["1"]},
                good,
            ),
            (
                "metric name long",
                {"round": "0", "sample_size": "1", "metric_names": ["a" * 5000], "metric_values": ["1"]},
                good,
            ),
            ("pickle", {"round": "0", "sample_size": "1"}, pickle.dumps(state)),
            ("torch.save zip of junk", {"round": "0", "sample_size": "1"}, b"PK\x03\x04" + b"\x00" * 100),
            (
                "safetensors header lies",
                {"round": "0", "sample_size": "1"},
                (2**60).to_bytes(8, "little") + b"{}",
            ),
            (
                "safetensors bad json header",
                {"round": "0", "sample_size": "1"},
                (5).to_bytes(8, "little") + b"{oops",
            ),
            (
                "int buffer as float",
                {"round": "0", "sample_size": "1"},
                as_safetensors({**state, "bn.num_batches_tracked": torch.tensor(1.5)}),
            ),
            (
                "extra tensor",
                {"round": "0", "sample_size": "1"},
                as_safetensors({**state, "extra": torch.zeros(1)}),
            ),
            (
                "inf",
                {"round": "0", "sample_size": "1"},
                as_safetensors({**state, "fc2.bias": torch.full((2,), float("inf"))}),
            ),
        ]
        for name, data, blob in update_cases:
            _no_500(await update(data, blob), name)
        # a NUL in a metric *value* is fine: non-numeric values are stored as bytes
        _no_500(
            await update(
                {"round": "0", "sample_size": "1", "metric_names": ["a"], "metric_values": ["x\x00y"]}
            ),
            "metric value NUL",
            (201,),
        )
        missing = "00000000-0000-0000-0000-000000000000"
        _no_500(await update({"round": "0", "sample_size": "1"}, target=missing), "unknown model")
        _no_500(await update({"round": "0", "sample_size": "1"}, target=swag_id), "model without training")
        for i, blob in enumerate(
            _mutations(good, 12, seed=1) + _mutations(scripted_bytes(tiny_net()), 12, seed=2)
        ):
            _no_500(await update({"round": "0", "sample_size": "1"}, blob), f"update mutation {i}", (201,))

        # ---- metrics, preprocessing, SWAG moments
        for name, data in [
            ("nan", {"metric_names": ["loss"], "metric_values": ["nan"]}),
            ("inf", {"metric_names": ["loss"], "metric_values": ["inf"]}),
            ("-inf", {"metric_names": ["loss"], "metric_values": ["-1e999"]}),
            ("NUL", {"metric_names": ["lo\x00ss"], "metric_values": ["1"]}),
            ("NUL value", {"metric_names": ["loss"], "metric_values": ["\x00"]}),
            ("only names", {"metric_names": ["loss"]}),
        ]:
            r = await client.post(f"/api/models/{model_id}/metrics/", headers=alice.headers, data=data)
            _no_500(r, f"metrics {name}", (201,))
        metrics = await client.get(f"/api/models/{model_id}/metrics/", headers=alice.headers)
        _no_500(metrics, "metrics rendered as JSON (non-finite values)", (200,))
        for i, blob in enumerate(
            [b"", b"junk", pickle.dumps(torch.nn.Identity())]
            + _mutations(scripted_bytes(torch.nn.Identity()), 4, seed=3)
        ):
            r = await client.post(
                f"/api/models/{model_id}/preprocessing/",
                headers=alice.headers,
                files={"model_preprocessing_file": ("p.pt", blob)},
            )
            _no_500(r, f"preprocessing {i}", (202,))
        moment = as_safetensors(
            {"moment": torch.zeros(sum(v.numel() for k, v in state.items() if "num_batches" not in k))}
        )
        for name, data, first in [
            ("not in S", {"round": "0", "sample_size": "1"}, moment),
            ("sample_size huge", {"round": "0", "sample_size": HUGE}, moment),
            ("pickle", {"round": "0", "sample_size": "1"}, pickle.dumps(torch.zeros(3))),
        ]:
            r = await client.post(
                f"/api/models/{model_id}/swag/",
                headers=h,
                data=data,
                files={"first_moment_file": ("f", first), "second_moment_file": ("s", moment)},
            )
            _no_500(r, name)

        # ---- trainings JSON
        for name, body in [
            (
                "target huge",
                {
                    "model_id": swag_id,
                    "target_num_updates": int(HUGE),
                    "metric_names": [],
                    "aggregation_method": "FedAvg",
                },
            ),
            (
                "options unknown",
                {
                    "model_id": swag_id,
                    "target_num_updates": 1,
                    "metric_names": [],
                    "aggregation_method": "FedAvg",
                    "options": {"lr": 1},
                },
            ),
            (
                "daisy huge",
                {
                    "model_id": swag_id,
                    "target_num_updates": 2**20,
                    "metric_names": [],
                    "aggregation_method": "FedDC",
                    "options": {"daisy_chain_period": 2**20},
                },
            ),
            (
                "clients junk",
                {
                    "model_id": swag_id,
                    "target_num_updates": 1,
                    "metric_names": [],
                    "aggregation_method": "FedAvg",
                    "clients": ["x"],
                },
            ),
            (
                "bad enum",
                {
                    "model_id": swag_id,
                    "target_num_updates": 1,
                    "metric_names": [],
                    "aggregation_method": "fedavg",
                },
            ),
            (
                "metric name NUL",
                {
                    "model_id": swag_id,
                    "target_num_updates": 1,
                    "metric_names": ["a\x00"],
                    "aggregation_method": "FedAvg",
                },
            ),
        ]:
            _no_500(await client.post("/api/trainings/", headers=alice.headers, json=body), name, (201,))
        _no_500(
            await client.put(
                f"/api/trainings/{training_id}/clients/", headers=alice.headers, json={"clients": [missing]}
            ),
            "unknown client",
        )
        _no_500(
            await client.put(
                f"/api/trainings/{training_id}/clients/",
                headers=alice.headers,
                content=b"{",
            ),
            "clients broken json",
        )
        # a declared input shape far beyond any accepted input must not make metadata allocate it
        wide = await upload_global(client, alice.headers, initial, input_shape=["1", "20000", "20000"])
        _no_500(
            await client.get(f"/api/models/{wide}/metadata/", headers=alice.headers), "metadata wide", (200,)
        )
        detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
        assert detail["state"] == "O", detail  # nothing above broke the running training
        other = await create_training(client, alice.headers, swag_id, [c1.id])
        _no_500(
            await client.post(
                f"/api/trainings/{other}/stop/", headers=alice.headers, json={"reason": "x\x00"}
            ),
            "stop reason NUL",
            (202,),
        )
        failures, FAILURES[:] = list(FAILURES), []
        assert not failures, "\n".join(map(repr, failures))
