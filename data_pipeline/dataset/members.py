"""What a sample in a tar is: members walked from the tar headers, the image format told from its
first bytes, and the checks that a member holds a whole image (format markers, a full decode).
Shared by the start-up checks, the indexer and the verifier."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from data_pipeline.dataset.wds_index import Component, IndexedSample


def image_format(head: bytes) -> str | None:
    """jpeg, png or webp from the first bytes (what decoders go by), None for anything else."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def scan_tar_index(tar_path: Path) -> list[IndexedSample]:
    """Index entries rebuilt by walking the tar headers (stops quietly at a truncated end)."""
    samples: list[IndexedSample] = []
    current: list[Component] = []
    last_key = None
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                ext = m.name.rpartition("/")[2].partition(".")[2]
                key = m.name[: len(m.name) - len(ext) - 1] if ext else m.name
                if key != last_key and current:
                    samples.append(IndexedSample(last_key, tuple(current)))
                    current = []
                last_key = key
                current.append(Component(ext, m.offset_data, m.size, m.name))
    except (tarfile.ReadError, EOFError, OSError):
        pass  # truncated: keep what was readable; sizes are checked against the file below
    if current:
        samples.append(IndexedSample(last_key, tuple(current)))
    return samples


def _jpeg_ok(fd: int, offset: int, size: int) -> str | None:
    if size < 4:
        return "JPEG too small"
    if os.pread(fd, 2, offset) != b"\xff\xd8":
        return "corrupt JPEG (no SOI marker)"
    tail_len = min(size, 1024)
    if b"\xff\xd9" not in os.pread(fd, tail_len, offset + size - tail_len):
        return "corrupt or truncated JPEG (no EOI marker)"
    return None


def _png_ok(fd: int, offset: int, size: int) -> str | None:
    if size < 20 or os.pread(fd, 8, offset) != b"\x89PNG\r\n\x1a\n":
        return "corrupt PNG (no PNG signature)"
    if b"IEND" not in os.pread(fd, 12, offset + size - 12):
        return "corrupt or truncated PNG (no IEND chunk at its end)"
    return None


def _webp_ok(fd: int, offset: int, size: int) -> str | None:
    head = os.pread(fd, 12, offset)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return "corrupt WebP (no RIFF/WEBP header)"
    if int.from_bytes(head[4:8], "little") + 8 > size:
        return "truncated WebP (its RIFF size is larger than the member)"
    return None


MARKER_CHECKS = {"jpeg": _jpeg_ok, "png": _png_ok, "webp": _webp_ok}


def decode_error(data: bytes) -> str | None:
    """Full decode with PIL (every byte of the image data); the reason when it fails."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as err:  # PIL raises many types
        return f"image does not decode ({type(err).__name__}: {str(err)[:120]})"
    return None
