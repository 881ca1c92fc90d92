"""A reserved accumulator buffer (aggregation.buffers.reserve) is faulted in ahead of need and taken
by the next buffer that fits it: between half of it and all of it; smaller requests and other
processes' state are unaffected, and a release gives it back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from flplatform.aggregation import buffers

MIB = 1 << 20


@pytest.fixture(autouse=True)
def no_reservation() -> Iterator[None]:
    buffers.release_reserved()
    yield
    buffers.release_reserved()


def test_the_next_buffer_that_fits_takes_the_reservation() -> None:
    buffers.reserve(8 * MIB)
    assert buffers.reserved_bytes() == 8 * MIB
    small = buffers.new_buffer(MIB // 8, torch.float64)  # 1 MiB: under half of it, fresh memory
    assert buffers.reserved_bytes() == 8 * MIB
    taken = buffers.new_buffer(6 * MIB // 8, torch.float64)
    assert buffers.reserved_bytes() == 0
    assert taken.dtype == torch.float64 and taken.numel() == 6 * MIB // 8
    taken.fill_(1.5)  # writable, and its own memory
    small.fill_(2.0)
    assert float(taken.sum()) == 1.5 * taken.numel()
    again = buffers.new_buffer(6 * MIB // 8, torch.float64)  # taken once: the next one is fresh
    assert again.data_ptr() != taken.data_ptr()


def test_the_reservation_is_the_buffer_handed_out() -> None:
    buffers.reserve(4 * MIB)
    address = buffers._reserved.data_ptr()  # type: ignore[union-attr]
    assert buffers.new_buffer(MIB, torch.float32).data_ptr() == address  # 4 MiB of float32


def test_one_reservation_per_process_the_larger_kept() -> None:
    buffers.reserve(4 * MIB)
    buffers.reserve(3 * MIB)  # smaller: kept as it is
    assert buffers.reserved_bytes() == 4 * MIB
    buffers.reserve(6 * MIB)
    assert buffers.reserved_bytes() == 6 * MIB
    assert buffers.release_reserved() == 6 * MIB
    assert buffers.reserved_bytes() == 0 and buffers.release_reserved() == 0


def test_too_small_to_reserve() -> None:
    buffers.reserve(buffers.HUGE_PAGE_MIN_BYTES - 1)
    assert buffers.reserved_bytes() == 0
