"""The samples of a shard folder as columns, read from its Parquet manifest.

A shard folder is what ``make_shards`` writes (the tars beside the manifest) or what
``index_shards`` writes for tars that stay where they are (``dataset.json`` names each tar by its
path, and the samples' label source and image formats).

Both loaders address samples by their manifest row (a stable integer id): the byte range of the
JPEG inside its tar, its stored width and height, and its label all come from the manifest, so
reading a sample is one ``pread`` and no tar has to be walked. The DALI index files stay in the
shard folder for other tools; ``data_pipeline.verify`` checks that they agree with the manifest.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import DataError

__all__ = ["DataError", "SampleTable", "check_shard_name", "read_table"]

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_shard_name(name: object, where: Path) -> str:
    """A shard name must be a plain file name: no folders, no '..', nothing absolute."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or ".." in name:
        raise DataError(
            f"{where}: shard name {name!r} is not a plain file name; refusing to read or write outside {where.parent}"
        )
    return name


@dataclass
class SampleTable:
    root: Path
    shards: tuple[str, ...]  # shard names in dataset.json order
    shard_id: np.ndarray  # [N] int32, index into ``shards``
    offset: np.ndarray  # [N] int64, byte offset of the JPEG data in its tar
    size: np.ndarray  # [N] int64
    width: np.ndarray  # [N] int32, as stored
    height: np.ndarray  # [N] int32
    label: np.ndarray  # [N] int64 (-1 for unlabeled data)
    keys: object  # pyarrow string array [N] (compact; read one at a time)
    num_classes: int = 0
    tar_paths: dict[str, str] = field(default_factory=dict)  # shard -> tar path, for tars indexed in place
    label_source: str = "cls"  # cls | json:FIELD | none: where the tar keeps a sample's label
    formats: np.ndarray | None = None  # [N] image format (jpeg, png, webp); None = JPEG throughout
    _files: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.offset)

    def tar(self, name: str) -> Path:
        given = self.tar_paths.get(name)
        return Path(given) if given else self.root / f"{name}.tar"

    def format(self, i: int) -> str:
        return "jpeg" if self.formats is None else str(self.formats[int(i)])

    def idx(self, name: str) -> Path:
        return self.root / f"{name}.idx"

    def key(self, i: int) -> str:
        """'<shard>/<key>' of manifest row ``i`` (what logs, audits and error messages show)."""
        return f"{self.shards[int(self.shard_id[i])]}/{self.keys[int(i)].as_py()}"

    def read(self, i: int) -> bytes:
        """The JPEG bytes of row ``i``: one positional read from an fd kept open per shard."""
        sid = int(self.shard_id[i])
        fd = self._files.get(sid)
        if fd is None:
            fd = self._files[sid] = os.open(self.tar(self.shards[sid]), os.O_RDONLY)
        size = int(self.size[i])
        data = os.pread(fd, size, int(self.offset[i]))
        if len(data) != size:
            raise DataError(
                f"{self.key(i)}: read {len(data)} of {size} bytes (the tar is shorter than the manifest says)"
            )
        return data

    def fingerprint(self) -> str:
        """What the sample rows are: a hash of the manifest (keys, shards, byte ranges, labels). Two
        folders with the same fingerprint order and crop every epoch alike."""
        if "fingerprint" not in self._files:
            import hashlib

            h = hashlib.sha256()
            with open(self.root / "manifest.parquet", "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            self._files["fingerprint"] = h.hexdigest()[:16]
        return self._files["fingerprint"]

    def rows_of(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.shard_id == self.shards.index(name))

    def close(self) -> None:
        for key, fd in self._files.items():
            if isinstance(key, int):
                os.close(fd)
        self._files.clear()

    def __getstate__(self) -> dict:  # worker processes open their own file descriptors
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def read_table(root: str | Path) -> SampleTable:
    """Load a finished shard folder's manifest; refuses folders that are not finished or consistent."""
    import pyarrow.parquet as pq

    root = Path(root)
    meta_path, manifest = root / "dataset.json", root / "manifest.parquet"
    if not meta_path.is_file() or not manifest.is_file():
        raise DataError(
            f"{root.resolve()} is not a finished shard folder (dataset.json and manifest.parquet are required); "
            "create it with: python -m data_pipeline.make_shards SRC OUT"
        )
    meta = json.loads(meta_path.read_text())
    shards = tuple(check_shard_name(s, meta_path) for s in meta["shards"])
    columns = ["key", "label", "shard", "offset", "size", "width", "height"]
    has_format = "format" in pq.ParquetFile(manifest).schema_arrow.names
    t = pq.read_table(manifest, columns=[*columns, "format"] if has_format else columns)
    if t.num_rows != meta["num_samples"]:
        raise DataError(f"{root}: manifest has {t.num_rows} rows but dataset.json says {meta['num_samples']}")
    names = t.column("shard").to_numpy(zero_copy_only=False)
    uniq, inverse = np.unique(names, return_inverse=True)
    unknown = [str(u) for u in uniq if u not in shards]
    if unknown:
        raise DataError(f"{manifest}: rows name shard(s) {unknown[:5]} that dataset.json does not list")
    position = {s: i for i, s in enumerate(shards)}
    shard_id = np.asarray([position[str(u)] for u in uniq], dtype=np.int32)[inverse]
    return SampleTable(
        root=root,
        shards=shards,
        shard_id=shard_id,
        offset=t.column("offset").to_numpy().astype(np.int64),
        size=t.column("size").to_numpy().astype(np.int64),
        width=t.column("width").to_numpy().astype(np.int32),
        height=t.column("height").to_numpy().astype(np.int32),
        label=t.column("label").to_numpy().astype(np.int64),
        keys=t.column("key").combine_chunks(),
        num_classes=int(meta.get("num_classes", 0)),
        tar_paths={str(k): str(v) for k, v in meta.get("tars", {}).items()},
        label_source=str(meta.get("label", "cls")),
        formats=t.column("format").to_numpy(zero_copy_only=False) if has_format else None,
    )
