"""A memory-mapped update's pages are dropped behind the fold (issue 21): its file-backed resident
memory stays a few chunks, not the update's size, and the result is bitwise the same."""

from __future__ import annotations

import mmap
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from flplatform import aggregation
from flplatform.aggregation import encode_safetensors, kernels, ordering
from flplatform.blobs.mapped import PageReleaser

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"),
    reason="reads /proc/self/smaps; needs MADV_DONTNEED",
)

MIB = 1 << 20
PAGE = mmap.PAGESIZE


def rss(path: Path) -> int:
    """Bytes of ``path``'s mappings resident in this process (/proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's header
                ours = len(head) == 6 and head[5].strip() == str(path)
            elif ours and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def map_file(path: Path) -> tuple[mmap.mmap, memoryview]:
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return mapping, memoryview(mapping)


def test_releaser_drops_only_whole_pages_inside_the_range(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    size = 5 * PAGE + 100
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    mapping, view = map_file(path)
    releaser = PageReleaser(view)
    base = releaser.base
    assert base and releaser.size == size
    assert releaser.pages(base + 1, 2 * PAGE) == (PAGE, PAGE)  # interior of [1, 2P + 1)
    assert releaser.pages(base, 2 * PAGE) == (0, 2 * PAGE)
    assert releaser.pages(base + 1, PAGE) is None  # no whole page inside
    assert releaser.pages(base + PAGE + 5, size - PAGE - 5) == (2 * PAGE, size - 2 * PAGE)  # the tail
    assert releaser.pages(base - 1, 10) is None  # not ours
    assert releaser.pages(base + size - 10, 11) is None
    assert releaser.pages(base, 0) is None

    assert bytes(view) == path.read_bytes()  # touch every page
    assert rss(path) >= size - PAGE
    releaser(base + 1, size - 1)  # every page but the first
    assert rss(path) <= 2 * PAGE
    assert bytes(view) == path.read_bytes()  # read back from the page cache, the same bytes
    releaser(base - PAGE, PAGE)  # outside: ignored


def _update(seed: int, numel: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(numel, generator=generator) * (seed + 1),
        "b": torch.randn(1000, generator=generator),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def test_folding_a_mapped_update_keeps_few_of_its_pages_resident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "RELEASE_BYTES", MIB)
    monkeypatch.setattr(kernels, "_fold_workers", lambda: 2)  # the same bound on any machine
    path = tmp_path / "update.safetensors"
    path.write_bytes(encode_safetensors(_update(1, 16 * MIB)))  # 64 MiB of float32
    size = path.stat().st_size

    def fold(release: bool) -> tuple[int, int]:
        agg = aggregation.get("fedavg", accumulate_dtype="float64")
        agg.track_order = True  # the order bound reads the update too
        agg.begin(None)
        mapping, view = map_file(path)
        peak = [0]
        lock = threading.Lock()
        releaser = PageReleaser(view)

        def sampled(address: int, nbytes: int) -> None:  # the resident size just before each release
            resident = rss(path)
            with lock:
                peak[0] = max(peak[0], resident)
            releaser(address, nbytes)

        agg.add(view, 2.0, release=sampled if release else None)
        agg.fold_pending()
        after = rss(path)
        del agg, view, mapping  # unmapped once the last view is gone (at return)
        return peak[0], after

    peak, after = fold(release=True)
    assert 0 < peak < size // 2  # measured 12–14 MiB: a few 2 MiB folios per fold thread and piece
    assert after < 4 * MIB
    _, kept = fold(release=False)  # the control: without the hook the whole update stays resident
    assert kept > size * 3 // 4


def test_released_pages_read_back_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folded with the pages dropped every 64 KiB, then settled and redone from the same (released)
    maps: bitwise the result of folding without releasing."""
    monkeypatch.setattr(kernels, "RELEASE_BYTES", 64 << 10)
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"u{seed}.safetensors")
        paths[-1].write_bytes(encode_safetensors(_update(seed, 1_000_003)))
    weights = [3.0, 5.0, 11.0]

    def run(release: bool) -> dict[str, torch.Tensor]:
        maps = [map_file(path) for path in paths]
        agg = aggregation.get("fedavg", accumulate_dtype="float64")
        agg.track_order = True
        agg.begin(None)
        for (_, view), weight in reversed(list(zip(maps, weights, strict=True))):  # arrival order
            agg.add(view, weight, release=PageReleaser(view) if release else None)
            agg.fold_pending()
        if agg.settle():
            for (_, view), weight in zip(maps, weights, strict=True):  # the fixed order
                agg.redo(view, weight, release=PageReleaser(view) if release else None)
        result, _ = agg.finish()
        return {k: v.clone() for k, v in result.items()}

    released, plain = run(True), run(False)
    assert released.keys() == plain.keys()
    for key in plain:
        assert torch.equal(released[key], plain[key]), key


def test_redo_reads_the_listed_coordinates_a_window_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close's recompute reads coordinates listed all over an update: with the release hook at
    most a few windows of the mapping are resident at once, and the sums are those read whole."""
    monkeypatch.setattr(ordering, "RELEASE_BYTES", MIB)
    path = tmp_path / "update.f32"
    values = torch.randn(16 * MIB, generator=torch.Generator().manual_seed(7))  # 64 MiB
    path.write_bytes(values.numpy().tobytes())
    size = path.stat().st_size
    index = torch.arange(3, values.numel(), 997)  # sorted, on every page

    def redo(release: bool) -> tuple[torch.Tensor, int]:
        mapping, view = map_file(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer, only read
            flat = torch.frombuffer(view, dtype=torch.float32)
        releaser, peak = PageReleaser(view), [0]

        def sampled(address: int, nbytes: int) -> None:
            peak[0] = max(peak[0], rss(path))
            releaser(address, nbytes)

        redo = ordering.Redo(layout=None)  # type: ignore[arg-type]  # the layout is read only for whole groups
        redo.want(torch.float32, index, torch.float64)
        redo.add({torch.float32: flat}, 2.0, release=sampled if release else None)
        peak[0] = max(peak[0], rss(path))
        sums = redo.sums[torch.float32].clone()
        del flat, view, mapping
        return sums, peak[0]

    released, peak = redo(release=True)
    plain, kept = redo(release=False)
    assert torch.equal(released, plain)
    assert torch.equal(plain, values.index_select(0, index).to(torch.float64).mul_(2.0))
    assert 0 < peak < size // 4  # a window and a folio or two at a time
    assert kept > size * 3 // 4  # the control: read whole, the update stays resident
