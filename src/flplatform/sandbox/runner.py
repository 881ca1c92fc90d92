"""Server side of the model sandbox: a bounded pool of warm worker processes, each one call at a
time, with a wall-clock deadline per call after which the worker is SIGKILLed and replaced.

Workers are started with ``subprocess`` (fork+exec of a fresh ``python -I``: nothing of the
server's memory, no inherited descriptors but the three pipes, a clean environment without
``FLP_*`` variables, an empty private working directory). Blocking pipe I/O runs in the pool's
own threads, so the async API never blocks the event loop and works from any loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flplatform.sandbox import protocol
from flplatform.sandbox.protocol import ProtocolError, WorkerError

log = logging.getLogger(__name__)


class SandboxSettings(BaseSettings):
    """Model sandbox (environment variables ``FLP_SANDBOX_*``)."""

    model_config = SettingsConfigDict(env_prefix="FLP_SANDBOX_", env_file=".env", extra="ignore")

    workers: int = Field(
        default=2, ge=1, description="Worker processes (calls run at once per server process)."
    )
    call_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Deadline of an inference/metadata/aggregation call; the worker is killed after it.",
    )
    check_timeout_seconds: float = Field(default=20.0, gt=0, description="Deadline of checking an upload.")
    start_timeout_seconds: float = Field(default=60.0, gt=0, description="Deadline of a worker's start-up.")
    memory_bytes: int = Field(default=8 * 1024**3, ge=512 * 1024**2, description="RLIMIT_AS of a worker.")
    cpu_seconds: int = Field(
        default=3600,
        ge=10,
        description="RLIMIT_CPU of a worker (its lifetime; it is replaced when half is used).",
    )
    open_files: int = Field(default=64, ge=16, description="RLIMIT_NOFILE of a worker.")
    processes: int = Field(default=4096, ge=16, description="RLIMIT_NPROC of a worker (counts threads).")
    user: str = Field(
        default="nobody", description="Unprivileged account workers switch to when started as root."
    )
    threads: int = Field(
        default=1,
        ge=0,
        description="torch threads per worker (0: torch's default); parallelism comes from the workers.",
    )
    cache_entries: int = Field(default=16, ge=0, description="Loaded modules kept per worker (LRU).")
    cache_bytes: int = Field(
        default=1024**3, ge=0, description="Archive bytes of the modules kept per worker."
    )
    max_message_bytes: int = Field(default=4 * 1024**3, ge=1024**2, description="Largest frame either way.")


BYTES_PER_EXTRA_SECOND = 32 * 1024**2
_MAX_LOGGED_BYTES = 64 * 1024


class SandboxTimeout(Exception):
    """The call passed its deadline; the worker was killed."""


class SandboxCrashed(Exception):
    """The worker died or answered garbage during the call; it was replaced."""


class SandboxClosed(Exception):
    """The server is shutting down; no new calls."""


_CLEAN_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TZ")


def _clean_env(workdir: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in _CLEAN_ENV_KEYS if k in os.environ and k != "PATH"}
    env.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1"})
    return env


class _Watchdog:
    """One thread that SIGKILLs workers past their call's deadline (cheaper per call than a
    timer thread each)."""

    def __init__(self) -> None:
        self._deadlines: dict[Worker, float] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, worker: Worker, deadline: float) -> None:
        with self._wake:
            self._deadlines[worker] = deadline
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sandbox-watchdog", daemon=True)
                self._thread.start()
            self._wake.notify()

    def disarm(self, worker: Worker) -> None:
        with self._wake:
            self._deadlines.pop(worker, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [w for w, d in self._deadlines.items() if d <= now]
                for worker in due:
                    del self._deadlines[worker]
                if not due:
                    upcoming = min(self._deadlines.values(), default=now + 60)
                    self._wake.wait(timeout=max(0.0, upcoming - now))
                    continue
            for worker in due:
                worker.expired = True
                worker.kill()


_watchdog = _Watchdog()


class Worker:
    """One sandbox process; used by one thread at a time."""

    def __init__(self, settings: SandboxSettings):
        self.settings = settings
        self.workdir = tempfile.mkdtemp(prefix="flp-sandbox-")
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam(settings.user)
                os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
            except KeyError:
                pass
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "flplatform.sandbox"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True, cwd=self.workdir, env=_clean_env(self.workdir), start_new_session=True,
        )  # fmt: skip
        self.calls = 0
        self.aborted = False
        self.expired = False
        threading.Thread(target=self._log_stderr, name=f"sandbox-log-{self.proc.pid}", daemon=True).start()
        config = {
            "limits": {"memory_bytes": settings.memory_bytes, "cpu_seconds": settings.cpu_seconds,
                       "open_files": settings.open_files, "processes": settings.processes,
                       "unprivileged_user": settings.user},
            "threads": settings.threads, "cache_entries": settings.cache_entries,
            "cache_bytes": settings.cache_bytes, "max_blob_bytes": settings.max_message_bytes,
        }  # fmt: skip
        ready, _ = self._exchange(config, [], settings.start_timeout_seconds, "start-up")
        if not ready.get("ready"):
            self.kill()
            raise SandboxCrashed(f"sandbox worker answered {ready!r} at start-up")
        self.confinement: dict[str, Any] = ready.get("confinement") or {}

    def _log_stderr(self) -> None:
        """Log the worker's output (its tracebacks, and whatever model code prints), at most
        ``_MAX_LOGGED_BYTES`` per worker so that a printing module cannot flood the server log."""
        assert self.proc.stderr is not None
        logged = 0
        for line in self.proc.stderr:
            if logged < _MAX_LOGGED_BYTES:
                text = line[:2000].decode(errors="replace").rstrip()
                log.warning("sandbox worker %d: %s", self.proc.pid, text)
                logged += len(text)
                if logged >= _MAX_LOGGED_BYTES:
                    log.warning("sandbox worker %d: further output is discarded", self.proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds_used(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def _exchange(
        self, message: dict[str, Any], blobs: list[bytes], timeout: float, what: str
    ) -> tuple[dict[str, Any], list[bytes]]:
        self.expired = False
        deadline = time.monotonic() + timeout
        _watchdog.arm(self, deadline)
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            protocol.write_frame(self.proc.stdin, message, blobs)
            answer = protocol.read_frame(self.proc.stdout, max_blob_bytes=self.settings.max_message_bytes)
            if time.monotonic() > deadline:  # the watchdog was late (a loaded machine): same outcome
                self.expired = True
                raise ProtocolError("deadline passed")
            return answer
        except (ProtocolError, OSError, ValueError) as exc:
            self.kill()
            if self.expired:
                raise SandboxTimeout(f"{what} took longer than {timeout:g} s") from None
            if self.aborted:
                raise SandboxClosed("the server is shutting down") from None
            raise SandboxCrashed(
                f"the sandbox worker died during {what} ({exc}; exit {self.proc.poll()})"
            ) from None
        finally:
            _watchdog.disarm(self)

    def call(
        self, message: dict[str, Any], blobs: list[bytes], timeout: float
    ) -> tuple[dict[str, Any], list[bytes]]:
        self.calls += 1
        reply, out = self._exchange(message, blobs, timeout, str(message.get("op")))
        error = reply.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise SandboxCrashed("malformed error answer")
            raise WorkerError(str(error.get("kind"))[:50], str(error.get("message"))[:2000])
        return reply, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait for anyone
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


class SandboxPool:
    """At most ``settings.workers`` calls at once (the rest queue); idle workers stay warm."""

    def __init__(self, settings: SandboxSettings | None = None):
        self.settings = settings or SandboxSettings()
        self._executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="sandbox")
        self._idle: list[Worker] = []
        self._busy: set[Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._logged = False
        self._starting = 0
        self.started = 0

    def _checkout(self) -> Worker:
        with self._lock:
            if self._closed:
                raise SandboxClosed("the server is shutting down")
            while self._idle:
                worker = self._idle.pop()
                if worker.alive:
                    self._busy.add(worker)
                    return worker
                worker.kill()
        worker = Worker(self.settings)
        with self._lock:
            self.started += 1
            if self._closed:
                worker.kill()
                raise SandboxClosed("the server is shutting down")
            self._busy.add(worker)
        if not self._logged:
            self._logged = True
            log.info("model sandbox worker confinement: %s", worker.confinement)
        return worker

    def _checkin(self, worker: Worker, healthy: bool) -> None:
        retire = not healthy or worker.cpu_seconds_used() > self.settings.cpu_seconds / 2
        with self._lock:
            self._busy.discard(worker)
            if not retire and not self._closed and worker.alive:
                self._idle.append(worker)
                return
        worker.kill()
        # Replace it now, so the next caller does not pay a worker's start-up.
        threading.Thread(target=self.fill, name="sandbox-refill", daemon=True).start()

    def fill(self) -> None:
        """Start workers until ``settings.workers`` are running (idle or busy)."""
        while True:
            with self._lock:
                if (
                    self._closed
                    or len(self._idle) + len(self._busy) + self._starting >= self.settings.workers
                ):
                    return
                self._starting += 1
            try:
                worker = Worker(self.settings)
            except (SandboxCrashed, SandboxTimeout, OSError):
                log.exception("could not start a sandbox worker")
                with self._lock:
                    self._starting -= 1
                return
            with self._lock:
                self._starting -= 1
                self.started += 1
                if self._closed:
                    worker.kill()
                    return
                self._idle.append(worker)
            if not self._logged:
                self._logged = True
                log.info("model sandbox worker confinement: %s", worker.confinement)

    def call_sync(
        self, message: dict[str, Any], blobs: list[bytes], timeout: float
    ) -> tuple[dict[str, Any], list[bytes]]:
        worker = self._checkout()
        healthy = False
        try:
            result = worker.call(message, blobs, timeout)
            healthy = True
            return result
        except WorkerError:
            healthy = worker.alive
            raise
        finally:
            self._checkin(worker, healthy)

    async def call(
        self, message: dict[str, Any], blobs: list[bytes] | None = None, *, timeout: float | None = None
    ) -> tuple[dict[str, Any], list[bytes]]:
        if self._closed:
            raise SandboxClosed("the server is shutting down")
        loop = asyncio.get_running_loop()
        blobs = list(blobs or [])
        deadline = timeout if timeout is not None else self.settings.call_timeout_seconds
        # Large archives take longer to move, load and save: one more second per 32 MiB sent.
        deadline += sum(len(b) for b in blobs) / BYTES_PER_EXTRA_SECOND
        return await loop.run_in_executor(self._executor, self.call_sync, message, blobs, deadline)

    def confinement(self) -> dict[str, Any]:
        """The confinement report of a worker (starts one if none is running)."""
        self.call_sync({"op": "ping"}, [], self.settings.start_timeout_seconds)
        with self._lock:
            worker = self._idle[-1] if self._idle else None
        return worker.confinement if worker else {}

    def kill_running(self) -> None:
        """Abort every call in progress (their callers get :class:`SandboxCrashed`)."""
        with self._lock:
            busy = list(self._busy)
        for worker in busy:
            worker.aborted = True
            worker.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = self._idle + list(self._busy)
            self._idle = []
        for worker in workers:
            worker.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)


_pool: SandboxPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> SandboxPool:
    """The process's pool (created on first use; a closed pool is replaced, for tests that run
    several apps in one process)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._closed:
            _pool = SandboxPool()
        return _pool


def set_pool(pool: SandboxPool | None) -> SandboxPool | None:
    """Install ``pool`` (tests with custom settings); returns the previous one."""
    global _pool
    with _pool_lock:
        previous, _pool = _pool, pool
        return previous
