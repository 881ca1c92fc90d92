"""Streamed uploads against ``flplatform serve``: upload throughput and the server's peak memory
for one client update of a given size (issue 21 item 2).

Per size (``--sizes-mb 68,3072``): a fresh SQLite server (``flplatform serve``, its blob store in
the run's temporary directory), a global TorchScript model holding one float32 parameter of that
size (uploaded streamed too), a training of two participants in its update phase. The layout of
the global model is read once by a first, refused upload (the server caches it; reading it
extracts the global model through the sandbox, which is the aggregation side's cost, not the
upload's). Then the server's peak RSS is reset (``/proc/PID/clear_refs``) and one participant
uploads the update, generated as a stream (1 MiB chunks, the test holds 1 MiB) with httpx, in
the canonical safetensors layout (stored as received). Reported: wall time and MB/s of that
upload (answer included: hashing, fsync, the finiteness check through a memory map, the rows),
the server's VmRSS before it and its VmHWM during it, and VmHWM over the server's whole life.

Run from the repository root: ``.venv/bin/python bench/upload_stream_bench.py``. Needs the disk
for about twice the largest size. Prints a table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

os.environ.setdefault("FLP_SECRET_KEY", "bench-secret-key-not-for-production")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from flplatform.models.files import TensorSpec  # noqa: E402
from flplatform.models.uploads import canonical_header  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.scale.harness import ADMIN_PASSWORD, admin_headers, create_account, training_state  # noqa: E402

MiB = 1024**2
BOUNDARY = "flp-bench-boundary"


class Wide(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.sum()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def start(workdir: Path, size: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "FLP_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'flp.db'}",
        "FLP_BLOB_DIR": str(workdir / "blobs"),
        "FLP_ADMIN_USERNAME": "admin",
        "FLP_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "FLP_ADMIN_EMAIL": "admin@example.org",
        "FLP_ARGON2_TIME_COST": "1",
        "FLP_ARGON2_MEMORY_COST_KIB": "64",
        "FLP_LOG_LEVEL": "WARNING",
        "FLP_MAX_UPLOAD_BYTES": str(size + 256 * MiB),
        "FLP_SANDBOX_CHECK_TIMEOUT_SECONDS": "900",
        "FLP_SANDBOX_CALL_TIMEOUT_SECONDS": "900",
        "FLP_SANDBOX_MEMORY_BYTES": str(max(8 * 1024**3, 8 * size)),
        "FLP_MAX_ARCHIVE_UNCOMPRESSED_BYTES": str(max(2 * 1024**3, size + 256 * MiB)),
    }
    exe = Path(sys.executable).parent / "flplatform"
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(
        [str(exe), "serve", "--port", str(port)], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "server.log").read_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return proc, url
        if time.monotonic() > deadline:
            raise TimeoutError((workdir / "server.log").read_text()[-3000:])
        time.sleep(0.2)


def server_pid(proc: subprocess.Popen[bytes]) -> int:
    """``flplatform serve`` runs uvicorn in its own process (one worker)."""
    return proc.pid


async def run_size(size_mb: int, tmp: Path) -> dict[str, float]:
    n = size_mb * MiB // 4
    workdir = Path(tempfile.mkdtemp(prefix="flp-upload-bench-", dir=tmp))
    try:
        model_path = workdir / "global.pt"
        torch.jit.save(torch.jit.script(Wide(n)), str(model_path))
        proc, url = start(workdir, n * 4)
        pid = server_pid(proc)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as http:
                admin = await admin_headers(http, url)
                actor = await create_account(http, url, admin, "actor", actor=True)
                clients = [await create_account(http, url, admin, f"c{i}", client=True) for i in range(2)]
                with open(model_path, "rb") as model_file:
                    r = await http.post(
                        f"{url}/api/models/",
                        headers=actor.headers,
                        data={"name": "wide", "description": "one big parameter"},
                        files={"model_file": ("g.pt", model_file)},
                    )
                assert r.status_code == 201, r.text
                model_id = r.json()["model_id"]
                body = {
                    "model_id": model_id,
                    "target_num_updates": 2,
                    "aggregation_method": "FedAvg",
                    "clients": [c.id for c in clients],
                    "options": {"skip_model_tests": True},
                }
                r = await http.post(f"{url}/api/trainings/", headers=actor.headers, json=body)
                assert r.status_code == 201, r.text
                training_id = r.json()["training_id"]
                r = await http.post(f"{url}/api/trainings/{training_id}/start/", headers=actor.headers)
                assert r.status_code == 202, r.text
                for _ in range(3000):
                    state = await training_state(http, url, actor.headers, training_id)
                    if state["phase"] == "update" and not state["locked"]:
                        break
                    await asyncio.sleep(0.1)

                async def refused() -> AsyncIterator[bytes]:  # chunked: the layout is read first
                    yield b"not a model"

                r = await http.post(
                    f"{url}/api/models/{model_id}/",
                    headers={**clients[0].headers, "Content-Type": "application/octet-stream"},
                    content=refused(),
                )
                assert r.status_code >= 400, r.text
                header = canonical_header({"weight": TensorSpec((n,), torch.float32)})
                preamble = (
                    "".join(
                        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                        for k, v in (("round", "0"), ("sample_size", "10"))
                    ).encode()
                    + (
                        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model_file"; '
                        'filename="u.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n'
                    ).encode()
                )
                closing = f"\r\n--{BOUNDARY}--\r\n".encode()
                chunk = b"\0" * MiB
                total = len(preamble) + len(header) + n * 4 + len(closing)

                async def stream() -> AsyncIterator[bytes]:
                    yield preamble + header
                    for _ in range(n * 4 // MiB):
                        yield chunk
                    rest = n * 4 % MiB
                    if rest:
                        yield chunk[:rest]
                    yield closing

                peaks = {"RssAnon": 0, "RssFile": 0}
                sampling = True

                async def sample() -> None:  # what the peak is made of (anonymous vs mapped file)
                    while sampling:
                        for field in peaks:
                            peaks[field] = max(peaks[field], status_kib(pid, field))
                        await asyncio.sleep(0.02)

                life_hwm = status_kib(pid, "VmHWM")
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                rss_before = status_kib(pid, "VmRSS")
                sampler = asyncio.create_task(sample())
                started = time.perf_counter()
                r = await http.post(
                    f"{url}/api/models/{model_id}/",
                    headers={
                        **clients[0].headers,
                        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                        "Content-Length": str(total),
                    },
                    content=stream(),
                )
                wall = time.perf_counter() - started
                sampling = False
                await sampler
                assert r.status_code == 201, r.text
                hwm = status_kib(pid, "VmHWM")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "size_mb": n * 4 / 1e6,
        "wall_s": wall,
        "mb_s": n * 4 / 1e6 / wall,
        "rss_before_mb": rss_before / 1024,
        "hwm_upload_mb": hwm / 1024,
        "hwm_life_mb": max(life_hwm, hwm) / 1024,
        "anon_mb": peaks["RssAnon"] / 1024,
        "file_mb": peaks["RssFile"] / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="68,3072", help="update sizes in MiB, comma-separated")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the servers' files go")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = [asyncio.run(run_size(int(s), Path(args.tmp))) for s in args.sizes_mb.split(",")]
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}; load average before {load:.2f}, after {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| update MB | upload s | MB/s | server RSS before MB | server peak RSS during the upload MB | server peak RSS, whole run MB "
        "| sampled peak anon / file-backed MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['size_mb']:.0f} | {row['wall_s']:.2f} | {row['mb_s']:.0f} | {row['rss_before_mb']:.0f} | "
            f"{row['hwm_upload_mb']:.0f} | {row['hwm_life_mb']:.0f} | {row['anon_mb']:.0f} / {row['file_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
