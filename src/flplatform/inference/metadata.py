"""``GET /api/models/{id}/metadata/``: parameter counts, per-layer summary, output shape and
torchinfo statistics (from the sandbox, or from the safetensors header for weight-only models)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.aggregation.codec import decode_safetensors
from flplatform.aggregation.errors import DecodeError
from flplatform.blobs import store_for
from flplatform.inference.config import InferenceRuntime
from flplatform.inference.loading import ModelNotRunnable, mean_members, sandbox_error, tree_for
from flplatform.inference.service import training_for
from flplatform.orm import GlobalModel, LocalModel, MeanModel, Model, SWAGModel
from flplatform.sandbox import SandboxFailure
from flplatform.sandbox import client as sandbox


def _safetensors_metadata(data: bytes) -> dict[str, Any]:
    """Weight-only models (a safetensors state dict): one entry per tensor, decoded as zero-copy
    views (no tensor data is copied, no forward pass)."""
    try:
        tensors = decode_safetensors(data)
    except DecodeError as exc:
        raise ModelNotRunnable(f"The stored safetensors weights are unreadable ({exc}).") from None
    layers = [
        {"name": name, "class_name": f"Tensor[{str(tensor.dtype).removeprefix('torch.')}]",
         "depth": name.count(".") + 1, "num_params": tensor.numel(), "trainable_params": tensor.numel(),
         "param_bytes": tensor.numel() * tensor.element_size(), "is_leaf": True}
        for name, tensor in tensors.items()
    ]  # fmt: skip
    return {
        "total_params": sum(layer["num_params"] for layer in layers),
        "trainable_params": sum(layer["trainable_params"] for layer in layers),
        "param_bytes": sum(layer["param_bytes"] for layer in layers),
        "layers": layers,
        "output_shape": None,
        "stats": None,
    }


_TYPES = {MeanModel: "MEAN", SWAGModel: "SWAG", GlobalModel: "GLOBAL", LocalModel: "LOCAL"}


async def model_metadata(session: AsyncSession, runtime: InferenceRuntime, model: Model) -> dict[str, Any]:
    """Parameter counts, per-layer summary, output shape and torchinfo stats of a model the
    caller may read (``inference.dependencies.ReadableModel``; fields of ``inference.schemas.ModelMetadata``)."""
    training = await training_for(session, model)
    kind = next(name for cls, name in _TYPES.items() if isinstance(model, cls))
    input_shape = model.input_shape if isinstance(model, GlobalModel) else None
    if isinstance(model, LocalModel):
        base = await session.get(GlobalModel, model.base_model_id)
        input_shape = base.input_shape if base is not None else None
    info: dict[str, Any] = {
        "id": model.id,
        "type": kind,
        "owner": model.owner_id,
        "round": model.round,
        "name": getattr(model, "name", None),
        "description": getattr(model, "description", None),
        "input_shape": input_shape,
        "has_preprocessing": bool(getattr(model, "has_preprocessing", False)),
        "weights_format": model.weights_format,
        "weights_size": model.weights_size,
        "uncertainty_method": training.uncertainty_method if training else None,
    }
    if isinstance(model, MeanModel):
        info["members"] = [m.id for m in await mean_members(session, model.id)]
    if isinstance(model, SWAGModel):
        first, second = (
            await session.execute(
                select(SWAGModel.swag_first_digest, SWAGModel.swag_second_digest).where(
                    SWAGModel.id == model.id
                )
            )
        ).one()
        info["has_swag_moments"] = bool(first) and bool(second)
    if model.weights_format == "safetensors":
        digest = (
            await session.execute(select(Model.weights_digest).where(Model.id == model.id))
        ).scalar_one()
        data = await store_for(session).read(digest) if digest else b""
        info.update(await asyncio.to_thread(_safetensors_metadata, data))
        return info
    refs: dict[str, sandbox.ModuleRef] = {}
    tree = await tree_for(session, runtime, model, 0, set(), refs)
    async with runtime.gate:
        try:
            info.update(
                await sandbox.metadata(
                    tree=tree,
                    refs=refs,
                    input_shape=input_shape,
                    max_elements=runtime.settings.max_input_elements,
                )
            )
        except SandboxFailure as exc:
            raise sandbox_error(exc) from None
    return info
