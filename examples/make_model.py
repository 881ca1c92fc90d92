"""Write the quick-start's inputs: a small TorchScript CNN for 8×8 handwritten digits (with
dropout, so MC-dropout inference has something to sample) and a few digits to ask it about.

    .venv/bin/python examples/make_model.py quickstart/

writes ``quickstart/digits-cnn.pt`` (upload it with ``POST /api/models/``) and
``quickstart/digits.npy`` (five held-out digits, shape (5, 1, 8, 8), for ``POST /api/inference/``).
The digits are scikit-learn's bundled data set: nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flplatform.client import digits


class DigitsNet(nn.Module):
    """Two 3×3 convolutions, dropout, two linear layers; input (batch, 1, 8, 8), output 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(32 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout(torch.flatten(x, 1))
        return self.fc2(F.relu(self.fc1(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("quickstart"), help="folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="initial weights (default 0)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    # TorchScript: the server runs the model without this file's Python class (and never unpickles).
    torch.jit.script(DigitsNet()).save(str(args.out / "digits-cnn.pt"))
    # The participants hold out the same 20 % (seed 0, see examples/participant.py): ask about five of those.
    _, held_out = digits.train_test_split(digits.load_digits_tensors(), 0.2, seed=0)
    np.save(args.out / "digits.npy", held_out.x[:5].numpy())
    print(
        f"wrote {args.out / 'digits-cnn.pt'} and {args.out / 'digits.npy'} (labels {held_out.y[:5].tolist()})"
    )


if __name__ == "__main__":
    main()
