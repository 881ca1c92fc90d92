"""Server side of the model sandbox: a bounded pool of warm worker processes, each one call at a
time, with a wall-clock deadline per call after which the worker is SIGKILLed and replaced.

Workers are started with ``subprocess`` (fork+exec of a fresh ``python -I``: nothing of the
server's memory, no inherited descriptors but the three pipes, a clean environment without
``FLP_*`` variables, an empty private working directory). Blocking waits run in the
pool's threads only where something must wait for a worker; an async call's exchange runs on the
caller's event loop (non-blocking pipes, no thread hop), and works from any loop.

Size: one module on purpose (a little over 500 lines): the pool, its workers' processes and
the watchdog share one lifecycle (who may signal, reap or close a worker, and when).
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flplatform.sandbox import protocol
from flplatform.sandbox.protocol import Blob, ProtocolError, WorkerError

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
        default=0,
        ge=0,
        description="torch intra-op threads per worker (0: torch's default, one per CPU, as in the server).",
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
    # torch's OpenMP runtime (libgomp) lets idle team threads spin for ~300,000 pause
    # instructions (10-40 ms on current CPUs) after every parallel region. With more runnable
    # threads than free cores (other workers, the server, other processes) a spinning thread holds
    # the core a team mate needs to finish the next region: with 2 threads on a busy 2-core machine
    # a batch-1 forward pass took 40-100 ms instead of 0.4 ms, with or without the confinement
    # (measured in a plain process too). Passive waiting sleeps on a futex at once; the kernels
    # run as fast (docs/performance.md, "Model sandbox"). Read by libgomp when it loads, so it
    # must be in the environment at exec.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


class _Watchdog:
    """One thread that SIGKILLs workers past their call's deadline (cheaper per call than a
    timer thread each). Arming wakes the thread only when the new deadline comes before the
    time it sleeps until, which is rare: a call does not pay a thread wake-up for its deadline."""

    def __init__(self) -> None:
        self._deadlines: dict[Worker, float] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sleeps_until = 0.0

    def arm(self, worker: Worker, deadline: float) -> None:
        with self._wake:
            self._deadlines[worker] = deadline
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sandbox-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._sleeps_until:
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
                    self._sleeps_until = min(self._deadlines.values(), default=now + 60)
                    self._wake.wait(timeout=max(0.0, self._sleeps_until - now))
                    self._sleeps_until = 0.0  # awake: arm() need not notify until it sleeps again
                    continue
            for worker in due:
                worker.expired = True
                worker.terminate()


_watchdog = _Watchdog()

Answer = tuple[dict[str, Any], list[bytearray]]


class Worker:
    """One sandbox process; used by one caller at a time (a thread, or a task on an event loop).

    Its pipes are raw non-blocking descriptors: an async call writes the request with one
    ``writev`` and waits for the answer on the caller's event loop (no thread hop); a synchronous
    call waits with ``select``. Other threads only ever :meth:`terminate` a worker (a signal);
    the caller that holds it closes its descriptors (:meth:`kill`), so no descriptor is closed
    under a read in progress."""

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
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.to_worker = self.proc.stdin.fileno()
        self.from_worker = self.proc.stdout.fileno()
        os.set_blocking(self.to_worker, False)
        os.set_blocking(self.from_worker, False)
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

    def _failed(self, exc: BaseException, timeout: float, what: str, *, reap: bool = True) -> Exception:
        """Kill the worker after a failed exchange (``reap=False``: only signal it, the pool reaps
        it in a thread); the exception that tells the caller why."""
        if reap:
            self.kill()
        else:
            self.terminate()
        if self.expired:
            return SandboxTimeout(f"{what} took longer than {timeout:g} s")
        if self.aborted:
            return SandboxClosed("the server is shutting down")
        return SandboxCrashed(f"the sandbox worker died during {what} ({exc}; exit {self.proc.poll()})")

    def _exchange(self, message: dict[str, Any], blobs: Sequence[Blob], timeout: float, what: str) -> Answer:
        self.expired = False
        deadline = time.monotonic() + timeout
        _watchdog.arm(self, deadline)
        try:
            protocol.write_frame_fd(self.to_worker, message, blobs)
            answer = protocol.read_frame_fd(self.from_worker, max_blob_bytes=self.settings.max_message_bytes)
            if time.monotonic() > deadline:  # the watchdog was late (a loaded machine): same outcome
                self.expired = True
                raise ProtocolError("deadline passed")
            return answer
        except (ProtocolError, OSError, ValueError) as exc:
            raise self._failed(exc, timeout, what) from None
        finally:
            _watchdog.disarm(self)

    async def _exchange_async(
        self, message: dict[str, Any], blobs: Sequence[Blob], timeout: float, what: str
    ) -> Answer:
        self.expired = False
        deadline = time.monotonic() + timeout
        _watchdog.arm(self, deadline)
        try:
            await protocol.write_frame_async(self.to_worker, message, blobs)
            answer = await protocol.read_frame_async(
                self.from_worker, max_blob_bytes=self.settings.max_message_bytes
            )
            if time.monotonic() > deadline:
                self.expired = True
                raise ProtocolError("deadline passed")
            return answer
        except (ProtocolError, OSError, ValueError) as exc:
            # Not reaped here: waiting for the process would block the event loop.
            raise self._failed(exc, timeout, what, reap=False) from None
        finally:
            _watchdog.disarm(self)

    @staticmethod
    def _answer(reply: dict[str, Any], out: list[bytearray]) -> Answer:
        error = reply.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise SandboxCrashed("malformed error answer")
            raise WorkerError(str(error.get("kind"))[:50], str(error.get("message"))[:2000])
        return reply, out

    def call(self, message: dict[str, Any], blobs: Sequence[Blob], timeout: float) -> Answer:
        self.calls += 1
        return self._answer(*self._exchange(message, blobs, timeout, str(message.get("op"))))

    async def call_async(self, message: dict[str, Any], blobs: Sequence[Blob], timeout: float) -> Answer:
        self.calls += 1
        return self._answer(*await self._exchange_async(message, blobs, timeout, str(message.get("op"))))

    def terminate(self) -> None:
        """SIGKILL the worker's process group (any thread; its caller then sees end of stream)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()

    def kill(self) -> None:
        """Terminate, reap and release the pipes and working directory (its holder only)."""
        self.terminate()
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


_CPU_CHECK_EVERY = 64  # calls between reads of a worker's CPU time (and after any call over 50 ms)


class SandboxPool:
    """At most ``settings.workers`` workers, each serving one call at a time (further calls wait
    for one, first come first served); idle workers stay warm."""

    def __init__(self, settings: SandboxSettings | None = None):
        self.settings = settings or SandboxSettings()
        # Threads for what blocks: waiting for a worker when all are busy, starting one.
        self._executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="sandbox")
        self._idle: list[Worker] = []
        self._busy: set[Worker] = set()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._waiting = 0
        self._closed = False
        self._logged = False
        self._starting = 0
        self.started = 0

    def _count(self) -> int:
        """Workers running or starting (lock held)."""
        return len(self._idle) + len(self._busy) + self._starting

    def _pop_idle(self, dead: list[Worker]) -> Worker | None:
        """An idle live worker moved to busy (lock held); dead ones are collected in ``dead``."""
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                self._busy.add(worker)
                return worker
            dead.append(worker)
        return None

    def _take_idle(self) -> Worker | None:
        """An idle worker at once, or None (also when others already wait: they come first)."""
        dead: list[Worker] = []
        with self._lock:
            if self._closed:
                raise SandboxClosed("the server is shutting down")
            worker = None if self._waiting else self._pop_idle(dead)
        for corpse in dead:
            corpse.kill()
        return worker

    def _checkout(self) -> Worker:
        """An idle worker, or a new one when fewer than ``settings.workers`` exist, else wait."""
        dead: list[Worker] = []
        with self._lock:
            self._waiting += 1
            try:
                while True:
                    if self._closed:
                        raise SandboxClosed("the server is shutting down")
                    worker = self._pop_idle(dead)
                    if worker is not None:
                        break
                    if len(self._busy) + self._starting < self.settings.workers:
                        self._starting += 1
                        break
                    self._freed.wait()
            finally:
                self._waiting -= 1
        for corpse in dead:
            corpse.kill()
        if worker is not None:
            return worker
        try:
            worker = Worker(self.settings)
        except BaseException:
            with self._lock:
                self._starting -= 1
                self._freed.notify_all()
            raise
        with self._lock:
            self._starting -= 1
            self.started += 1
            if self._closed:
                self._freed.notify_all()
                worker.kill()
                raise SandboxClosed("the server is shutting down")
            self._busy.add(worker)
        self._log_confinement(worker)
        return worker

    def _log_confinement(self, worker: Worker) -> None:
        if not self._logged:
            self._logged = True
            log.info("model sandbox worker confinement: %s", worker.confinement)

    def _checkin(self, worker: Worker, healthy: bool, seconds: float) -> None:
        retire = not healthy or (
            (seconds > 0.05 or worker.calls % _CPU_CHECK_EVERY == 0)
            and worker.cpu_seconds_used() > self.settings.cpu_seconds / 2
        )
        with self._lock:
            self._busy.discard(worker)
            self._freed.notify_all()
            if not retire and not self._closed and worker.alive:
                self._idle.append(worker)
                return
        # Reap it and start its replacement now (in a thread: this may run on the event loop),
        # so the next caller does not pay a worker's start-up.
        threading.Thread(target=self._replace, args=(worker,), name="sandbox-refill", daemon=True).start()

    def _replace(self, worker: Worker) -> None:
        worker.kill()
        self.fill()

    def fill(self) -> None:
        """Start workers until ``settings.workers`` are running (idle or busy); returns once they
        are (a start in progress in another thread is waited for, and redone if it fails)."""
        while True:
            with self._lock:
                while self._starting and not self._closed and self._count() >= self.settings.workers:
                    self._freed.wait()
                if self._closed or self._count() >= self.settings.workers:
                    return
                self._starting += 1
            try:
                worker = Worker(self.settings)
            except (SandboxCrashed, SandboxTimeout, OSError):
                log.exception("could not start a sandbox worker")
                with self._lock:
                    self._starting -= 1
                    self._freed.notify_all()
                return
            with self._lock:
                self._starting -= 1
                self.started += 1
                self._freed.notify_all()
                if self._closed:
                    worker.kill()
                    return
                self._idle.append(worker)
            self._log_confinement(worker)

    def call_sync(self, message: dict[str, Any], blobs: Sequence[Blob], timeout: float) -> Answer:
        worker = self._checkout()
        healthy = False
        start = time.monotonic()
        try:
            result = worker.call(message, blobs, timeout)
            healthy = True
            return result
        except WorkerError:
            healthy = worker.alive
            raise
        finally:
            self._checkin(worker, healthy, time.monotonic() - start)

    async def _call_async(self, message: dict[str, Any], blobs: Sequence[Blob], timeout: float) -> Answer:
        worker = self._take_idle()
        if worker is None:
            worker = await asyncio.get_running_loop().run_in_executor(self._executor, self._checkout)
        healthy = False
        start = time.monotonic()
        try:
            result = await worker.call_async(message, blobs, timeout)
            healthy = True
            return result
        except WorkerError:
            healthy = worker.alive
            raise
        finally:
            self._checkin(worker, healthy, time.monotonic() - start)

    async def call(
        self, message: dict[str, Any], blobs: Sequence[Blob] | None = None, *, timeout: float | None = None
    ) -> Answer:
        if self._closed:
            raise SandboxClosed("the server is shutting down")
        blobs = list(blobs or [])
        deadline = timeout if timeout is not None else self.settings.call_timeout_seconds
        # Large archives take longer to move, load and save: one more second per 32 MiB sent.
        deadline += sum(memoryview(b).nbytes for b in blobs) / BYTES_PER_EXTRA_SECOND
        # Shielded: a caller that gives up (cancellation) does not cut an exchange in half; the
        # call finishes on the loop and the worker goes back to the pool instead of being killed.
        return await asyncio.shield(self._call_async(message, blobs, deadline))

    def confinement(self) -> dict[str, Any]:
        """The confinement report of a worker (starts one if none is running)."""
        self.call_sync({"op": "ping"}, [], self.settings.start_timeout_seconds)
        with self._lock:
            worker = self._idle[-1] if self._idle else None
        return worker.confinement if worker else {}

    def kill_running(self) -> None:
        """Abort every call in progress (their callers get :class:`SandboxClosed`). Safe in a
        signal handler: it only sends signals; each caller reaps its worker."""
        with self._lock:
            busy = list(self._busy)
        for worker in busy:
            worker.aborted = True
            worker.terminate()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, busy = self._idle, list(self._busy)
            self._idle = []
            self._freed.notify_all()
        for worker in idle:
            worker.kill()
        for worker in busy:
            worker.terminate()
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
