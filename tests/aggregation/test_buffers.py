"""A kept accumulator buffer (aggregation.buffers.reserve, or a lent one given back when freed) is
faulted in and taken by the next buffer that fits it: between half of it and all of it; smaller
requests are unaffected, and a release gives it back to the system."""

from __future__ import annotations

import ctypes
import gc
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
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffers._reserved))  # type: ignore[arg-type]
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


def test_a_freed_buffer_is_kept_for_the_next_one() -> None:
    first = buffers.new_buffer(MIB, torch.float32)  # 4 MiB
    address = first.data_ptr()
    view = first[10:20].view(2, 5)
    del first
    assert buffers.reserved_bytes() == 0  # a view still holds it
    del view
    assert buffers.reserved_bytes() == 4 * MIB
    again = buffers.new_buffer(3 * MIB // 8, torch.float64)  # 3 MiB: between half and all of it
    assert again.data_ptr() == address and buffers.reserved_bytes() == 0
    again.fill_(2.0)
    assert float(again.sum()) == 2.0 * again.numel()


def test_the_larger_freed_buffer_is_the_one_kept() -> None:
    large = buffers.new_buffer(2 * MIB, torch.float32)  # 8 MiB
    small = buffers.new_buffer(MIB, torch.float32)  # 4 MiB
    del large
    del small
    gc.collect()
    assert buffers.reserved_bytes() == 8 * MIB


def test_results_of_fedavg_come_back_when_let_go() -> None:
    from flplatform.aggregation import fedavg

    states = [{"w": torch.full((MIB,), float(i)), "b": torch.ones(3)} for i in range(3)]
    mean = fedavg((state, 1.0) for state in states)
    assert float(mean["w"][0]) == 1.0 and buffers.reserved_bytes() == 0
    address = mean["w"].data_ptr()
    del mean
    assert buffers.reserved_bytes() >= 4 * MIB
    again = fedavg((state, 1.0) for state in states)
    assert again["w"].data_ptr() == address and torch.equal(again["w"], torch.full((MIB,), 1.0))
