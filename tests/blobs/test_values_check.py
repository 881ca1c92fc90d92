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
