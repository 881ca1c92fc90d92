"""Central differential privacy (McMahan et al. 2018; as Flower's server-side fixed clipping).

Two steps, both on floating tensors only: :func:`clip_factor` scales an update's delta to the global
model down to ``clip_norm`` (L2 over all floating tensors; the aggregators apply the factor as they
combine), and :func:`add_gaussian_noise` adds ``N(0, std²)`` to every floating coordinate of the
combined model, seeded from ``(seed, round)`` when a seed is set. The aggregator base class decides
when they run (see :class:`~flplatform.aggregation.base.Aggregator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .accumulator import Sources
from .codec import FlatLayout, chunk_ranges


def clip_factor(
    layout: FlatLayout,
    sources: Sources,
    reference: Callable[[torch.dtype], torch.Tensor],
    clip_norm: float,
    chunk: int,
) -> float:
    """``min(1, clip_norm / ‖update − global‖₂)`` over every floating group of the update.

    ``reference(dtype)`` is the global model's flat buffer of a group. Squares are summed in float64,
    chunk by chunk, so no model-sized temporary is made.
    """
    squares = 0.0
    for dtype in layout.floating_dtypes:
        source = sources[dtype]
        flat_reference = reference(dtype)
        if isinstance(source, torch.Tensor):
            for start, stop in chunk_ranges(source.numel(), chunk):
                squares += float(
                    torch.linalg.vector_norm(source[start:stop].double() - flat_reference[start:stop]) ** 2
                )
        else:
            for slot, tensor in zip(layout.groups[dtype], source, strict=False):
                ref = flat_reference[slot.offset : slot.offset + slot.numel]
                tensor = tensor.reshape(-1)  # small tensors keep their shape (see accumulator.gather_tensors)
                for start, stop in chunk_ranges(tensor.numel(), chunk):
                    squares += float(
                        torch.linalg.vector_norm(tensor[start:stop].double() - ref[start:stop]) ** 2
                    )
    norm = math.sqrt(squares)
    return 1.0 if norm <= clip_norm else clip_norm / norm


def add_gaussian_noise(
    flats: dict[torch.dtype, torch.Tensor],
    dtypes: list[torch.dtype],
    std: float,
    seed: int | None,
    round_number: int,
    chunk: int,
) -> None:
    """Add ``std`` × standard normal noise to every coordinate of ``flats[dtype]`` for ``dtypes``, in place.

    With a seed the noise is reproducible per round (the generator is seeded from ``(seed,
    round_number)``); without one it is drawn from a randomly seeded generator. Torch's generator is
    not a cryptographic RNG.
    """
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(hash((seed, round_number)) & ((1 << 63) - 1))
    for dtype in dtypes:
        flat = flats[dtype]
        for start, stop in chunk_ranges(flat.numel(), chunk):
            noise = torch.randn(stop - start, generator=generator, dtype=torch.float32)
            flat[start:stop].add_(noise, alpha=std)
