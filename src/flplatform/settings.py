"""Runtime configuration: one pydantic-settings class, every variable prefixed ``FLP_``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_FILE = "flplatform.db"
_DEV_SECRET_FILE = ".flplatform-secret"


def _default_secret() -> str:
    """A per-checkout secret for the embedded default, kept in a file so restarts keep tokens valid
    (created 0600 atomically and read once per process: flplatform.security.file_secret)."""
    from flplatform.security import file_secret

    return file_secret(Path(_DEV_SECRET_FILE))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLP_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default=f"sqlite+aiosqlite:///{DEFAULT_SQLITE_FILE}",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path.db or postgresql+asyncpg://user:pw@host/db",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Server secret (token hashing, token encryption, notification signatures). "
        "Required outside the embedded SQLite default.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; ['*'] for any")

    # Request bodies (bytes; flplatform/request_guard.py). Multipart bodies are capped by
    # max_upload_bytes, every other body by max_json_body_bytes unless a route says otherwise.
    max_upload_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="Largest multipart body (model uploads); also the cap on any body"
    )
    max_json_body_bytes: int = Field(
        default=1024**2, ge=1024, description="Largest JSON (or other non-multipart) body, unless a route overrides"
    )
    inference_max_json_body_bytes: int = Field(
        default=16 * 1024**2, ge=1024,
        description="Largest JSON body of POST /api/inference/ and /api/inference/jobs/ (inputs as JSON lists); "
        "larger inputs go as multipart files",
    )
    # Zip archives (torch.save / TorchScript) are refused before loading beyond these.
    max_archive_uncompressed_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="Largest sum of a zip archive's declared uncompressed sizes"
    )
    max_archive_compression_ratio: float = Field(
        default=20.0, ge=1.0, description="Largest uncompressed/compressed ratio of a zip archive above 1 MiB"
    )
    max_archive_entries: int = Field(default=100_000, ge=1, description="Most files in a zip archive")

    # Identity.
    allow_self_registration: bool = Field(
        default=False, description="Let anonymous callers create (non-staff) users with POST /api/users/"
    )
    access_token_ttl_seconds: int = Field(default=24 * 3600, ge=60, description="Lifetime of OAuth2 tokens")
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_cost_kib: int = Field(default=65536, ge=64)

    # Login throttling (flplatform/login_guard.py): failed password logins in a fixed window.
    login_window_seconds: float = Field(
        default=300.0, gt=0, description="Length of the window failed logins are counted in"
    )
    login_max_failures_per_account: int = Field(
        default=10, ge=1, description="Failed logins for one user name/email per window before 429"
    )
    login_max_failures_per_address: int = Field(
        default=50, ge=1, description="Failed logins from one client address per window (any user names) before 429"
    )
    login_throttle_storage_uri: str = Field(
        default="auto",
        description="Where the counters live: `database` (shared by every worker: the default on PostgreSQL), "
        "`memory` (per process: the default on SQLite), or a `limits` storage URI such as async+redis://host:6379",
    )
    password_hash_concurrency: int = Field(
        default_factory=lambda: max(1, (os.cpu_count() or 1) // 4), ge=1,
        description="Password hashes/verifications computed at once per process, in threads of their own "
        "(default: a quarter of the CPUs, at least 1)",
    )
    password_hash_max_waiting: int = Field(
        default=32, ge=0, description="Logins waiting for a hashing thread beyond which new ones get 429"
    )
    admin_username: str | None = None
    admin_email: str | None = None
    admin_password: SecretStr | None = None

    # Training lifecycle and notifications (services/trainings.py, services/notifications.py).
    notification_timeout_seconds: float = Field(default=5.0, gt=0, description="Per-attempt HTTP timeout")
    notification_max_attempts: int = Field(default=5, ge=1, description="Transport attempts before giving up")
    notification_backoff_seconds: float = Field(
        default=2.0, ge=0, description="Retry k waits k times this (linear back-off)"
    )
    training_sweep_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often deadlines, expired locks and due notifications are checked"
    )
    aggregation_lease_seconds: int = Field(
        default=900, ge=1, description="A round claimed for aggregation is free again after this (crash recovery)"
    )

    # Work queue (workqueue/): aggregation and other background jobs claimed by any worker process.
    inprocess_worker: bool = Field(
        default=True, description="`flplatform serve` also runs a queue worker in each server process"
    )
    worker_concurrency: int = Field(default=2, ge=1, description="Jobs one worker process runs at the same time")
    worker_poll_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often an idle worker looks for jobs (PostgreSQL also wakes it by NOTIFY)"
    )
    work_lease_seconds: float = Field(
        default=60.0, gt=0, description="A claimed job is renewed while running; a dead worker's job is free after this"
    )
    work_max_attempts: int = Field(default=5, ge=1, description="Claims of one job before it is marked as an error")

    # Database pool (PostgreSQL).
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, url: str) -> str:
        # Accept the common sync spellings and pick the async driver the service needs.
        if url.startswith("postgres://"):
            url = "postgresql://" + url.removeprefix("postgres://")
        if url.startswith("postgresql://"):
            url = "postgresql+asyncpg://" + url.removeprefix("postgresql://")
        if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
            url = "sqlite+aiosqlite://" + url.removeprefix("sqlite://")
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def secret(self) -> str:
        """The server secret; the embedded SQLite default gets a generated one kept on disk."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        if not self.is_sqlite:
            raise RuntimeError("FLP_SECRET_KEY must be set when running on PostgreSQL")
        return _default_secret()


@lru_cache
def get_settings() -> Settings:
    return Settings()
