"""Models for inference tests, created directly through the ORM (no upload routes needed)."""

from __future__ import annotations

import io
import uuid
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from flplatform.blobs import open_store
from flplatform.orm import GlobalModel, MeanModel, SWAGModel, Training, TrainingState, UncertaintyMethod
from flplatform.orm.training import training_participants


class DropoutMLP(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class ImagePreprocessing(nn.Module):
    """(1, C, H, W) in [0, 1] → (1, 4) features: mean of each quadrant of the first channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = x[:, 0]
        h = channel.shape[1] // 2
        w = channel.shape[2] // 2
        return torch.stack(
            [
                channel[:, :h, :w].mean((1, 2)),
                channel[:, :h, w:].mean((1, 2)),
                channel[:, h:, :w].mean((1, 2)),
                channel[:, h:, w:].mean((1, 2)),
            ],
            1,
        )


def torchscript_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def moment_bytes(tensor: torch.Tensor) -> bytes:
    return save_safetensors({"moment": tensor.contiguous()})


def flat_parameters(module: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach()


@pytest.fixture
def add_model(app: Any):  # type: ignore[no-untyped-def]
    """``await add_model(owner, module, kind=..., ...)`` → model id (committed)."""

    async def _add(
        owner: Any,
        module: nn.Module | None = None,
        *,
        kind: str = "global",
        input_shape: list[int | None] | None = None,
        preprocessing: nn.Module | None = None,
        members: list[uuid.UUID] | None = None,
        moments: tuple[torch.Tensor, torch.Tensor] | None = None,
        weights: bytes | None = None,
        weights_format: str = "torchscript",
    ) -> uuid.UUID:
        data = weights if weights is not None else (torchscript_bytes(module) if module is not None else None)
        store = open_store(app.state.settings)

        async def put(blob: bytes | None) -> str | None:
            return None if blob is None else (await store.put(blob)).digest

        fields: dict[str, Any] = {
            "owner_id": owner.user.id,
            "name": f"{kind} model",
            "weights_digest": await put(data),
            "weights_format": weights_format if data is not None else None,
            "weights_size": len(data or b""),
            "input_shape": input_shape,
            "preprocessing_digest": await put(torchscript_bytes(preprocessing))
            if preprocessing is not None
            else None,
            "has_preprocessing": preprocessing is not None,
        }
        async with app.state.sessionmaker() as session:
            if kind == "mean":
                model = MeanModel(**fields)
                if members:
                    model.members = [await session.get(GlobalModel, m) for m in members]
            elif kind == "swag":
                model = SWAGModel(**fields)
                if moments is not None:
                    model.swag_first_digest = await put(moment_bytes(moments[0]))
                    model.swag_second_digest = await put(moment_bytes(moments[1]))
            else:
                model = GlobalModel(**fields)
            session.add(model)
            await session.commit()
            return model.id

    return _add


@pytest.fixture
def add_training(app: Any):  # type: ignore[no-untyped-def]
    async def _add(
        model_id: uuid.UUID,
        actor: Any,
        participants: list[Any] = (),  # type: ignore[assignment]
        *,
        method: UncertaintyMethod = UncertaintyMethod.NONE,
        options: dict[str, Any] | None = None,
    ) -> uuid.UUID:
        async with app.state.sessionmaker() as session:
            training = Training(
                model_id=model_id,
                actor_id=actor.user.id,
                target_num_updates=1,
                state=TrainingState.INITIAL,
                uncertainty_method=method,
                options=options or {},
            )
            session.add(training)
            await session.flush()
            for participant in participants:
                await session.execute(
                    training_participants.insert().values(
                        training_id=training.id, user_id=participant.user.id
                    )
                )
            await session.commit()
            return training.id

    return _add
