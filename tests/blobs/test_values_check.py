"""The values check of a spooled update (``models.uploads.check_finite``) reads the file one window
at a time (``CHECK_WINDOW``, dropping each window's pages): a NaN or an infinity anywhere in a
tensor that spans many windows, even in the last, partial one, is found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flplatform.aggregation import codec
from flplatform.models import uploads
from flplatform.models.files import ModelFileError, spec_of
from flplatform.models.update_header import UpdateInspector


async def _spooled(tmp_path: Path, state: dict[str, torch.Tensor]) -> tuple[Path, UpdateInspector]:
    data = codec.encode_safetensors(state)
    path = tmp_path / "update.safetensors"
    path.write_bytes(data)
    inspector = UpdateInspector(spec_of(state))
    await inspector.feed(memoryview(data))
    await inspector.end()
    assert inspector.error is None and inspector.checked
    return path, inspector


@pytest.mark.parametrize("where", [None, 0, 4095, 4096, 10_006])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
async def test_a_bad_value_in_any_window_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: int | None, bad: float
) -> None:
    monkeypatch.setattr(uploads, "CHECK_WINDOW", 4096)  # bytes: 1024 float32 values per window
    weight = torch.linspace(-1, 1, 10_007)  # ~10 windows, the last one partial
    if where is not None:
        weight[where] = bad
    path, inspector = await _spooled(tmp_path, {"b": torch.zeros(3), "w": weight})
    if where is None:
        uploads.check_finite(path, inspector)
    else:
        with pytest.raises(ModelFileError, match="'w' contains NaN or infinite"):
            uploads.check_finite(path, inspector)


# --------------------------------------------------------------------------- while streaming


async def _watched(state: dict[str, torch.Tensor], chunk: int, *, early: bool = True) -> UpdateInspector:
    """The inspector as an upload drives it: each chunk fed, then shown to the writer's observer."""
    data = codec.encode_safetensors(state)
    inspector = UpdateInspector(spec_of(state) if early else None)
    for offset in range(0, len(data), chunk):
        piece = memoryview(data)[offset : offset + chunk]
        await inspector.feed(piece)
        inspector.observe(offset, piece)
    await inspector.end()
    return inspector


def _mixed(n: int) -> dict[str, torch.Tensor]:
    return {
        "a": torch.linspace(-1, 1, n),
        "b": torch.arange(7),  # integers: not checked
        "c": torch.linspace(-2, 2, n // 3 + 1).half(),
        "d": torch.linspace(-3, 3, n // 5 + 1).bfloat16(),
        "e": torch.linspace(-4, 4, n // 7 + 1).double(),
    }


@pytest.mark.parametrize("chunk", [1, 3, 4093, 65536])
async def test_values_are_checked_as_they_stream_in_any_chunking(chunk: int) -> None:
    inspector = await _watched(_mixed(3001), chunk)
    assert inspector.values.complete and inspector.values.nonfinite is None


@pytest.mark.parametrize("name", ["a", "c", "d", "e"])
@pytest.mark.parametrize("where", [0, 0.5, -1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
async def test_a_bad_value_is_found_while_streaming_even_cut_by_chunks(
    name: str, where: float, bad: float
) -> None:
    state = _mixed(3001)
    state[name][int(where * len(state[name])) if where > 0 else int(where)] = bad
    for chunk in (5, 4093):  # values cut across chunks (odd sizes), and whole
        inspector = await _watched(state, chunk)
        assert inspector.values.nonfinite == name, chunk


async def test_finite_values_whose_sum_overflows_pass() -> None:
    inspector = await _watched({"w": torch.full((1000,), 3e38)}, 4096)
    assert inspector.values.complete and inspector.values.nonfinite is None


async def test_nothing_is_vouched_for_after_a_gap_or_without_the_layout_up_front(tmp_path: Path) -> None:
    # the layout bound only after the body (small bodies): the spooled file is checked instead
    late = await _watched(_mixed(301), 64, early=False)
    assert not late.values.complete
    # a chunk the observer never saw
    state = _mixed(301)
    data = codec.encode_safetensors(state)
    gap = UpdateInspector(spec_of(state))
    await gap.feed(memoryview(data))
    gap.observe(0, memoryview(data)[:100])
    gap.observe(200, memoryview(data)[200:])
    assert not gap.values.complete
    # store_update falls back to the file then, and finds a NaN there
    state["a"][5] = float("nan")
    path, inspector = await _spooled(tmp_path, state)
    assert not inspector.values.complete
    with pytest.raises(ModelFileError, match="'a' contains NaN or infinite"):
        uploads.check_finite(path, inspector)
