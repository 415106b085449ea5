"""Dataset splits in downloaded layouts: never merged silently.

Hugging Face Parquet sets name their files ``train-00000-of-00004.parquet`` (or keep them in a
``train/`` folder); timm's WebDataset sets ``imagenet1k-train-0000.tar`` beside ``imagenet1k-
validation-0000.tar`` and an ``_info.json`` (or ``info.json``) listing each split's files and
sample counts. A source holding more than one split is refused unless ``--split`` picks one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path, PurePosixPath

from engine.errors import DataError

log = logging.getLogger(__name__)

KNOWN = ("train", "validation", "val", "valid", "test", "eval")
_TOKEN = re.compile(r"(?:^|[-_./])(" + "|".join(KNOWN) + r")(?=[-_./]|$)")


class SplitError(DataError):
    """The sources hold several splits and none was chosen, or not the one asked for."""


def split_of(path: str) -> str | None:
    """The split a file belongs to, from its name or its folder (None: not said)."""
    p = PurePosixPath(str(path))
    m = _TOKEN.search(p.name.lower())
    if m:
        return m.group(1)
    parent = p.parent.name.lower()
    return parent if parent in KNOWN else None


def select(paths: list, split: str, what: str) -> list:
    """The paths of ``split`` (all when the sources name at most one split and none is asked)."""
    found = sorted({s for s in (split_of(str(p)) for p in paths) if s})
    if split:
        kept = [p for p in paths if split_of(str(p)) == split]
        if not kept:
            raise SplitError(f"no {what} of split {split!r} among the sources (splits found: {found or 'none'})")
        return kept
    if len(found) > 1:
        raise SplitError(
            f"the sources hold {what} of several splits ({', '.join(found)}); choose one with --split "
            f"{found[0] if 'train' not in found else 'train'} (splits are never merged)"
        )
    return paths


def info_file(folder: Path) -> dict | None:
    """timm's WebDataset description (``_info.json`` or ``info.json``) of a folder, when present."""
    for name in ("_info.json", "info.json"):
        f = folder / name
        if f.is_file():
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError) as err:
                log.warning("%s is unreadable (%s); the tars are taken from the folder", f, err)
                return None
            return doc if isinstance(doc, dict) and isinstance(doc.get("splits"), dict) else None
    return None


def info_split(folder: Path, info: dict, split: str) -> tuple[list[Path], int | None]:
    """A split's tars as the info file lists them, and its sample count (None: not given)."""
    splits = info["splits"]
    if not split:
        if len(splits) > 1:
            names = sorted(splits)
            raise SplitError(
                f"{folder} holds the splits {', '.join(names)} (its info file says so); choose one with --split"
            )
        split = next(iter(splits))
    if split not in splits:
        raise SplitError(f"{folder}: its info file lists the splits {sorted(splits)}, not {split!r}")
    entry = splits[split] if isinstance(splits[split], dict) else {}
    names = entry.get("filenames") or []
    tars = [folder / n for n in names] if names else None
    if tars is None:
        tars = [p for p in sorted(folder.glob("*.tar")) if split_of(p.name) == split]
    missing = [t.name for t in tars if not t.is_file()]
    if missing:
        raise SplitError(f"{folder}: split {split!r} lists tars that are not there: {missing[:3]}")
    count = entry.get("num_samples")
    if count is None and isinstance(entry.get("shard_lengths"), list):
        count = sum(int(n) for n in entry["shard_lengths"])
    return tars, int(count) if count is not None else None
