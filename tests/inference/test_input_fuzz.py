"""No inference request produces a 500: odd JSON values and options, and seeded byte-level
mutations of valid safetensors/.npy/PNG inputs, sent as JSON (base64) and as multipart files.
The client does not re-raise app exceptions, so an unhandled error is the 500 a caller gets."""

from __future__ import annotations

import random

import httpx
import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from tests.inference.conftest import DropoutMLP, ImagePreprocessing, flat_parameters
from tests.inference.test_inference_api import b64, image_bytes, npy_bytes

X = [[0.1, 0.2, 0.3, 0.4]]


def _mutations(data: bytes, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        buf = bytearray(data)
        if i % 3 == 0:
            for _ in range(rng.randint(1, 6)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif i % 3 == 1:
            buf = buf[: rng.randrange(1, len(buf))]
        else:
            pos = rng.randrange(len(buf))
            buf[pos : pos + 8] = b"\xff" * 8
        out.append(bytes(buf))
    return out


async def test_no_inference_request_produces_a_500(app, alice, add_model):
    model = DropoutMLP()
    plain_id = await add_model(alice, model, input_shape=[None, 4])
    plain = str(plain_id)
    imaging = str(
        await add_model(alice, nn.Linear(4, 2), input_shape=[None, 4], preprocessing=ImagePreprocessing())
    )
    vector = flat_parameters(model)
    swag = str(await add_model(alice, model, kind="swag", input_shape=[None, 4], moments=(vector, vector**2)))
    mean = str(await add_model(alice, kind="mean", members=[plain_id]))
    failures = []
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers=alice.headers
    ) as client:

        async def check(case: str, ok: tuple[int, ...] = (), **request) -> None:
            r = await client.post("/api/inference/", **request)
            if r.status_code in ok:
                return
            if not 400 <= r.status_code < 500 or not r.json().get("detail"):
                failures.append((case, r.status_code, r.text[:200]))

        odd_inputs = [
            None,
            True,
            1,
            1.5,
            "",
            [],
            [[]],
            [[[]]],
            [[None] * 4],
            [[True] * 4],
            [[10**400] * 4],
            [[{"a": 1}] * 4],
            [[1, 2, 3, 4], 5],
            "[[1,2,3,4]]",
            "=" * 8,
            "data:;base64,",
            "file:///etc/passwd",
            "\x00",
        ]
        for value in odd_inputs:
            await check(f"json {value!r:.40}", (200,), json={"model_id": plain, "model_input": value})
        for raw in (b"[[1e400, 1, 2, 3]]", b"[[NaN, 1, 2, 3]]", b"[[-Infinity, 1, 2, 3]]"):
            await check(
                f"raw {raw!r}",
                json=None,
                content=b'{"model_id": "%s", "model_input": %s}' % (plain.encode(), raw),
                headers={"Content-Type": "application/json"},
            )
        odd_bodies = [
            {"model_id": plain, "model_input": X, "options": {"N": 10**12}},
            {
                "model_id": plain,
                "model_input": X,
                "uncertainty_method": "MC_DROPOUT",
                "options": {"seed": -1},
            },
            {
                "model_id": plain,
                "model_input": X,
                "uncertainty_method": "MC_DROPOUT",
                "options": {"seed": 2**80},
            },
            {"model_id": swag, "model_input": X, "uncertainty_method": "SWAG", "options": {"min_var": -1}},
            {"model_id": swag, "model_input": X, "uncertainty_method": "SWAG", "options": {"min_var": 1e308}},
            {"model_id": swag, "model_input": X, "uncertainty_method": "SWAG", "options": {"scale": 1e308}},
            {"model_id": plain, "model_input": X, "uncertainty_method": "SWAG"},  # not a SWAG model
            {"model_id": plain, "model_input": X, "uncertainty_method": "ENSEMBLE"},  # not a mean model
            {"model_id": mean, "model_input": X, "uncertainty_method": "ENSEMBLE", "round": 2**40},
            {"model_id": plain, "model_input": X, "round": -1},
            {"model_id": plain, "model_input": X, "return_format": "pickle"},
            {"model_id": plain, "model_input": X, "uncertainty_method": "nope"},
            {"model_id": plain, "model_input": X, "options": "N=3"},
        ]
        for body in odd_bodies:
            await check(f"body {body}", (200,), json=body)
        for name, form in [
            ("options not json", {"options": "{"}),
            ("options list", {"options": "[1]"}),
            ("round text", {"round": "x"}),
            ("method bad", {"uncertainty_method": "x"}),
        ]:
            await check(
                f"form {name}", (200,), data={"model_id": plain, "model_input": "[[1,2,3,4]]", **form}
            )
        valid = {
            "safetensors": save_safetensors({"x": torch.tensor(X)}),
            "npy": npy_bytes(np.array(X, dtype=np.float32)),
            "png": image_bytes("PNG"),
        }
        for kind, data in valid.items():
            target = imaging if kind == "png" else plain
            for i, blob in enumerate(_mutations(data, 9, seed=len(kind))):
                await check(
                    f"{kind} mutation {i} (json)", (200,), json={"model_id": target, "model_input": b64(blob)}
                )
                await check(
                    f"{kind} mutation {i} (file)",
                    (200,),
                    data={"model_id": target, "return_format": "json"},
                    files={"model_input": ("x", blob)},
                )
    assert not failures, "\n".join(map(repr, failures))
