"""The values of a streamed safetensors update checked as its bytes pass into the blob writer.

A client update's float values must be finite. Checked on the spooled file after the body, that is
one more read of the whole update (≈ 15 ms of two threads for 68 MB on a 2-core machine), and in a
round's burst every upload does it at about the same moment, at the end: in the close's way. Here
each chunk is summed in the blob writer's worker thread right after it is hashed, while it is still
in cache (:meth:`flplatform.blobs.BlobWriter.observe`), so the check is done when the body is.

A finite sum proves every value finite (NaN and ±inf always reach it; see
:func:`flplatform.aggregation.kernels.all_finite`); a non-finite sum, which finite values can also
give by overflowing, takes the exact check of that piece. Only updates whose header was checked
against the layout before their data arrived (large bodies) are covered; the others, and any gap,
leave :attr:`ValuesWatch.complete` false, and the spooled file is checked as before.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from flplatform.aggregation import codec


@dataclass(frozen=True)
class _FloatRange:
    begin: int  # absolute offsets in the file
    end: int
    dtype: torch.dtype
    name: str


class ValuesWatch:
    """Watches one update's bytes in order (an observer of its blob writer; one thread at a time)."""

    def __init__(self) -> None:
        self.nonfinite: str | None = None  # the first tensor seen with a NaN or infinite value
        self._ranges: list[_FloatRange] | None = None
        self._end = 0  # where the data region ends
        self._upto = 0  # every byte before this was seen
        self._carry = bytearray()  # the first bytes of a value cut by a chunk's end
        self._off = False  # set() never came, or bytes came out of order: nothing vouched for

    def set(
        self, data_start: int, ranges: dict[str, tuple[int, int]], dtypes: dict[str, torch.dtype]
    ) -> None:
        """The checked header's data region (before any of its bytes is written: else nothing is
        vouched for)."""
        if self._upto > data_start:
            self._off = True
        floats = [
            _FloatRange(data_start + begin, data_start + end, dtypes[name], name)
            for name, (begin, end) in ranges.items()
            if dtypes[name].is_floating_point and end > begin
        ]
        self._ranges = sorted(floats, key=lambda r: r.begin)
        self._end = data_start + max((end for begin, end in ranges.values()), default=0)

    @property
    def complete(self) -> bool:
        """Whether every float value of the update passed (finite unless :attr:`nonfinite`)."""
        return not self._off and self._ranges is not None and self._upto >= self._end

    def __call__(self, offset: int, chunk: memoryview) -> None:
        if self._off or self.nonfinite is not None:
            return
        if offset != self._upto:
            self._off = True  # a gap
            return
        stop = offset + len(chunk)
        self._upto = stop
        if self._ranges is None:  # the header's first bytes (set() checks that no data came)
            return
        for item in self._ranges:
            low, high = max(item.begin, offset), min(item.end, stop)
            if low < high and not self._finite(item, chunk[low - offset : high - offset]):
                self.nonfinite = item.name
                return

    def _finite(self, item: _FloatRange, piece: memoryview) -> bool:
        size = codec.ITEMSIZE[item.dtype]
        if self._carry:  # complete the value the last chunk cut
            taken = size - len(self._carry)
            self._carry += piece[:taken]
            piece = piece[taken:]
            if len(self._carry) < size:
                return True
            whole, self._carry = bytes(self._carry), bytearray()
            if not _all_finite(memoryview(whole), item.dtype):
                return False
        cut = len(piece) - len(piece) % size
        self._carry += piece[cut:]
        return _all_finite(piece[:cut], item.dtype)


#: numpy's types for the float dtypes it has (bfloat16 and the float8 kinds: torch, below)
_NUMPY_TYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
#: Elements per torch sum: below ATen's grain size, so a writer thread never starts an OpenMP team
_TORCH_PIECE = 1 << 14


def _all_finite(piece: memoryview, dtype: torch.dtype) -> bool:
    """Whether every value of ``piece`` is finite: its sum, else (overflow or not) the exact test.

    numpy sums in the writer's thread alone, the GIL released. torch's ``sum`` of a 256 kB chunk (the
    size uvicorn hands over) started an OpenMP team from each writer thread, and with 8 uploads at
    once their teams' spinning took more CPU than the uploads' hashing: the burst ran at 270-310 MB/s,
    343-372 without the check at all (2026-12-06)."""
    if not len(piece):
        return True
    kind = _NUMPY_TYPES.get(dtype)
    if kind is not None:
        values = np.frombuffer(piece, dtype=kind)
        with np.errstate(over="ignore", invalid="ignore"):  # (an overflow is answered below)
            total = np.add.reduce(values, dtype=np.float32 if kind is np.float16 else kind)
        return math.isfinite(float(total)) or bool(np.isfinite(values).all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: never written
        values_t = torch.frombuffer(piece, dtype=dtype)
    return all(
        math.isfinite(float(part.sum())) or bool(torch.isfinite(part).all())
        for part in values_t.split(_TORCH_PIECE)
    )
