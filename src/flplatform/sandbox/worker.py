"""The sandbox worker: a separate interpreter (``python -I -m flplatform.sandbox``, started by
:mod:`flplatform.sandbox.runner` with a clean environment, an empty working directory and no
inherited descriptors besides its three pipes) that does all TorchScript work.

Start-up: read the configuration frame (trusted, from the server), import everything, confine
itself (:mod:`flplatform.sandbox.confine`), warm up, answer ``ready`` with the confinement report.
Then one request at a time on stdin, one answer on stdout; errors are answers too
(``{"error": {"kind": ..., "message": ...}}``). Loaded modules are cached by the server's key.
"""

from __future__ import annotations

import io
import sys
import traceback
from collections import OrderedDict
from typing import Any

from flplatform.sandbox import protocol
from flplatform.sandbox.protocol import Blob, WorkerError

Answer = tuple[dict[str, Any], list[Blob]]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class Worker:
    def __init__(self, config: dict[str, Any]):
        import torch

        self.torch = torch
        self.cache: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.cache_entries = int(config.get("cache_entries", 16))
        self.cache_bytes = int(config.get("cache_bytes", 1024**3))
        self.max_blob_bytes = int(config.get("max_blob_bytes", 4 * 1024**3))

    # ------------------------------------------------------------------ loading

    def load(self, data: Blob, what: str = "model", *, consume: bool = False) -> Any:
        """Scan, load and check an archive (every load: the archive is untrusted). ``consume``: the
        received buffer is freed once copied into the ``bytes`` torch loads from (it copies a
        ``bytearray`` anyway, and again into its own string): 3× the archive at the peak, not 4×."""
        from flplatform.sandbox.opcheck import RefusedModule, check_ops, prescan_archive

        if data[:4] != b"PK\x03\x04":
            raise WorkerError("invalid", f"The {what} is not a TorchScript archive (torch.jit.save).")
        try:
            prescan_archive(data)
        except RefusedModule as exc:
            raise WorkerError("refused", str(exc)) from None
        if consume and isinstance(data, bytearray):
            raw = bytes(data)  # what io.BytesIO(data) would copy
            data.clear()
            data = raw
        try:
            module = self.torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as exc:  # noqa: BLE001  (untrusted code raises anything)
            raise WorkerError(
                "invalid", f"Could not load the TorchScript archive: {_first_line(exc)}"
            ) from None
        try:
            check_ops(module)
        except RefusedModule as exc:
            raise WorkerError("refused", str(exc)) from None
        module.eval()
        return module

    def cached(self, key: str) -> Any | None:
        entry = self.cache.get(key)
        if entry is None:
            return None
        self.cache.move_to_end(key)
        return entry[0]

    def remember(self, key: str, module: Any, size: int) -> None:
        if self.cache_entries == 0 or size > self.cache_bytes:
            return
        self.cache[key] = (module, size)
        while (
            len(self.cache) > self.cache_entries or sum(s for _, s in self.cache.values()) > self.cache_bytes
        ):
            self.cache.popitem(last=False)

    # ------------------------------------------------------------------ operations

    def op_ping(self, message: dict[str, Any], blobs: list[bytearray]) -> Answer:
        return {"pong": True}, []

    def op_probe(self, message: dict[str, Any], blobs: list[bytearray]) -> Answer:
        """Diagnostics for the confinement tests: try what hostile code would, report what failed."""
        import os
        import socket

        results: dict[str, str] = {}
        for path in message.get("read", []):
            try:
                with open(path, "rb") as f:
                    f.read(16)
                results[f"read {path}"] = "allowed"
            except OSError as exc:
                results[f"read {path}"] = f"denied: {exc.strerror}"
        for path in message.get("write", []):
            try:
                with open(path, "wb") as f:
                    f.write(b"x")
                results[f"write {path}"] = "allowed"
            except OSError as exc:
                results[f"write {path}"] = f"denied: {exc.strerror}"
        for host, port in message.get("connect", []):
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.settimeout(2)
                    sock.connect((host, port))
                    results[f"connect {host}:{port}"] = "allowed"
            except OSError as exc:
                results[f"connect {host}:{port}"] = f"denied: {exc.strerror or exc}"
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - must never happen
                os._exit(0)
            results["fork"] = "allowed"
        except OSError as exc:
            results["fork"] = f"denied: {exc.strerror}"
        return {"results": results, "uid": os.getuid(), "cwd": os.getcwd(), "env": sorted(os.environ)}, []

    def op_check(self, message: dict[str, Any], blobs: list[bytearray]) -> Answer:
        kind = message.get("kind", "model")
        module = self.load(
            blobs[0], "preprocessing module" if kind == "preprocessing" else "model", consume=True
        )
        reply: dict[str, Any] = {"ok": True, "parameters": sum(p.numel() for p in module.parameters())}
        if kind == "model":
            for name, tensor in module.state_dict().items():
                if tensor.is_floating_point() and not bool(self.torch.isfinite(tensor).all()):
                    raise WorkerError("invalid", f"Tensor {name!r} contains NaN or infinite values.")
            if message.get("layout"):
                reply["layout"] = self._layout(module.state_dict())
        return reply, []

    def _layout(self, state: Any) -> dict[str, list[Any]]:
        """``{name: [dtype, shape, sha256 of the tensor's bytes]}``: the server stores the layout
        (updates are checked against it) and finds each tensor's storage in the archive by content
        (its storage plan), so nothing decodes this model again for either."""
        import hashlib

        layout: dict[str, list[Any]] = {}
        for name, tensor in state.items():
            flat = tensor.detach().contiguous().reshape(-1)
            digest = hashlib.sha256()
            if flat.numel():
                digest.update(flat.view(self.torch.uint8).numpy().data)
            dtype = str(tensor.dtype).removeprefix("torch.")
            layout[name] = [dtype, list(tensor.shape), digest.hexdigest()]
        return layout

    def op_extract(self, message: dict[str, Any], blobs: list[bytearray]) -> Answer:
        from flplatform.aggregation.codec import encode_safetensors

        module = self.load(blobs[0])
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        if not state and message.get("attributes"):
            state = {k: v.detach().contiguous() for k, v in module.named_attributes()
                     if isinstance(v, self.torch.Tensor)}  # fmt: skip
        names = [name for name, _ in module.named_parameters()]
        return {"parameters": names}, [encode_safetensors(state)]

    def op_rebuild(self, message: dict[str, Any], blobs: list[bytearray]) -> Answer:
        from flplatform.aggregation.codec import decode_safetensors

        module = self.load(blobs[0])
        state = decode_safetensors(blobs[1], copy=True)
        current = module.state_dict()
        unknown = sorted(set(state) - set(current))
        if unknown:
            raise WorkerError("invalid", f"The new weights name tensors the template lacks: {unknown[:5]}")
        with self.torch.no_grad():
            for name, tensor in state.items():
                if tuple(tensor.shape) != tuple(current[name].shape):
                    raise WorkerError(
                        "invalid",
                        f"Tensor {name!r} has shape {list(tensor.shape)}, the template "
                        f"has {list(current[name].shape)}.",
                    )
                current[name].copy_(tensor.to(current[name].dtype))
        buffer = io.BytesIO()
        self.torch.jit.save(module, buffer)
        return {}, [buffer.getvalue()]

    def op_mean(self, message: dict[str, Any], blobs: list[bytearray]) -> Answer:
        from flplatform.sandbox.mean_module import build_mean_module

        modules = [self.load(blob) for blob in blobs]
        try:
            scripted = build_mean_module(modules)
        except Exception as exc:  # noqa: BLE001  (untrusted code raises anything)
            raise WorkerError(
                "invalid",
                f"Could not combine the member models into one TorchScript module: {_first_line(exc)}",
            ) from None
        buffer = io.BytesIO()
        self.torch.jit.save(scripted, buffer)
        return {}, [buffer.getvalue()]

    def _modules(
        self, message: dict[str, Any], blobs: list[bytearray], first: int
    ) -> dict[str, Any] | list[str]:
        """The modules the request names, from the cache or the attached archives; the list of
        missing keys when some are neither."""
        attached = message.get("attached") or []
        local: dict[str, Any] = {}
        for key, blob in zip(attached, blobs[first:], strict=True):
            module = self.cached(key)
            if module is None:
                module = self.load(blob)
                self.remember(key, module, len(blob))
            local[key] = module
        wanted = list(message.get("keys") or [])
        found = {key: local.get(key) or self.cached(key) for key in wanted}
        missing = [key for key, module in found.items() if module is None]
        return missing if missing else found

    def op_predict(self, message: dict[str, Any], blobs: list[bytearray]) -> Answer:
        from flplatform.sandbox import compute

        fixed = len(message["tensors"])
        modules = self._modules(message, blobs, fixed)
        if isinstance(modules, list):
            return {"missing": modules}, []
        return compute.predict_request(message, blobs[:fixed], modules)

    def op_metadata(self, message: dict[str, Any], blobs: list[bytearray]) -> Answer:
        from flplatform.sandbox import compute

        modules = self._modules(message, blobs, 0)
        if isinstance(modules, list):
            return {"missing": modules}, []
        return compute.metadata_request(message, modules), []

    # ------------------------------------------------------------------ loop

    def serve(self, stdin: int, stdout: int) -> None:
        while True:
            try:
                message, blobs = protocol.read_frame_fd(stdin, max_blob_bytes=self.max_blob_bytes)
            except protocol.ProtocolError:
                return  # the server closed the pipe or sent garbage: exit, a fresh worker replaces us
            handler = getattr(self, f"op_{message.get('op')}", None)
            try:
                if handler is None:
                    raise WorkerError("internal", f"unknown operation {message.get('op')!r}")
                reply, out = handler(message, blobs)
            except WorkerError as exc:
                reply, out = {"error": {"kind": exc.kind, "message": exc.message}}, []
            except MemoryError:
                reply, out = {"error": {"kind": "memory", "message": "The sandbox ran out of memory."}}, []
            except Exception as exc:  # a bug or an unexpected torch failure: report, keep serving  # noqa: BLE001  (untrusted code raises anything)
                traceback.print_exc(file=sys.stderr)
                reply, out = {"error": {"kind": "internal", "message": _first_line(exc)}}, []
            protocol.write_frame_fd(stdout, reply, out)


def _warm_up(torch: Any) -> None:
    """Exercise script/save/load/forward/torchinfo under confinement, so that lazy imports and
    thread pools start here, and a broken confinement shows up at start-up, not on a request."""
    import torchinfo

    from flplatform.sandbox import compute  # noqa: F401  (imports torchinfo users)
    from flplatform.sandbox.mean_module import build_mean_module

    net = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    buffer = io.BytesIO()
    torch.jit.save(build_mean_module([net]), buffer)
    loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    with torch.inference_mode():
        loaded(torch.zeros(1, 2))
    torchinfo.summary(loaded, input_size=(1, 2), verbose=0, device="cpu", mode="eval")


def main() -> None:
    import os

    # Frames go out on a private copy of descriptor 1; descriptor 1 itself then points at stderr,
    # so output of model code (TorchScript's print() writes to the C++ stdout) can never inject
    # bytes into the answer stream, and Python's print() goes to stderr too (the server logs it).
    stdin = sys.stdin.fileno()
    stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    config, _ = protocol.read_frame_fd(stdin, max_blob_bytes=0)
    import torch

    from flplatform.sandbox import compute  # noqa: F401
    from flplatform.sandbox.confine import Limits, confine

    threads = int(config.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    report = confine(Limits(**config["limits"]))
    _warm_up(torch)
    worker = Worker(config)
    protocol.write_frame_fd(stdout, {"ready": True, "confinement": report.as_dict()})
    worker.serve(stdin, stdout)
