"""Model bytes on the wire: TorchScript archives (what DLR clients send and download) and
safetensors state dicts (weight-only updates). Nothing here unpickles."""

from __future__ import annotations

import io
from collections.abc import Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

ZIP_MAGIC = b"PK\x03\x04"


def is_torchscript(data: bytes) -> bool:
    """TorchScript archives are zip files; safetensors start with an 8-byte header length."""
    return data[:4] == ZIP_MAGIC


def dump_module(module: torch.nn.Module) -> bytes:
    """TorchScript archive of ``module`` (scripted first when it is a plain ``nn.Module``)."""
    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def load_module(data: bytes, template: torch.nn.Module | None = None) -> torch.nn.Module:
    """A module from downloaded bytes: a TorchScript archive loads by itself; safetensors weights
    need ``template`` (a module of the same architecture; its weights are replaced in place)."""
    if is_torchscript(data):
        return torch.jit.load(io.BytesIO(data), map_location="cpu")
    if template is None:
        raise ValueError("got safetensors weights but no template module to load them into")
    template.load_state_dict(load_state_dict(data))
    return template


def dump_state_dict(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> bytes:
    """safetensors bytes of a state dict (or of a module's state dict)."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    # Clone: safetensors refuses tensors that share storage (tied weights, views).
    return safetensors_save(
        {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}
    )


def load_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    return safetensors_load(data)


def dump_tensor(tensor: torch.Tensor, name: str = "moment") -> bytes:
    """One tensor as safetensors (SWAG moments travel this way)."""
    return safetensors_save({name: tensor.detach().cpu().contiguous().clone()})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a module's parameters by name (the reference point of FedProx)."""
    return {name: param.detach().clone() for name, param in module.named_parameters()}
