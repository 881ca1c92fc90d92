"""The blob store: every model byte (weights and their history, local updates, SWAG moments,
preprocessing modules, aggregator state, inference-job inputs) lives here, named by its SHA-256;
database rows keep only the digest and the size. See docs/storage.md.

Backends: :class:`FileBlobStore` (a directory; the default) and :class:`S3BlobStore` (S3-compatible
object storage, several hosts). :func:`store_for` finds the store of a session's database.
"""

from flplatform.blobs.base import (  # noqa: F401
    BlobError,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    BlobWriter,
    StoredBlob,
    blob_key,
    check_digest,
    digest_of,
)
from flplatform.blobs.config import BLOB_DIGESTS_KEY, SESSION_KEY, default_blob_dir, open_store, store_for  # noqa: F401
from flplatform.blobs.filesystem import FileBlobStore  # noqa: F401
