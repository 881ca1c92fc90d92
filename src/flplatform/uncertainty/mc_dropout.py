"""Monte Carlo dropout (Gal & Ghahramani, 2016): the module in eval mode except its dropout
layers, which keep sampling masks, so N forward passes give N different predictions."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Dropout draws from torch's global generator (nn.Dropout takes none), so a seeded run holds
# this lock while it owns the global generator; unseeded runs do not touch its state.
_GLOBAL_RNG_LOCK = threading.Lock()


# "Dropout", "Dropout2d", "AlphaDropout", "FeatureAlphaDropout", a user's "MCDropout", …
# but not a network class such as "DropoutNet".
_DROPOUT_CLASS = re.compile(r"dropout(\d+d)?$", re.IGNORECASE)


def is_dropout(module: nn.Module) -> bool:
    """Eager ``_DropoutNd`` subclasses, and modules (TorchScript included) whose original class
    is torch's dropout module or is named like a dropout layer."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    names = [type(module).__name__]
    if isinstance(module, torch.jit.ScriptModule):
        names.append(getattr(module, "original_name", "") or "")
        try:
            qualified = module._c.qualified_name  # e.g. __torch__.torch.nn.modules.dropout.Dropout
        except AttributeError:  # not a RecursiveScriptModule
            qualified = ""
        if "torch.nn.modules.dropout." in qualified:
            return True
        names.append(qualified.rsplit(".", 1)[-1])
    return any(_DROPOUT_CLASS.search(name) for name in names if name)


def enable_dropout(module: nn.Module) -> int:
    """Put ``module`` in eval mode and its dropout layers back in training mode; returns how
    many dropout layers were found (0 means the passes are deterministic)."""
    module.eval()
    found = 0
    for sub in module.modules():
        if is_dropout(sub):
            sub.train()
            found += 1
    return found


@contextmanager
def seeded_global_rng(seed: int | None) -> Iterator[None]:
    """Run the block with the global generator seeded, restoring its state afterwards."""
    if seed is None:
        yield
        return
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
