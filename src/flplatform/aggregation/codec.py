"""Zero-copy safetensors decoding, fast safetensors encoding and flat-buffer helpers.

This is the hot path of a round: every update is decoded once, so decoding must cost (almost) nothing.

* :func:`decode_safetensors` parses and checks the header and returns ``torch.frombuffer`` **views** of
  the bytes (no copy): a 100 MB update decodes in microseconds and costs no memory. The views keep the
  bytes object alive and are read-only by contract (the bytes are immutable; never write into them).
  Every header field is checked (dtype, shape, offsets inside the data region, byte count = shape ×
  item size, no overlaps, no duplicate names, header size limit); anything malformed raises
  :class:`~flplatform.aggregation.errors.DecodeError`. A tensor whose data is not aligned to its item
  size (possible in hand-made files) is copied into aligned memory instead of being viewed. Parsed and
  checked headers (≤ 1 MiB) are remembered (LRU, keyed by the header bytes and the data length): the
  updates of a round share one header, so a model of hundreds of small tensors is parsed once per
  round, and each tensor then costs one ``as_strided`` call.
* :func:`encode_safetensors` writes the standard format (readable by ``safetensors.torch.load``) with
  one copy of the tensor bytes, in the same order the ``safetensors`` library uses (dtype, then name),
  so every tensor of one dtype is one contiguous range of the file.
* :class:`FlatLayout` maps a state dict onto one flat buffer per dtype group (tensors in safetensors
  order). An update decoded from a safetensors file written by either library then has each dtype
  group as *one contiguous range of its bytes*, which :meth:`FlatLayout.flat_views` detects, so the
  aggregators touch it with one kernel per group instead of one per tensor.

Nothing here unpickles, imports web or database code, or checks an update against a global model
beyond names, shapes and dtypes (:meth:`FlatLayout.check`).

Size: one module of ~550 lines, because it is one thing, the byte layout of a model. :class:`FlatLayout`
orders its groups in safetensors order precisely so that a decoded update's dtype group is one range
of the wire bytes, and :meth:`FlatLayout.wire_views` reads the decoder's checked (and cached) header
entries; splitting the format from the layout would only turn those private helpers into a
cross-module interface.
"""

from __future__ import annotations

import functools
import json
import struct
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import DecodeError, UpdateValidationError

StateDict = dict[str, torch.Tensor]


class WireState(dict):  # dict[str, torch.Tensor]
    """The state dict :func:`decode_safetensors` returns: zero-copy views, plus ``wire``, the immutable
    ``bytes`` they view (None when the source was mutable or the tensors were copied).

    An aggregator may then hold the update without it costing memory, as long as someone else keeps
    ``wire`` alive anyway (see :func:`held_elsewhere`). ``address`` is the first byte of the views'
    storage: a tensor whose storage starts elsewhere was put in by the caller, not decoded."""

    __slots__ = ("wire", "address")

    def __init__(self, wire: bytes | None = None, address: int | None = None):
        super().__init__()
        self.wire = wire
        self.address = address


def wire_bytes_of(data: bytes | bytearray | memoryview) -> bytes | None:
    """The immutable ``bytes`` object behind ``data`` (itself, or a read-only memoryview's), else None:
    a ``bytearray`` or a writable buffer could be reused by its owner, so views of it must not wait."""
    if type(data) is bytes:
        return data
    if isinstance(data, memoryview) and data.readonly and type(data.obj) is bytes:
        return data.obj
    return None


#: References to the wire bytes that one decoded update holds by itself: ``WireState.wire`` and
#: the frombuffer storage of the views (directly, or through the memoryview that was decoded).
OWN_WIRE_REFERENCES = 2


def held_elsewhere(wire: bytes, holders: int) -> bool:
    """Whether anything besides ``holders`` decoded updates (CPython reference counts) keeps ``wire``
    alive: then holding those updates longer costs no memory. A conservative answer when unsure (a
    memoryview the caller keeps counts as ours), so memory bounds never rest on a wrong True."""
    # Not ours either: this function's parameter and sys.getrefcount's own argument.
    return sys.getrefcount(wire) - 2 > holders * OWN_WIRE_REFERENCES


#: The safetensors header may not exceed this (the reference implementation uses the same limit).
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: safetensors dtype code → torch dtype (every code torch can represent).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _code, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
#: Bytes per element of every dtype above (``torch.empty((), dtype=d)`` per tensor costs microseconds).
ITEMSIZE: dict[torch.dtype, int] = {
    d: torch.empty((), dtype=d).element_size() for d in SAFETENSORS_DTYPES.values()
}
#: Headers up to this size are parsed once and remembered (every update of a round has the same one).
CACHED_HEADER_BYTES = 1 << 20


def _dtype_sort_key(dtype: torch.dtype) -> int:
    # The safetensors library writes tensors sorted by (dtype, descending in its Rust enum, then name).
    # The enum order is BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16,
    # BF16, I32, U32, F32, C64, F64, I64, U64; larger first.
    order = [
        "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
        "I32", "U32", "F32", "C64", "F64", "I64", "U64",
    ]  # fmt: skip
    return -order.index(TORCH_TO_SAFETENSORS[dtype])


def safetensors_order(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names in the order the ``safetensors`` library (and :func:`encode_safetensors`) writes them."""
    try:
        return sorted(state, key=lambda name: (_dtype_sort_key(state[name].dtype), name))
    except KeyError as exc:
        raise UpdateValidationError(f"dtype {exc} cannot be stored in safetensors") from None


# ----------------------------------------------------------------------------------------------------
# decoding


def read_safetensors_header(data: bytes | bytearray | memoryview) -> tuple[dict[str, object], int]:
    """The parsed JSON header and the offset of the data region; raises DecodeError if malformed."""
    start = _data_start(data)
    return _parse_header(bytes(data[8:start])), start


def _data_start(data: bytes | bytearray | memoryview) -> int:
    """Offset of the data region (8 + the header length); DecodeError if the length is impossible."""
    size = len(data)
    if size < 8:
        raise DecodeError("safetensors: the file is shorter than its 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise DecodeError(f"safetensors: header length {header_len} is out of range")
    if header_len > size - 8:
        raise DecodeError(
            f"safetensors: truncated (header says {header_len} header bytes, only {size - 8} follow)"
        )
    return 8 + header_len


def _parse_header(raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"safetensors: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise DecodeError("safetensors: the header is not a JSON object")
    return header


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int
    stride: tuple[int, ...]  # contiguous strides of ``shape``


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _parse_entries(header: Mapping[str, object], data_len: int) -> list[_Entry]:
    entries: list[_Entry] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise DecodeError("safetensors: __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise DecodeError(f"safetensors: entry {name!r} is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise DecodeError(f"safetensors: tensor {name!r} has unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise DecodeError(f"safetensors: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise DecodeError(f"safetensors: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise DecodeError(
                f"safetensors: tensor {name!r} data_offsets [{begin}, {end}] lie outside the "
                f"{data_len}-byte data region (truncated or corrupt file)"
            )
        dtype = SAFETENSORS_DTYPES[code]
        numel = 1
        for d in shape:
            numel *= d
        itemsize = ITEMSIZE[dtype]
        if numel * itemsize != end - begin:
            raise DecodeError(
                f"safetensors: tensor {name!r} of shape {shape} and dtype {code} needs "
                f"{numel * itemsize} bytes, its offsets span {end - begin}"
            )
        entries.append(_Entry(name, dtype, tuple(shape), begin, end, _contiguous_strides(tuple(shape))))
    ordered = sorted(entries, key=lambda e: (e.begin, e.end))
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after.begin < before.end:
            raise DecodeError(f"safetensors: tensors {before.name!r} and {after.name!r} overlap")
    return ordered


@functools.lru_cache(maxsize=32)
def _cached_entries(raw_header: bytes, data_len: int) -> tuple[_Entry, ...]:
    # Every update of a round carries the same header (same names, dtypes, shapes and offsets), so
    # parsing and checking it once per round instead of once per update saves microseconds per
    # tensor: for a model of hundreds of small tensors that is most of the decoding time. A header
    # that fails raises DecodeError, which lru_cache does not remember.
    return tuple(_parse_entries(_parse_header(raw_header), data_len))


def _entries(data: bytes | bytearray | memoryview) -> tuple[tuple[_Entry, ...], int]:
    size = len(data)
    start = _data_start(data)
    raw = bytes(data[8:start])
    if start - 8 <= CACHED_HEADER_BYTES:
        return _cached_entries(raw, size - start), start
    return tuple(_parse_entries(_parse_header(raw), size - start)), start


def decode_safetensors(data: bytes | bytearray | memoryview, *, copy: bool = False) -> StateDict:
    """Tensors of a safetensors file as zero-copy views of ``data`` (ordered by position in the file).

    ``copy=True`` returns independent tensors instead (one copy, still no extra parse cost). The views
    hold a reference to ``data``; ``data`` must not be mutated while they are used. Raises
    :class:`DecodeError` for any malformed or truncated file.
    """
    entries, start = _entries(data)
    out = WireState(None if copy else wire_bytes_of(data))
    if not entries:
        out.wire = None
        return out
    with warnings.catch_warnings():
        # bytes are read-only buffers; torch warns because writing into the view would be undefined
        # behaviour. We never write into update views (documented contract), so silence it.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    base = raw.data_ptr()
    out.address = base
    little = sys.byteorder == "little"
    typed: dict[torch.dtype, torch.Tensor] = {}  # the whole buffer as each dtype, for as_strided views
    for e in entries:
        begin = start + e.begin
        nbytes = e.end - e.begin
        itemsize = ITEMSIZE[e.dtype]
        if nbytes == 0:
            tensor = torch.empty(e.shape, dtype=e.dtype)
        elif little and base % itemsize == 0 and begin % itemsize == 0:
            whole = typed.get(e.dtype)
            if whole is None:
                whole = typed[e.dtype] = torch.empty(0, dtype=e.dtype).set_(
                    raw.untyped_storage(), 0, (len(data) // itemsize,), (1,)
                )
            # one C++ call per tensor (slicing bytes, then two views, cost three)
            tensor = whole.as_strided(e.shape, e.stride, begin // itemsize)
            if copy:
                tensor = tensor.clone()
        else:
            piece = raw[begin : begin + nbytes]
            # Misaligned (hand-made file) or big-endian host: copy into aligned memory.
            aligned = piece.clone()
            if not little:
                aligned = aligned.view(-1, itemsize).flip(1).reshape(-1)
            tensor = aligned.view(e.dtype).view(e.shape)
        out[e.name] = tensor
    return out


# ----------------------------------------------------------------------------------------------------
# encoding


def encode_safetensors(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Standard safetensors bytes of ``state`` (one copy of the tensor data).

    Tensors are written in the ``safetensors`` library's order, so a file written here and one written
    by ``safetensors.torch.save`` have the same layout, and each dtype group is one contiguous range.
    Tensors may share storage (e.g. views of one flat buffer); each is written on its own.
    """
    names = safetensors_order(state)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    tensors: list[torch.Tensor] = []
    for name in names:
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise UpdateValidationError(f"{name!r} is not a tensor")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        tensors.append(tensor)
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    # Pad the header with spaces so the data region starts 8-byte aligned (as the library does).
    head += b" " * (-(8 + len(head)) % 8)
    total = 8 + len(head) + offset
    buffer = bytearray(total)
    struct.pack_into("<Q", buffer, 0, len(head))
    buffer[8 : 8 + len(head)] = head
    if offset:
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
        position = 8 + len(head)
        for tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes:
                source = tensor.contiguous().reshape(-1).view(torch.uint8)
                raw[position : position + nbytes].copy_(source)
            position += nbytes
        del raw
    return bytes(buffer)


# ----------------------------------------------------------------------------------------------------
# flat buffers


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in its dtype group's flat buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in elements, inside the group buffer
    numel: int


class FlatLayout:
    """One flat buffer per dtype; inside a group, tensors in safetensors order (sorted by name).

    ``layout.groups`` maps each dtype to its slots; ``layout.numel[dtype]`` is the group's length;
    ``layout.names`` keeps the reference state dict's own key order (used for results).
    """

    def __init__(self, reference: Mapping[str, torch.Tensor]):
        if not reference:
            raise UpdateValidationError("the model has no tensors")
        self.names: list[str] = list(reference)
        self.slots: dict[str, TensorSlot] = {}
        self.groups: dict[torch.dtype, list[TensorSlot]] = {}
        self.numel: dict[torch.dtype, int] = {}
        for name in safetensors_order(reference):
            tensor = reference[name]
            dtype = tensor.dtype
            group = self.groups.setdefault(dtype, [])
            offset = self.numel.get(dtype, 0)
            slot = TensorSlot(name, dtype, tuple(tensor.shape), offset, tensor.numel())
            group.append(slot)
            self.slots[name] = slot
            self.numel[dtype] = offset + slot.numel
        self.name_set = frozenset(self.names)
        # header entries (the decoder's cached tuple) -> byte range per dtype group, or None
        self._wire_plans: dict[int, tuple[tuple[_Entry, ...], dict[torch.dtype, tuple[int, int]] | None]] = {}
        # per group, its non-empty slots (empty tensors live anywhere): flat_view runs once per update
        self._placed = {d: [slot for slot in group if slot.numel] for d, group in self.groups.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of one model in its own dtypes."""
        return sum(n * torch.empty((), dtype=d).element_size() for d, n in self.numel.items())

    @property
    def floating_dtypes(self) -> list[torch.dtype]:
        return [d for d in self.groups if d.is_floating_point]

    def check(self, state: Mapping[str, torch.Tensor], what: str = "the update") -> None:
        """Same names, shapes and dtypes as the layout, else UpdateValidationError."""
        if not isinstance(state, Mapping):
            raise UpdateValidationError(f"{what} is not a mapping of names to tensors")
        if len(state) != len(self.names) or state.keys() != self.name_set:
            missing = sorted(self.name_set - set(state))[:5]
            extra = sorted(set(state) - self.name_set)[:5]
            raise UpdateValidationError(
                f"{what} does not match the model: missing {missing}, unexpected {extra}"
            )
        for name, slot in self.slots.items():
            tensor = state[name]
            if not isinstance(tensor, torch.Tensor):
                raise UpdateValidationError(f"{what}: {name!r} is not a tensor")
            if tensor.dtype != slot.dtype:
                raise UpdateValidationError(
                    f"{what}: tensor {name!r} has dtype {tensor.dtype}, the model has {slot.dtype}"
                )
            if tuple(tensor.shape) != slot.shape:
                raise UpdateValidationError(
                    f"{what}: tensor {name!r} has shape {list(tensor.shape)}, the model has {list(slot.shape)}"
                )

    def flat_view(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
        """The group as ONE 1-D view when its tensors are back to back in memory in layout order.

        That is the case for updates decoded by :func:`decode_safetensors` from files written by the
        safetensors library or :func:`encode_safetensors`, and for results of the aggregators. Returns
        None otherwise (callers then work tensor by tensor).
        """
        slots = self._placed[dtype]
        if not slots:
            return torch.empty(0, dtype=dtype)
        first = state[slots[0].name]
        if not first.is_contiguous() or first.device.type != "cpu":
            return None
        if len(slots) == 1 and slots[0].numel == self.numel[dtype]:
            return first.reshape(-1)
        itemsize = first.element_size()
        storage = first.untyped_storage()
        base = first.data_ptr() - slots[0].offset * itemsize  # address of the group's element 0
        for slot in slots[1:]:
            tensor = state[slot.name]
            # No per-tensor storage check (it costs a Python object per tensor): the range is checked
            # to lie inside ``first``'s storage below, and a tensor found at the expected address
            # inside it reads the very same bytes, whichever storage object it belongs to.
            if tensor.data_ptr() != base + slot.offset * itemsize or not tensor.is_contiguous():
                return None
        start = first.storage_offset() - slots[0].offset
        if start < 0 or (start + self.numel[dtype]) * itemsize > storage.nbytes():
            return None
        return first.new_empty(0).set_(storage, start, (self.numel[dtype],), (1,))

    def wire_views(self, data: bytes | bytearray | memoryview) -> dict[torch.dtype, torch.Tensor] | None:
        """One flat zero-copy view per dtype group of safetensors ``data``, without a tensor per entry.

        The header is parsed and checked against the layout once per distinct header (every update
        of a round has the same one); after that an update costs one ``frombuffer`` and one view per
        dtype. Raises :class:`DecodeError` for malformed bytes and :class:`UpdateValidationError`
        when names, shapes or dtypes differ from the model. Returns None when a group is not one
        contiguous, aligned range of the file in layout order (then decode it tensor by tensor).
        """
        entries, start = _entries(data)
        cached = self._wire_plans.get(id(entries))
        if cached is None or cached[0] is not entries:
            if len(self._wire_plans) >= 8:
                self._wire_plans.clear()
            cached = self._wire_plans[id(entries)] = (entries, self._wire_plan(entries))
        plan = cached[1]
        if plan is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only bytes: we never write into views
            raw = (
                torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
            )
        base = raw.data_ptr()
        views: dict[torch.dtype, torch.Tensor] = {}
        for dtype, (begin, end) in plan.items():
            itemsize = ITEMSIZE[dtype]
            if end == begin:
                views[dtype] = torch.empty(0, dtype=dtype)
                continue
            offset = start + begin
            if (base + offset) % itemsize or sys.byteorder != "little":
                return None
            views[dtype] = torch.empty(0, dtype=dtype).set_(
                raw.untyped_storage(), offset // itemsize, ((end - begin) // itemsize,), (1,)
            )
        return views

    def _wire_plan(self, entries: tuple[_Entry, ...]) -> dict[torch.dtype, tuple[int, int]] | None:
        # The same checks (and messages) as for a state dict, on shape-only stand-ins.
        self.check({e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in entries})
        by_name = {e.name: e for e in entries}
        plan: dict[torch.dtype, tuple[int, int]] = {}
        for dtype, slots in self.groups.items():
            placed = [by_name[slot.name] for slot in slots if slot.numel]
            if not placed:
                plan[dtype] = (0, 0)
                continue
            if any(after.begin != before.end for before, after in zip(placed, placed[1:], strict=False)):
                return None
            plan[dtype] = (placed[0].begin, placed[-1].end)
        return plan

    def tensors(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """The group's tensors of ``state`` flattened to 1-D, in layout order."""
        return [state[slot.name].reshape(-1) for slot in self.groups[dtype]]

    def views(
        self,
        flat: Mapping[torch.dtype, torch.Tensor],
        ready: Mapping[torch.dtype, list[torch.Tensor]] | None = None,
    ) -> StateDict:
        """A state dict (in the reference's key order) of views into one flat buffer per group;
        ``ready``: groups whose views, shaped and in layout order, exist already."""
        made = {
            slot.name: view
            for dtype, views in (ready or {}).items()
            for slot, view in zip(self.groups[dtype], views, strict=True)
        }
        out: StateDict = {}
        for name in self.names:
            view = made.get(name)
            if view is None:
                slot = self.slots[name]
                view = flat[slot.dtype][slot.offset : slot.offset + slot.numel].view(slot.shape)
            out[name] = view
        return out

    def slot_views(self, flat: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """1-D views of ``flat`` (a buffer of the group's length, any dtype) per tensor, layout order."""
        return [flat[s.offset : s.offset + s.numel] for s in self.groups[dtype]]

    def flatten(
        self, state: Mapping[str, torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy of the group into one flat buffer (``out`` if given; converted to its dtype)."""
        if out is None:
            out = torch.empty(self.numel[dtype], dtype=dtype)
        view = self.flat_view(state, dtype)
        if view is not None:
            out.copy_(view)
        else:
            targets = self.slot_views(out, dtype)
            torch._foreach_copy_(targets, self.tensors(state, dtype))
        return out


def chunk_ranges(length: int, chunk: int) -> Iterable[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(length)`` in steps of ``chunk``."""
    for start in range(0, length, chunk):
        yield start, min(length, start + chunk)
