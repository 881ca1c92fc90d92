"""Passwords (argon2, off the event loop), API tokens (random, hashed, revocable) and
encryption at rest of the one token a user may see again (the DLR clients read it from
``GET /api/users/{own id}/``).

Password hashing runs in a pool of its own (``FLP_PASSWORD_HASH_CONCURRENCY`` threads, at most
``FLP_PASSWORD_HASH_MAX_WAITING`` callers queued, then 429): each hash costs
``FLP_ARGON2_MEMORY_COST_KIB`` and a core for its time cost, so a burst of logins must not take
every core and the default thread pool from the rest of the server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.fernet import Fernet, InvalidToken

from flplatform.errors import TooManyRequests
from flplatform.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@lru_cache
def _hasher(time_cost: int, memory_cost: int) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_cost)


def _current_hasher() -> PasswordHasher:
    s = get_settings()
    return _hasher(s.argon2_time_cost, s.argon2_memory_cost_kib)


class _HashingPool:
    """A bounded thread pool for argon2; callers beyond threads + waiting places get 429."""

    def __init__(self, threads: int, max_waiting: int):
        self.threads = threads
        self.max_waiting = max_waiting
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flp-argon2")
        self.in_flight = 0  # touched only on event loop threads, guarded for several loops

    async def run(self, fn: Callable[[], T]) -> T:
        with _POOL_LOCK:
            if self.in_flight >= self.threads + self.max_waiting:
                raise TooManyRequests(
                    "Too many logins are being checked right now; retry shortly.",
                    retry_after=1,
                    code="login_busy",
                )
            self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        finally:
            with _POOL_LOCK:
                self.in_flight -= 1


_POOL_LOCK = threading.Lock()
_POOL: _HashingPool | None = None


def configure_hashing(threads: int, max_waiting: int) -> None:
    """Size the pool (the application does at start-up from its settings); hashes already
    running finish in the old pool."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or (_POOL.threads, _POOL.max_waiting) != (threads, max_waiting):
            old, _POOL = _POOL, _HashingPool(threads, max_waiting)
            if old is not None:
                old.executor.shutdown(wait=False)


def hashing_pool() -> _HashingPool:
    if _POOL is None:
        s = get_settings()
        configure_hashing(s.password_hash_concurrency, s.password_hash_max_waiting)
    assert _POOL is not None
    return _POOL


async def hash_password(password: str) -> str:
    hasher = _current_hasher()
    return await hashing_pool().run(lambda: hasher.hash(password))


# A fixed hash to verify against when the user does not exist, so timing does not reveal it.
_DUMMY_HASH: str | None = None


async def verify_password(password: str, password_hash: str | None) -> bool:
    global _DUMMY_HASH
    hasher = _current_hasher()
    if password_hash is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = await hash_password(secrets.token_hex(8))
        password_hash = _DUMMY_HASH
        real = False
    else:
        real = True

    def _verify() -> bool:
        try:
            return hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    ok = await hashing_pool().run(_verify)
    return ok and real


def new_user_token() -> str:
    """40 hex characters, the shape DLR clients expect (they detect token-as-Basic-username by length)."""
    return secrets.token_hex(20)


def new_api_token() -> str:
    return "flp_" + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """Keyed digest used to store and look up tokens (never stored in plain text)."""
    key = get_settings().secret().encode()
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def _fernet() -> Fernet:
    key = hashlib.sha256(b"flplatform-token-encryption:" + get_settings().secret().encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def decrypt(value: str) -> str | None:
    try:
        return _fernet().decrypt(value.encode()).decode()
    except InvalidToken:
        return None


def sign(body: bytes) -> str:
    """HMAC-SHA256 signature of an outgoing payload (notifications), hex encoded."""
    key = get_settings().secret().encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()
