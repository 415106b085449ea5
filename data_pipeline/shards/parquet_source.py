"""Hugging Face Parquet image datasets as a shard source (``make_shards --layout parquet``).

The ``datasets`` library stores an ``Image`` feature as struct<bytes: binary, path: string> and a
``ClassLabel`` as an integer column; the class names are in each file's schema metadata (the
``huggingface`` key: ``info.features.label.names``). A sample is one row, named
``<file relative to SRC>/<row>``; JPEG bytes pass through unchanged, other formats are re-encoded as
for any source; a label of -1 (the test split of a labelled set) means unlabeled.

Files are taken in sorted order and rows in file order (no shuffle: the loaders draw a global sample
order, so a shard need not mix classes), which keeps each shard's rows in one or two files and lets
a shard read only the row groups that hold them.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.shards.sources import SourceError, SourceItem

IMAGE_COLUMNS = ("image", "img", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "cls", "class")


def _columns(schema) -> tuple[str, str | None]:
    names = schema.names
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    if image is None:
        raise SourceError(f"no image column among {names} (looked for {list(IMAGE_COLUMNS)})")
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    return image, label


def _class_names(schema, label: str | None) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta or label is None:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def parquet_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if not any(s.startswith(".") for s in p.relative_to(root).parts))


def scan_parquet(
    root: Path, split: str = "", classes_json: str | None = None
) -> tuple[list[SourceItem], dict[str, int]]:
    """Every row of every Parquet file of ``split`` under ``root``: (items, classes). Reads metadata and
    the label column only; a row's size is its file's mean (for cutting shards, without reading the
    images). Files of several splits need ``split`` (never merged)."""
    import pyarrow.parquet as pq

    from data_pipeline.shards.splits import select

    files = parquet_files(root)
    if not files:
        raise SourceError(f"{root}: no .parquet files")
    files = select([f.relative_to(root).as_posix() for f in files], split, "Parquet files")
    files = [root / f for f in files]
    items: list[SourceItem] = []
    names: list[str] | None = None
    labelled = False
    for f in files:
        pf = pq.ParquetFile(f)
        try:
            _, label = _columns(pf.schema_arrow)
        except SourceError as err:
            raise SourceError(f"{f}: {err}") from None
        rows = pf.metadata.num_rows
        size = max(1, f.stat().st_size // max(rows, 1))
        labels = pf.read(columns=[label]).column(0).to_pylist() if label else [-1] * rows
        names = names or _class_names(pf.schema_arrow, label)
        rel = f.relative_to(root).as_posix()
        for i, v in enumerate(labels):
            lab = int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else -1
            labelled |= lab >= 0
            items.append(SourceItem(f"{rel}/{i}", lab, size))
    if not labelled:
        return items, {}
    if names is None:
        top = max(it.label for it in items)
        names = [str(i) for i in range(top + 1)]
    classes = {n: i for i, n in enumerate(names)}
    if classes_json:  # the training set's mapping: it must be the same names in the same order
        given = json.loads(Path(classes_json).read_text())
        if given != classes:
            raise SourceError(f"{classes_json}: other class names or numbers than the Parquet files' own")
    return items, classes


def split(rel: str) -> tuple[str, int]:
    file, _, row = rel.rpartition("/")
    return file, int(row)


class RowReader:
    """Image bytes of the rows one shard needs, reading only the row groups that hold them."""

    def __init__(self, root: str | Path, rels: list[str]):
        import pyarrow.parquet as pq

        self.root = Path(root)
        self.data: dict[str, bytes | None] = {}
        wanted: dict[str, set[int]] = {}
        for rel in rels:
            f, row = split(rel)
            wanted.setdefault(f, set()).add(row)
        for f, rows in wanted.items():
            pf = pq.ParquetFile(self.root / f)
            image, _ = _columns(pf.schema_arrow)
            start, groups, starts = 0, [], []
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if any(start <= r < start + n for r in rows):
                    groups.append(g)
                    starts.append(start)
                start += n
            table = pf.read_row_groups(groups, columns=[image])
            values = table.column(0).to_pylist()
            offset = 0
            for g, s in zip(groups, starts):
                n = pf.metadata.row_group(g).num_rows
                for r in rows:
                    if s <= r < s + n:
                        v = values[offset + r - s]
                        self.data[f"{f}/{r}"] = _image_bytes(v)
                offset += n

    def read(self, rel: str) -> bytes:
        data = self.data.get(rel)
        if data is None:
            raise OSError(f"{rel}: the row has no image bytes")
        return data


def _image_bytes(v) -> bytes | None:
    if isinstance(v, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        v = v.get("bytes")
    return bytes(v) if isinstance(v, (bytes, bytearray)) and v else None
