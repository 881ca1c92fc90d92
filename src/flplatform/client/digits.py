"""A small federated task that needs no download: scikit-learn's bundled 8×8 handwritten digits
(1,797 images, 10 classes), a TorchScript CNN, a label-skewed (Dirichlet) non-IID split and
the train/test functions a :class:`~flplatform.client.Participant` calls. Used by
``flplatform demo`` and the end-to-end tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flplatform.client.participant import RoundContext

INPUT_SHAPE = [None, 1, 8, 8]


class DigitsCNN(nn.Module):
    """Two 3×3 conv layers and two linear layers, ~7k parameters; outputs logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def make_model(seed: int = 0) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    return torch.jit.script(DigitsCNN())


@dataclasses.dataclass
class Shard:
    x: torch.Tensor  # (n, 1, 8, 8) float32 in [0, 1]
    y: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def label_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=10).tolist()


def load_digits_tensors() -> Shard:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return Shard(x, y)


def train_test_split(data: Shard, test_fraction: float, seed: int) -> tuple[Shard, Shard]:
    """Stratified split (every class keeps its share in both parts)."""
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    labels = data.y.numpy()
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        test_idx.extend(idx[: round(len(idx) * test_fraction)].tolist())
    mask = np.ones(len(labels), dtype=bool)
    mask[test_idx] = False
    train_idx = np.flatnonzero(mask)
    test = torch.tensor(sorted(test_idx))
    train = torch.tensor(train_idx)
    return Shard(data.x[train], data.y[train]), Shard(data.x[test], data.y[test])


def dirichlet_partition(
    data: Shard, clients: int, alpha: float, seed: int, min_size: int = 20
) -> list[Shard]:
    """Label-skewed non-IID split: each class is divided among the clients in proportions drawn
    from Dirichlet(alpha); small alpha → each client sees few classes. Redrawn until every
    client has at least ``min_size`` samples."""
    if clients < 1:
        raise ValueError("need at least one client")
    min_size = min(min_size, len(data) // clients)
    rng = np.random.default_rng(seed)
    labels = data.y.numpy()
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:  # pragma: no cover - alpha so small that no draw fits
        raise ValueError(f"could not give every client {min_size} samples with alpha={alpha}")
    shards = []
    for part in parts:
        index = torch.tensor(sorted(part))
        shards.append(Shard(data.x[index], data.y[index]))
    return shards


@torch.no_grad()
def evaluate(module: nn.Module, data: Shard) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``module`` on ``data``."""
    module.eval()
    logits = module(data.x)
    loss = F.cross_entropy(logits, data.y).item()
    accuracy = (logits.argmax(dim=1) == data.y).float().mean().item()
    return {"accuracy": accuracy, "loss": loss}


@dataclasses.dataclass
class LocalTrainer:
    """A participant's local data and training recipe (plain SGD with momentum, as in FedAvg/FedProx)."""

    train_data: Shard
    test_data: Shard
    epochs: int = 3
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0

    def train(self, module: nn.Module, round_: int, ctx: RoundContext) -> tuple[int, Mapping[str, float]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + round_)
        optimizer = torch.optim.SGD(module.parameters(), lr=self.lr, momentum=self.momentum)
        module.train()
        n = len(self.train_data)
        total_loss, total_correct, seen = 0.0, 0, 0
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, self.batch_size):
                batch = order[start : start + self.batch_size]
                x, y = self.train_data.x[batch], self.train_data.y[batch]
                optimizer.zero_grad()
                logits = module(x)
                loss = F.cross_entropy(logits, y)
                # FedProx: mu/2·||w − w_global||² (zero when the training sets no mu).
                (loss + ctx.proximal_term(module)).backward()
                optimizer.step()
                total_loss += loss.item() * len(batch)
                total_correct += int((logits.argmax(dim=1) == y).sum())
                seen += len(batch)
        return n, {"train_loss": total_loss / seen, "train_accuracy": total_correct / seen}

    def test(self, module: nn.Module, round_: int, ctx: RoundContext) -> Mapping[str, float]:
        return evaluate(module, self.test_data)
