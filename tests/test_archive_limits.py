"""Zip archives are measured from their central directory before anything loads them (issue 14: a
1 MiB deflated torch.save zip used +1 GiB RSS)."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from flplatform.models import archive_limits
from flplatform.models import files as model_files
from flplatform.settings import Settings

MiB = 1024**2


def deflated_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buf.getvalue()


def torch_save_bomb(expanded: int = 64 * MiB) -> bytes:
    """What torch.save of a state dict looks like, with one storage of zeros deflated."""
    real = io.BytesIO()
    torch.save({"weight": torch.zeros(4)}, real)
    with zipfile.ZipFile(io.BytesIO(real.getvalue())) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    storage = next(name for name in entries if "/data/" in name)
    entries[storage] = bytes(expanded)
    return deflated_zip(entries)


def test_deflate_bomb_torch_save_is_refused_naming_the_limit():
    bomb = torch_save_bomb()
    assert len(bomb) < MiB
    with pytest.raises(model_files.ModelFileError, match="FLP_MAX_ARCHIVE_COMPRESSION_RATIO"):
        model_files.decode_state_dict(bomb)


def test_real_archives_pass():
    buf = io.BytesIO()
    torch.save({"weight": torch.randn(512, 512)}, buf)  # 1 MiB of storage, stored uncompressed
    state, fmt = model_files.decode_state_dict(buf.getvalue())
    assert fmt == model_files.TORCH_STATE_DICT and state["weight"].shape == (512, 512)
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(256, 256)), scripted)
    assert (
        model_files.detect_format(scripted.getvalue()) == model_files.TORCHSCRIPT
    )  # checked, not loaded (the sandbox loads it)


def test_uncompressed_size_and_entry_count_limits(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        archive_limits,
        "get_settings",
        lambda: Settings(max_archive_uncompressed_bytes=2 * MiB, max_archive_entries=10, secret_key="x"),
    )
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(1024, 1024)}, buf)  # 4 MiB, ratio 1
    with pytest.raises(model_files.ModelFileError, match="FLP_MAX_ARCHIVE_UNCOMPRESSED_BYTES"):
        model_files.decode_state_dict(buf.getvalue())
    many = deflated_zip({f"archive/data/{i}": b"x" for i in range(11)} | {"archive/data.pkl": b"\x80"})
    with pytest.raises(model_files.ModelFileError, match="FLP_MAX_ARCHIVE_ENTRIES"):
        model_files.decode_state_dict(many)


async def test_bomb_upload_is_a_400_naming_the_limit(client, alice):
    entries = {
        "archive/code/__torch__.py": b"",
        "archive/data.pkl": b"\x80\x02}q\x00.",
        "archive/data/0": bytes(64 * MiB),
    }
    bomb = deflated_zip(entries)
    resp = await client.post(
        "/api/models/",
        headers=alice.headers,
        data={"name": "bomb", "description": "d"},
        files={"model_file": ("m.pt", bomb)},
    )
    assert resp.status_code == 400, resp.text
    assert "FLP_MAX_ARCHIVE_COMPRESSION_RATIO" in resp.json()["detail"]
