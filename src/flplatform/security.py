"""Passwords (argon2, off the event loop), API tokens (random, hashed, revocable) and
encryption at rest of the one token a user may see again (the DLR clients read it from
``GET /api/users/{own id}/``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.fernet import Fernet, InvalidToken

from flplatform.settings import get_settings


@lru_cache
def _hasher(time_cost: int, memory_cost: int) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_cost)


def _current_hasher() -> PasswordHasher:
    s = get_settings()
    return _hasher(s.argon2_time_cost, s.argon2_memory_cost_kib)


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_current_hasher().hash, password)


# A fixed hash to verify against when the user does not exist, so timing does not reveal it.
_DUMMY_HASH: str | None = None


async def verify_password(password: str, password_hash: str | None) -> bool:
    global _DUMMY_HASH
    hasher = _current_hasher()
    if password_hash is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = await asyncio.to_thread(hasher.hash, secrets.token_hex(8))
        password_hash = _DUMMY_HASH
        real = False
    else:
        real = True

    def _verify() -> bool:
        try:
            return hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    ok = await asyncio.to_thread(_verify)
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
