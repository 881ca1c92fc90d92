"""Decompression limits for zip archives (``torch.save`` files and TorchScript archives), checked
from the central directory before anything is extracted or loaded.

torch writes its archives uncompressed, so a real model's entries add up to about the upload's
size; a small deflated archive that claims gigabytes is a decompression bomb. The declared sizes
are what torch's reader allocates and extracts (it refuses entries whose data disagree with them).
"""

from __future__ import annotations

import zipfile

from flplatform.settings import get_settings

_RATIO_FLOOR = 1024**2  # archives expanding to less than this are never refused for their ratio


class ArchiveTooLarge(ValueError):
    """The archive would expand beyond a limit (the message names the limit and its setting)."""


def check_archive_limits(archive: zipfile.ZipFile, archive_bytes: int) -> None:
    settings = get_settings()
    entries = archive.infolist()
    if len(entries) > settings.max_archive_entries:
        raise ArchiveTooLarge(
            f"The archive has {len(entries)} files; at most {settings.max_archive_entries} are accepted "
            "(FLP_MAX_ARCHIVE_ENTRIES)."
        )
    expanded = sum(entry.file_size for entry in entries)
    if expanded > settings.max_archive_uncompressed_bytes:
        raise ArchiveTooLarge(
            f"The archive expands to {expanded} bytes; at most {settings.max_archive_uncompressed_bytes} are "
            "accepted (FLP_MAX_ARCHIVE_UNCOMPRESSED_BYTES)."
        )
    ratio = expanded / max(1, archive_bytes)
    if expanded > _RATIO_FLOOR and ratio > settings.max_archive_compression_ratio:
        raise ArchiveTooLarge(
            f"The archive expands {ratio:.0f}-fold ({archive_bytes} to {expanded} bytes); at most "
            f"{settings.max_archive_compression_ratio:g}-fold is accepted (FLP_MAX_ARCHIVE_COMPRESSION_RATIO)."
        )
