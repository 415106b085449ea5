"""Content checksums, in one place, always streamed (a file is never read whole into memory).

* ``checksum`` / ``file_checksum``: BLAKE2b-128, hex. What ``make_shards`` and ``index_shards``
  record for every sample's image bytes and every tar, and what fetches from object storage and
  ``verify`` compare against.
* ``sha256_file``: weight files a run refers to (teachers, generators, exports); its first 16 hex
  digits (``file_digest``) fingerprint a manifest.
* ``crc32_file``: checkpoint files (fast: CRC-32 is computed at memory speed and releases the GIL,
  so files are checked in parallel threads).
* ``HashingWriter``: a binary file that hashes what is written through it, so a writer knows the
  checksum of the bytes it wrote without reading them back (and never the bytes another process
  wrote to the same name).
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import BinaryIO

BLOCK = 1 << 22  # 4 MiB reads


def checksum(data: bytes) -> str:
    """BLAKE2b-128 of ``data`` (hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_checksum(path: str | Path) -> str:
    """BLAKE2b-128 of a file's bytes (hex), streamed."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """A short fingerprint of a file (the first 16 hex digits of its SHA-256)."""
    return sha256_file(path)[:16]


def crc32_file(path: str | Path, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


class HashingWriter:
    """Wraps a binary file opened for writing: ``write`` passes bytes on and hashes them (BLAKE2b-128
    by default). ``tell`` counts what was written, which is all ``tarfile`` asks of a stream."""

    def __init__(self, raw: BinaryIO, kind: str = "blake2b"):
        self.raw = raw
        self.hash = hashlib.blake2b(digest_size=16) if kind == "blake2b" else hashlib.new(kind)
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.bytes += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self.raw.flush()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()
