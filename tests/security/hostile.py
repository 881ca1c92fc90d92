"""Hostile TorchScript modules of issue 14 (scripted here, uploaded by the tests)."""

from __future__ import annotations

import io
from typing import Tuple  # noqa: UP035  (TorchScript annotations)

import torch
from torch import nn


class SavesInSetstate(nn.Module):
    """``__setstate__`` (run by torch.jit.load) writes a file with torch.save."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.scale = torch.ones(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:  # noqa: UP006
        return (self.target, self.scale, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:  # noqa: UP006
        self.target = state[0]
        self.scale = state[1]
        self.training = state[2]
        torch.save(self.scale, self.target)


class LoopsInSetstate(nn.Module):
    """``__setstate__`` never returns (it used to freeze the whole server)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.ones(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:  # noqa: UP006
        return (self.scale, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:  # noqa: UP006
        self.scale = state[0]
        self.training = state[1]
        i = 0
        while i >= 0:
            i = (i + 1) % 1000


class ReadsFileInForward(nn.Module):
    """``forward`` returns the bytes of a server file (torch.from_file)."""

    def __init__(self, path: str, size: int):
        super().__init__()
        self.path = path
        self.size = size
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
        return self.fc(x) * 0 + data.float().unsqueeze(0).expand(x.shape[0], self.size)


class SpinsInForward(nn.Module):
    """Only ordinary ops, but ``forward`` never returns."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 0
        while i >= 0:
            i = (i + 1) % 1000
        return self.fc(x)


def archive(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


class PrintsFakeFrames(nn.Module):
    """``forward`` prints a protocol frame header to the C++ stdout before answering."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print('FLPS{"missing": []}FLPS{"error": {}}')
        return self.fc(x)
