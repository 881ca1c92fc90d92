"""Hostile bodies and logins against a real ``flplatform serve`` (SQLite, production argon2 costs).

One command, about a minute on a 2-core machine; prints what it measured, asserts nothing::

    .venv/bin/python bench/hostile_clients_bench.py

Cases (issue 14, items 3 and 5):

* anonymous 200 MiB JSON ``POST /api/users/`` with ``Content-Length`` and chunked, and an
  anonymous 1 GiB multipart ``POST /api/models/{id}/``: the status, how many body bytes the client
  managed to send before the answer arrived (a raw socket keeps sending until it reads the
  response), the server's RSS growth, and ``/health`` latency meanwhile;
* 300 wrong passwords for one account, then the right one: the statuses;
* ``/health`` latency while 12 clients send wrong passwords concurrently.
"""

from __future__ import annotations

import base64
import collections
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

MiB = 1024**2
CHUNK = 64 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "FLP_DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/bench.db",
        "FLP_SECRET_KEY": "bench-secret",
        "FLP_ADMIN_USERNAME": "admin",
        "FLP_ADMIN_PASSWORD": "admin-password-1",
        "FLP_LOG_LEVEL": "WARNING",
    }
    for name in ("FLP_ARGON2_TIME_COST", "FLP_ARGON2_MEMORY_COST_KIB"):
        env.pop(name, None)  # production costs: 64 MiB, t=3
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("flplatform")),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


class HealthProbe(threading.Thread):
    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.latencies = port, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                http.get("/health")
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.05)


def raw_upload(
    port: int, path: str, headers: dict[str, str], total: int, chunked: bool
) -> tuple[str, int, float]:
    """Send headers, then body chunks until the response arrives; the status line, bytes sent, seconds."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n"
    sock.sendall((head + "\r\n").encode())
    block = b"a" * CHUNK
    sent, started = 0, time.monotonic()
    sock.setblocking(False)
    response = b""
    while True:
        readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 10)
        if readable:
            response = sock.recv(65536)
            break
        if not writable:
            break
        piece = block if not chunked else f"{CHUNK:x}\r\n".encode() + block + b"\r\n"
        try:
            sent += min(CHUNK, sock.send(piece))
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            continue
    sock.close()
    return response.split(b"\r\n", 1)[0].decode(errors="replace"), sent, time.monotonic() - started


def body_case(
    port: int, pid: int, label: str, path: str, headers: dict[str, str], total: int, chunked: bool
) -> None:
    server = psutil.Process(pid)
    rss_before = server.memory_info().rss
    probe = HealthProbe(port)
    probe.start()
    status, sent, seconds = raw_upload(port, path, headers, total, chunked)
    time.sleep(0.3)
    probe.stop.set()
    probe.join()
    growth = (server.memory_info().rss - rss_before) / MiB
    print(
        f"{label:<44} {status:<34} sent {sent / MiB:7.2f} MiB of {total / MiB:5.0f} in {seconds:5.2f} s; "
        f"RSS {growth:+6.1f} MiB; /health max {max(probe.latencies, default=0) * 1000:6.1f} ms"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(Path(tmp))
        try:
            json_headers = {"Content-Type": "application/json"}
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=60
            ) as http:  # warm-up (lazy routes)
                for _ in range(3):
                    http.get("/health")
                    http.post("/api/users/", json={"username": "warm-up"})
                    http.post(f"/api/models/{uuid.uuid4()}/", files={"model_file": ("m", b"x")})
            body_case(
                port,
                proc.pid,
                "anonymous 200 MiB JSON (Content-Length)",
                "/api/users/",
                json_headers,
                200 * MiB,
                False,
            )
            body_case(
                port,
                proc.pid,
                "anonymous 200 MiB JSON (chunked)",
                "/api/users/",
                json_headers,
                200 * MiB,
                True,
            )
            multipart = {"Content-Type": "multipart/form-data; boundary=x"}
            body_case(
                port,
                proc.pid,
                "anonymous 1 GiB multipart update",
                f"/api/models/{uuid.uuid4()}/",
                multipart,
                1024 * MiB,
                False,
            )
            admin = {"Authorization": "Basic " + base64.b64encode(b"admin:admin-password-1").decode()}
            body_case(
                port,
                proc.pid,
                "admin 200 MiB JSON (chunked)",
                "/api/users/",
                {**json_headers, **admin},
                200 * MiB,
                True,
            )

            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                started = time.monotonic()
                statuses = collections.Counter(
                    http.post(
                        "/api/auth/token/", data={"username": "admin", "password": f"wrong-{i}"}
                    ).status_code
                    for i in range(300)
                )
                right = http.post(
                    "/api/auth/token/", data={"username": "admin", "password": "admin-password-1"}
                )
                print(
                    f"300 wrong passwords: {dict(statuses)} in {time.monotonic() - started:.1f} s; then the right "
                    f"one: {right.status_code} (Retry-After {right.headers.get('Retry-After')})"
                )

            probe = HealthProbe(port)
            probe.start()
            time.sleep(0.3)
            idle = max(probe.latencies)

            def spray(worker: int) -> None:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                    for i in range(4):
                        http.post(
                            "/api/auth/token/", data={"username": f"user-{worker}-{i}", "password": "x"}
                        )

            threads = [threading.Thread(target=spray, args=(w,)) for w in range(12)]
            probe.latencies.clear()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            probe.stop.set()
            probe.join()
            print(
                f"/health during 12 concurrent bad-login clients: max {max(probe.latencies) * 1000:.1f} ms, "
                f"median {sorted(probe.latencies)[len(probe.latencies) // 2] * 1000:.1f} ms (idle {idle * 1000:.1f} ms)"
            )
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
