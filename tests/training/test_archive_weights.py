"""A TorchScript archive's weights replaced without the sandbox (models/archive_weights.py): the
storage plan is learnt by content and only when it is unambiguous; the rebuilt archive loads with
the new weights and keeps every other entry byte for byte."""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib

import torch

from flplatform.models import files as model_files
from flplatform.models.archive_weights import fits, replace_weights, storage_plan


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.bn(self.a(x)))


def _saved(module: torch.jit.ScriptModule) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def _moved(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.rand(v.shape, generator=g) if v.is_floating_point() else v + seed
        for k, v in state.items()
    }


def test_weights_are_replaced_in_the_archive_and_everything_else_is_kept():
    torch.manual_seed(0)
    net = torch.jit.script(Net())
    state = _moved({k: v.clone() for k, v in net.state_dict().items()}, 1)
    net.load_state_dict(state)
    archive = _saved(net)
    plan = storage_plan(archive, state)
    assert plan is not None and set(plan) == set(state)
    new = _moved(state, 2)
    assert fits(archive, plan, new)
    rebuilt = bytes(replace_weights(archive, plan, new))
    loaded = torch.jit.load(io.BytesIO(rebuilt))
    assert all(torch.equal(loaded.state_dict()[k], new[k]) for k in new)
    assert loaded(torch.randn(3, 8)).shape == (3, 2)
    with zipfile.ZipFile(io.BytesIO(archive)) as before, zipfile.ZipFile(io.BytesIO(rebuilt)) as after:
        assert before.namelist() == after.namelist()
        assert all(info.flag_bits & 0x800 for info in after.infolist())  # UTF-8 names, like torch's
        planned = set(plan.values())
        for name in before.namelist():
            if name not in planned:
                assert before.read(name) == after.read(name), name
    # the plan holds for its own output (the next round)
    assert fits(rebuilt, plan, _moved(new, 3))


def test_the_rebuilt_archives_checksums_are_zlibs():
    """zipfile's CRC-32 is ISA-L's here (archive_weights: faster); every entry's recorded CRC is
    still the one zlib computes, also for storages of several MB written in one call."""
    torch.manual_seed(0)
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 3)))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    archive = _saved(net)
    plan = storage_plan(archive, state)
    assert plan is not None
    rebuilt = bytes(replace_weights(archive, plan, _moved(state, 4)))
    with zipfile.ZipFile(io.BytesIO(rebuilt)) as after:
        assert after.testzip() is None
        for info in after.infolist():
            assert info.CRC == zlib.crc32(after.read(info.filename)), info.filename


def test_no_plan_when_tensors_have_equal_bytes_or_the_sizes_differ():
    net = torch.jit.script(Net())  # fresh BatchNorm: running_var and weight are both ones
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert storage_plan(_saved(net), state) is None
    moved = _moved(state, 1)
    net.load_state_dict(moved)
    archive = _saved(net)
    plan = storage_plan(archive, moved)
    assert plan is not None
    assert not fits(archive, plan, {**moved, "a.weight": torch.zeros(5, 8)})
    assert not fits(archive, {k: v for k, v in plan.items() if k != "a.bias"}, moved)


async def test_the_model_sandbox_reads_the_rebuilt_archive():
    torch.manual_seed(1)
    net = torch.jit.script(Net())
    state = _moved({k: v.clone() for k, v in net.state_dict().items()}, 1)
    net.load_state_dict(state)
    archive = _saved(net)
    plan = storage_plan(archive, state)
    assert plan is not None
    new = _moved(state, 2)
    rebuilt = bytes(replace_weights(archive, plan, new))
    extracted, _ = await model_files.decode_state_dict_async(rebuilt)  # in the sandbox
    assert all(torch.equal(extracted[k], new[k]) for k in new)


async def test_the_rebuilt_archive_streams_from_a_file_into_a_blob_byte_for_byte(tmp_path, monkeypatch):
    """The round's close: the template read piecewise from its blob's file, the new archive written
    entry by entry into the store (no buffer), the same bytes as in memory; hashed as it was
    written (its zip headers final from the start), not read back."""
    from flplatform.blobs import FileBlobStore, hashed_writes
    from flplatform.models.archive_weights import write_replaced

    as_written: list[str | None] = []
    finish = hashed_writes.HashedWrites.finish

    def recorded(self: hashed_writes.HashedWrites, length: int) -> str | None:
        digest = finish(self, length)
        if length:
            as_written.append(digest)
        return digest

    monkeypatch.setattr(hashed_writes.HashedWrites, "finish", recorded)

    torch.manual_seed(1)
    net = torch.jit.script(Net())
    state = _moved({k: v.clone() for k, v in net.state_dict().items()}, 3)
    net.load_state_dict(state)
    archive = _saved(net)
    plan = storage_plan(archive, state)
    assert plan is not None
    new = _moved(state, 4)
    in_memory = bytes(replace_weights(archive, plan, new))
    template = tmp_path / "template.pt"
    template.write_bytes(archive)
    assert fits(str(template), plan, new)
    store = FileBlobStore(tmp_path / "blobs")
    info = await store.writer().commit_built(lambda sink: write_replaced(str(template), plan, new, sink))
    assert info.size == len(in_memory)
    assert await store.read(info.digest) == in_memory
    assert as_written == [info.digest] and info.digest == hashlib.sha256(in_memory).hexdigest()
    assert not list(store.spool.glob("*.part"))  # the temporary file became the blob
