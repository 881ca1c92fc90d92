"""Which store a process uses: ``FLP_BLOB_URL`` (``s3://…``) or the directory ``FLP_BLOB_DIR``,
by default ``blobs/`` next to the SQLite database file (the working directory's ``blobs/`` on
PostgreSQL). One store belongs to one database: the sweep deletes what that database no longer
references.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.blobs.base import BlobStore
from flplatform.blobs.filesystem import FileBlobStore
from flplatform.settings import Settings, get_settings

SESSION_KEY = "blob_store"
# A work-queue job's payload lists the blobs it still needs under this key (the sweep keeps them).
BLOB_DIGESTS_KEY = "blob_digests"
_stores: dict[tuple[str, ...], BlobStore] = {}
_lock = threading.Lock()


def default_blob_dir(database_url: str) -> Path:
    """``blobs/`` next to a SQLite database file, else in the working directory."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).absolute().parent / "blobs"
    return Path("blobs").absolute()


def _key(settings: Settings, database_url: str) -> tuple[str, ...]:
    if settings.blob_url:
        secret = settings.blob_s3_secret_access_key
        return (
            settings.blob_url,
            settings.blob_s3_endpoint or "",
            settings.blob_s3_region,
            settings.blob_s3_access_key_id or "",
            secret.get_secret_value() if secret is not None else "",
            str(settings.blob_spool_dir or ""),
        )
    directory = settings.blob_dir or default_blob_dir(database_url)
    return ("file", str(Path(directory).absolute()))


def _open(settings: Settings) -> BlobStore:
    assert settings.blob_url
    from flplatform.blobs.s3 import S3BlobStore

    secret = settings.blob_s3_secret_access_key
    return S3BlobStore(
        settings.blob_url,
        endpoint=settings.blob_s3_endpoint,
        region=settings.blob_s3_region,
        access_key_id=settings.blob_s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        spool_dir=settings.blob_spool_dir,
    )


def open_store(settings: Settings, database_url: str | None = None) -> BlobStore:
    """The process's store for these settings (one object per location, shared)."""
    url = database_url or settings.database_url
    key = _key(settings, url)
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = _open(settings) if settings.blob_url else FileBlobStore(Path(key[1]))
            _stores[key] = store
        return store


def store_for(session: AsyncSession) -> BlobStore:
    """The store of the database this session talks to: the one the application or worker bound
    to its sessionmaker (``info={"blob_store": …}``), else the one the settings name for the
    session's database URL."""
    store = session.info.get(SESSION_KEY)
    if store is None:
        bind = session.bind
        url = bind.engine.url.render_as_string(hide_password=False) if bind is not None else None
        store = open_store(get_settings(), url)
        session.info[SESSION_KEY] = store
    assert isinstance(store, BlobStore)
    return store
