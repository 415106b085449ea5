"""Input layouts for the shard writer: what files there are and which label each has.

* ``classes``: the ImageNet ``train/`` layout, ``SRC/<class>/<file>``; labels follow the sorted
  class-folder names (as torchvision's ImageFolder), or a given ``classes.json``.
* ``val``: the ImageNet validation layout, a flat folder plus a label file whose lines name a file
  and its class (``ILSVRC2012_val_00000001.JPEG n01751748``, whitespace or comma separated; the
  ``LOC_val_solution.csv`` form, whose second field starts with the class, also works). Pass the
  train shards' ``classes.json`` so the labels agree with training.
* ``flat``: a label-less folder (every label is -1), searched recursively.
* ``parquet``: a Hugging Face Parquet image dataset (``data/train-0000K-of-0000N.parquet``: an
  ``image`` struct<bytes, path> column and a ``label`` column), ``parquet_source``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import DataError

LAYOUTS = ("classes", "val", "flat", "parquet")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class SourceError(DataError):
    """The source tree does not match the requested layout."""


@dataclass(frozen=True)
class SourceItem:
    rel: str  # path relative to the source root, '/'-separated
    label: int
    size: int  # bytes on disk (drives the deterministic shard assignment)


def _visible_files(root: Path, recursive: bool) -> list[Path]:
    it = root.rglob("*") if recursive else root.iterdir()
    out = []
    for p in it:
        rel_parts = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel_parts):
            continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints)
        if p.is_file():
            out.append(p)
    return sorted(out)


def scan_classes(root: Path, classes: dict[str, int] | None = None) -> tuple[list[SourceItem], dict[str, int]]:
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise SourceError(f"{root}: no class folders found (expected SRC/<class>/<file>)")
    if classes is None:
        classes = {name: i for i, name in enumerate(dirs)}
    unknown = [d for d in dirs if d not in classes]
    if unknown:
        raise SourceError(f"{root}: class folders {unknown[:5]} are not in the given classes.json")
    items = []
    for name in dirs:
        for f in _visible_files(root / name, recursive=True):
            items.append(SourceItem(f.relative_to(root).as_posix(), classes[name], f.stat().st_size))
    return items, classes


def parse_label_file(path: Path) -> dict[str, str]:
    """File name -> class name, from '<file> <class>' or 'file,class ...' lines (a header is skipped)."""
    mapping: dict[str, str] = {}
    for ln in path.read_text().splitlines():
        fields = [f for f in re.split(r"[,\s]+", ln.strip()) if f]
        if len(fields) < 2 or fields[0].lower() in ("imageid", "filename", "file"):
            continue
        name = fields[0]
        mapping[name] = fields[1]
        mapping.setdefault(Path(name).stem, fields[1])  # CSVs often give the id without extension
    if not mapping:
        raise SourceError(f"label file {path}: no '<file> <class>' lines found")
    return mapping


def scan_val(root: Path, label_file: Path, classes: dict[str, int] | None) -> tuple[list[SourceItem], dict[str, int]]:
    labels = parse_label_file(label_file)
    if classes is None:
        classes = {name: i for i, name in enumerate(sorted(set(labels.values())))}
    items = []
    missing = []
    for f in _visible_files(root, recursive=False):
        cls = labels.get(f.name, labels.get(f.stem))
        if cls is None:
            missing.append(f.name)
            continue
        if cls not in classes:
            raise SourceError(f"{label_file}: class {cls!r} of {f.name} is not in classes.json")
        items.append(SourceItem(f.name, classes[cls], f.stat().st_size))
    if missing:
        raise SourceError(f"{root}: {len(missing)} file(s) have no label in {label_file}, e.g. {missing[:3]}")
    return items, classes


def scan_flat(root: Path) -> tuple[list[SourceItem], dict[str, int]]:
    items = [SourceItem(f.relative_to(root).as_posix(), -1, f.stat().st_size) for f in _visible_files(root, True)]
    return items, {}


def scan(root: str | Path, layout: str, label_file: str | None = None, classes_json: str | None = None):
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"source {root} is not a directory")
    if layout not in LAYOUTS:
        raise SourceError(f"layout {layout!r}: allowed values are {list(LAYOUTS)}")
    classes = json.loads(Path(classes_json).read_text()) if classes_json else None
    if layout == "classes":
        items, classes = scan_classes(root, classes)
    elif layout == "val":
        if not label_file:
            raise SourceError("layout 'val' needs --labels FILE")
        items, classes = scan_val(root, Path(label_file), classes)
    elif layout == "parquet":  # rows of Parquet files: data_pipeline.shards.parquet_source
        raise SourceError("layout 'parquet' is read by parquet_source.scan_parquet, not scan")
    else:
        items, classes = scan_flat(root)
    if not items:
        raise SourceError(f"{root}: no files found")
    return items, classes


def sample_key(rel: str) -> str:
    """A WebDataset key from a relative path: no dots (they start the extension), no slashes."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return _KEY_SAFE.sub("_", stem.replace("/", "__"))
