"""The ensemble module of MEAN models (scripted inside the sandbox worker)."""

from __future__ import annotations

import torch


class MeanModule(torch.nn.Module):
    """Averages its members' outputs: what a MEAN model downloads as."""

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [m(x) for m in self.models]
        return torch.stack(outputs).mean(dim=0)


def build_mean_module(members: list[torch.nn.Module]) -> torch.jit.ScriptModule:
    return torch.jit.script(MeanModule(members))
