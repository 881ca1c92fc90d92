"""Defence in depth, run inside the sandbox before a module is accepted: the archive's source
is scanned for ``__setstate__`` before ``torch.jit.load`` (which would run it), then every
method graph of every submodule (inlined, nested blocks included) is checked against an
allowlist of op namespaces and a denylist of file/storage ops."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator

ALLOWED_NAMESPACES = frozenset({"aten", "prim"})
# Ops of the allowed namespaces that reach files, storages, threads or the interpreter.
DENIED_OPS = frozenset({
    "aten::from_file", "aten::save", "aten::set_", "aten::share_memory_", "aten::wait",
    "prim::fork", "prim::awaitable", "prim::awaitable_wait", "prim::rpc_async", "prim::rpc_sync",
    "prim::rpc_remote", "prim::PythonOp",
})  # fmt: skip
_DENIED_WORDS = ("file", "storage", "shared", "mmap", "pickle", "rpc", "save", "load")
# Harmless ops whose names contain a denied word (checked against torch's schema list).
_ALLOWED_DESPITE_WORDS = frozenset({
    "aten::storage_offset", "aten::sym_storage_offset", "prim::profile", "prim::profile_ivalue",
})  # fmt: skip
_SETSTATE = re.compile(rb"\bdef\s+__setstate__\b|\b__setstate__\s*\(")
MAX_CODE_BYTES = 64 * 1024**2


class RefusedModule(ValueError):
    """The module uses something the sandbox refuses; the message names it."""


def prescan_archive(data: bytes | bytearray | memoryview) -> None:
    """Refuse archives whose TorchScript source defines or calls ``__setstate__`` (read from the
    zip's ``code/`` entries; nothing is unpickled or executed)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise RefusedModule(f"The file is not a readable zip archive ({exc}).") from None
    read = 0
    with archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if "code" not in parts[:-1] or info.is_dir():
                continue
            read += info.file_size
            if read > MAX_CODE_BYTES:
                raise RefusedModule(f"The archive holds more than {MAX_CODE_BYTES} bytes of code.")
            with archive.open(info) as entry:
                text = entry.read(MAX_CODE_BYTES + 1)
            if _SETSTATE.search(text):
                raise RefusedModule(
                    f"The archive's code ({info.filename}) defines a custom __setstate__, which runs while "
                    "loading; modules with custom __setstate__ are refused."
                )


def _nodes(block) -> Iterator:  # torch._C.Block / Graph
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def _graphs(module) -> Iterator[tuple[str, object]]:
    import torch

    for prefix, sub in module.named_modules():
        c_module = sub._c
        names = set(c_module._method_names())
        for special in ("__setstate__", "__getstate__"):
            if c_module._has_method(special):
                names.add(special)
        for name in sorted(names):
            graph = c_module._get_method(name).graph.copy()
            torch._C._jit_pass_inline(graph)
            yield (f"{prefix}.{name}" if prefix else name), graph


def check_ops(module) -> int:
    """Raise :class:`RefusedModule` naming the first refused op; returns how many nodes were seen."""
    seen = 0
    for prefix, sub in module.named_modules():
        if sub._c._has_method("__setstate__"):
            where = prefix or "the top-level module"
            raise RefusedModule(f"{where} defines a custom __setstate__, which is refused.")
    for where, graph in _graphs(module):
        for node in _nodes(graph):
            seen += 1
            kind = node.kind()
            namespace, _, op = kind.partition("::")
            lowered = op.lower()
            if (
                namespace not in ALLOWED_NAMESPACES
                or kind in DENIED_OPS
                or (any(word in lowered for word in _DENIED_WORDS) and kind not in _ALLOWED_DESPITE_WORDS)
            ):
                raise RefusedModule(f"The module uses the op {kind} (in {where}), which is refused.")
    return seen
