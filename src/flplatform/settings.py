"""Runtime configuration: one pydantic-settings class, every variable prefixed ``FLP_``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SQLITE_FILE = "flplatform.db"
DEFAULT_SECRET_FILE = ".flplatform-secret"


def _default_secret(path: Path) -> str:
    """A per-checkout secret for the embedded default, kept in a file so restarts keep tokens valid
    (created 0600 atomically and read once per process: flplatform.kit.secret_file.file_secret)."""
    from flplatform.kit.secret_file import file_secret

    return file_secret(path)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLP_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default=f"sqlite+aiosqlite:///{DEFAULT_SQLITE_FILE}",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path.db or postgresql+asyncpg://user:pw@host/db",
    )
    secret_file: Path = Field(
        default=Path(DEFAULT_SECRET_FILE),
        description="Where the embedded SQLite default keeps its generated secret when FLP_SECRET_KEY is unset "
        "(relative paths: from the working directory; the container image uses its /data volume).",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Server secret (token hashing, token encryption, notification signatures). "
        "Required outside the embedded SQLite default.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR"
    )
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; ['*'] for any")

    # Request bodies (bytes; flplatform/auth/request_guard.py). Multipart bodies are capped by
    # max_upload_bytes, every other body by max_json_body_bytes unless a route says otherwise.
    max_upload_bytes: int = Field(
        default=2 * 1024**3,
        ge=1024,
        description="Largest multipart body (model uploads); also the cap on any body",
    )
    max_json_body_bytes: int = Field(
        default=1024**2,
        ge=1024,
        description="Largest JSON (or other non-multipart) body, unless a route overrides",
    )
    inference_max_json_body_bytes: int = Field(
        default=16 * 1024**2,
        ge=1024,
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
    argon2_time_cost: int = Field(default=3, ge=1, description="Argon2 password hashing: iterations")
    argon2_memory_cost_kib: int = Field(
        default=65536, ge=64, description="Argon2 password hashing: memory (KiB)"
    )

    # Login throttling (flplatform/auth/login_guard.py): failed password logins in a fixed window.
    login_window_seconds: float = Field(
        default=300.0, gt=0, description="Length of the window failed logins are counted in"
    )
    login_max_failures_per_account: int = Field(
        default=10, ge=1, description="Failed logins for one user name/email per window before 429"
    )
    login_max_failures_per_address: int = Field(
        default=50,
        ge=1,
        description="Failed logins from one client address per window (any user names) before 429",
    )
    login_throttle_storage_uri: str = Field(
        default="auto",
        description="Where the counters live: `database` (shared by every worker: the default on PostgreSQL), "
        "`memory` (per process: the default on SQLite), or a `limits` storage URI such as async+redis://host:6379",
    )
    password_hash_concurrency: int = Field(
        default_factory=lambda: max(1, (os.cpu_count() or 1) // 4),
        ge=1,
        description="Password hashes/verifications computed at once per process, in threads of their own "
        "(default: a quarter of the CPUs, at least 1)",
    )
    password_hash_max_waiting: int = Field(
        default=32, ge=0, description="Logins waiting for a hashing thread beyond which new ones get 429"
    )
    admin_username: str | None = Field(
        default=None,
        description="With FLP_ADMIN_PASSWORD: a superuser created at start-up if no user has this name",
    )
    admin_email: str | None = Field(default=None, description="E-mail of that superuser")
    admin_password: SecretStr | None = Field(default=None, description="Password of that superuser")

    # Training lifecycle and notifications (trainings/service.py, trainings/notifications.py).
    notification_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Total deadline of one delivery attempt: DNS, connect, send, answer and its "
        "(capped) body together; a trickling endpoint cannot stretch it",
    )
    notification_max_response_bytes: int = Field(
        default=4096,
        ge=0,
        description="Bytes of an endpoint's answer read at most (raw, undecoded); the rest is "
        "never read and the connection is closed",
    )
    notification_max_in_flight: int = Field(
        default=64,
        ge=1,
        description="Deliveries one process runs at the same time, each to a different recipient "
        "(a slow endpoint holds only its own slot)",
    )
    notification_allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="Networks notifications may go to although the SSRF guard refuses them otherwise (loopback, "
        "link-local, …), comma-separated CIDRs, e.g. 127.0.0.0/8,::1/128 for a one-host install. Cloud "
        "metadata addresses stay refused",
    )
    notification_allow_private_networks: bool = Field(
        default=True,
        description="Allow notification endpoints in 10/8, 172.16/12, 192.168/16 and fc00::/7 "
        "(on-premise clients live there); set false where the server shares a network with internal services",
    )
    notification_max_attempts: int = Field(default=5, ge=1, description="Transport attempts before giving up")
    notification_backoff_seconds: float = Field(
        default=2.0, ge=0, description="Retry k waits k times this (linear back-off)"
    )
    bill_due_days: float = Field(
        default=30.0,
        gt=0,
        le=3650,
        description="Days after issue an administrator's bill is due; an open bill past it stops the "
        "addressee's new paid work (402 bill_overdue) until it is paid",
    )
    training_sweep_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often deadlines, expired locks and due notifications are checked"
    )
    training_recovery_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often (and at start-up) every active training is re-checked for a round "
        "whose condition is met but that nothing advanced (a process killed between an upload and its aggregation)",
    )
    fold_max_open_rounds: int = Field(
        default=4,
        ge=0,
        description="Rounds per server process whose updates are folded as they arrive (one float64 "
        "accumulator, 2x the model, each; further rounds fold when they close); 0 folds every round "
        "when it closes. Either way the result is bitwise the same whatever the arrival order",
    )
    fold_on_arrival_min_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=0,
        description="Updates smaller than this (bytes stored) are not folded as they arrive but when their "
        "round closes, unless the round's folder is open already: for small models the fold's fixed "
        "cost per update (a few ms of server CPU) outweighs its arithmetic, which is cheap at the close. "
        "0 folds every update on arrival (within FLP_FOLD_MAX_OPEN_ROUNDS); the result is bitwise the same",
    )
    aggregation_lease_seconds: int = Field(
        default=900,
        ge=1,
        description="A round claimed for aggregation is free again after this (crash recovery)",
    )
    client_offline_after_seconds: float = Field(
        default=90.0,
        gt=0,
        description="A participant not heard from (HTTP heartbeat or broker pong) for this long is offline "
        "(online before that, unknown until its first heartbeat)",
    )
    client_drop_after_seconds: float = Field(
        default=300.0,
        ge=0,
        description="A client selected for a round and not heard from for this long is dropped from the "
        "round (it stays a participant); 0: never. Clients never heard from are not dropped",
    )
    training_events_keep: int = Field(
        default=1000,
        ge=10,
        description="Newest events kept per training for GET /api/trainings/{id}/events/ (replay with "
        "Last-Event-ID); older ones are pruned",
    )
    training_events_prune_interval_seconds: float = Field(
        default=60.0, gt=0, description="How often each server process prunes the training events"
    )
    training_events_poll_seconds: float = Field(
        default=5.0,
        gt=0,
        description="An event stream re-reads its training's events at least this often (wake-ups are "
        "immediate; this bounds the delay when one is lost)",
    )
    training_events_ping_seconds: float = Field(
        default=15.0, gt=0, description="Keep-alive comment interval of an idle event stream"
    )

    # Work queue (workqueue/): aggregation and other background jobs claimed by any worker process.
    inprocess_worker: bool = Field(
        default=True, description="`flplatform serve` also runs a queue worker in each server process"
    )
    worker_concurrency: int = Field(
        default=2, ge=1, description="Jobs one worker process runs at the same time"
    )
    worker_poll_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often an idle worker looks for jobs (PostgreSQL also wakes it by NOTIFY)",
    )
    work_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A claimed job is renewed while running; a dead worker's job is free after this",
    )
    work_max_attempts: int = Field(
        default=5, ge=1, description="Claims of one job before it is marked as an error"
    )

    # Prometheus metrics (kit/metrics.py, kit/prometheus.py; docs/operations.md).
    metrics_enabled: bool = Field(
        default=False, description="Serve Prometheus metrics at /metrics (off: /metrics is a 404)"
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="When set, /metrics answers only `Authorization: Bearer <this token>` (else 401)",
    )

    # Blob store (blobs/, docs/storage.md): every model byte, named by its SHA-256.
    blob_dir: Path | None = Field(
        default=None,
        description="Directory of the filesystem blob store (default: `blobs/` next to the SQLite database file, "
        "or in the working directory on PostgreSQL); every process of one install must see the same directory",
    )
    blob_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix: keep blobs in S3-compatible object storage instead of FLP_BLOB_DIR "
        "(installs with several hosts)",
    )
    blob_s3_endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL for a self-hosted S3-compatible server (http://host:9000); unset for AWS",
    )
    blob_s3_region: str = Field(default="us-east-1", description="S3 region")
    blob_s3_access_key_id: str | None = Field(
        default=None, description="S3 access key id (unset: the environment's AWS credentials)"
    )
    blob_s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret access key")
    blob_spool_dir: Path | None = Field(
        default=None,
        description="Local directory where S3 uploads are spooled while they are hashed (default: the system "
        "temporary directory); needs room for the uploads in flight",
    )
    blob_gc_grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="A blob no row references is deleted by the sweep only once it is older than this (uploads "
        "in flight have written their blob before their row)",
    )
    blob_sweep_interval_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="How often each server process deletes the blobs no row references (older than the grace period)",
    )
    global_history_keep_rounds: int = Field(
        default=0,
        ge=0,
        description="Rounds of each global model's history kept downloadable: 0 keeps every round, K the last K "
        "(older rounds answer 404 and their blobs are swept)",
    )

    # Database pool (PostgreSQL).
    db_pool_size: int = Field(default=10, ge=1, description="PostgreSQL connections kept per process")
    db_max_overflow: int = Field(default=20, ge=0, description="Extra PostgreSQL connections under load")

    @field_validator("notification_allowed_networks", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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
        return _default_secret(self.secret_file)


@lru_cache
def get_settings() -> Settings:
    return Settings()
