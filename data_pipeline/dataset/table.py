"""The samples of a shard folder as columns, read from its Parquet manifest.

A shard folder is what ``make_shards`` writes (the tars beside the manifest) or what
``index_shards`` writes for tars that stay where they are (``dataset.json`` names each tar by its
path, and the samples' label source and image formats).

Both loaders address samples by their manifest row (a stable integer id): the byte range of the
JPEG inside its tar, its stored width and height, and its label all come from the manifest, so
reading a sample is one ``pread`` and no tar has to be walked. The DALI index files stay in the
shard folder for other tools; ``data_pipeline.shards.verify`` checks that they agree with the manifest.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from data_pipeline.dataset.columns import FORMATS, read_columns
from data_pipeline.dataset.hashing import file_digest
from engine.errors import DataError

__all__ = ["DataError", "SampleTable", "TarSource", "check_shard_name", "read_table"]

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_shard_name(name: object, where: Path) -> str:
    """A shard name must be a plain file name: no folders, no '..', nothing absolute."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or ".." in name:
        raise DataError(
            f"{where}: shard name {name!r} is not a plain file name; refusing to read or write outside {where.parent}"
        )
    return name


class ShortTar(DataError):
    """A tar ends before a sample the manifest places in it (every later sample of it is lost too)."""

    def __init__(self, message: str, shard: str, tar_bytes: int):
        super().__init__(message)
        self.shard, self.tar_bytes = shard, tar_bytes


class TarSource(Protocol):
    """Where the tars of a folder in object storage come from (``data_pipeline.remote.shards``)."""

    url: str
    tar_bytes: dict[str, int]

    def local(self, name: str) -> Path:
        """The tar's path in the node's cache, fetched when absent."""
        ...


@dataclass
class SampleTable:
    root: Path  # the shard folder (for remote data: the node's local copy of its metadata)
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
    formats: np.ndarray | None = None  # [N] uint8 code into columns.FORMATS; None = JPEG throughout
    shard_rows: np.ndarray | None = None  # [S+1] first row of each shard (None: rows not grouped by shard)
    digest: str | None = None  # the manifest's sha256 prefix, when the columns recorded it
    label_values: tuple[int, ...] | None = None  # the distinct labels, as dataset.json records them
    source: TarSource | None = None  # object storage the tars are fetched from (None: local files)
    open_limit: int = 16  # tars kept open per process (a closed, evicted cache file frees its space)
    _files: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def remote(self) -> bool:
        return self.source is not None

    def tar(self, name: str) -> Path:
        """The tar's local path (for remote data: its copy in the node's cache, fetched if absent)."""
        if self.source is not None:
            return self.source.local(name)
        given = self.tar_paths.get(name)
        return Path(given) if given else self.root / f"{name}.tar"

    def format(self, i: int) -> str:
        return "jpeg" if self.formats is None else FORMATS[int(self.formats[int(i)])]

    def idx(self, name: str) -> Path:
        return self.root / f"{name}.idx"

    def key(self, i: int) -> str:
        """'<shard>/<key>' of manifest row ``i`` (what logs, audits and error messages show)."""
        return f"{self.shards[int(self.shard_id[i])]}/{self.keys[int(i)].as_py()}"

    def _fd(self, sid: int) -> int:
        files = self._files.setdefault("fds", OrderedDict())
        fd = files.get(sid)
        if fd is not None:
            files.move_to_end(sid)
            return fd
        try:
            fd = os.open(self.tar(self.shards[sid]), os.O_RDONLY)
        except FileNotFoundError:
            if self.source is None:
                raise
            # another rank of the node evicted it between our fetch and this open (a cache near its
            # budget): fetch it again
            fd = os.open(self.tar(self.shards[sid]), os.O_RDONLY)
        files[sid] = fd
        while len(files) > self.open_limit:
            os.close(files.popitem(last=False)[1])
        return fd

    def read(self, i: int) -> bytes:
        """The image bytes of row ``i``: one positional read from an fd kept open per shard."""
        sid = int(self.shard_id[i])
        size = int(self.size[i])
        fd = self._fd(sid)
        data = os.pread(fd, size, int(self.offset[i]))
        if len(data) != size:
            raise ShortTar(
                f"{self.key(i)}: read {len(data)} of {size} bytes (the tar is shorter than the manifest says)",
                self.shards[sid],
                os.fstat(fd).st_size,
            )
        return data

    def fingerprint(self) -> str:
        """What the sample rows are: a hash of the manifest (keys, shards, byte ranges, labels). Two
        folders with the same fingerprint order and crop every epoch alike."""
        if self.digest:
            return self.digest
        if "fingerprint" not in self._files:
            self._files["fingerprint"] = file_digest(self.root / "manifest.parquet")
        return self._files["fingerprint"]

    def distinct_labels(self) -> np.ndarray:
        """The labels that occur, sorted (from dataset.json when it records them: no row is read)."""
        if self.label_values is not None:
            return np.asarray(self.label_values, dtype=np.int64)
        return np.unique(np.asarray(self.label))

    def rows_of(self, name: str) -> np.ndarray:
        sid = self.shards.index(name)
        if self.shard_rows is not None:
            return np.arange(self.shard_rows[sid], self.shard_rows[sid + 1])
        return np.flatnonzero(self.shard_id == sid)

    def close(self) -> None:
        for fd in self._files.pop("fds", {}).values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self) -> dict:  # worker processes open their own file descriptors
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def read_table(root: str | Path, source: TarSource | None = None) -> SampleTable:
    """Load a finished shard folder's manifest; refuses folders that are not finished or consistent.

    ``root`` is a local folder: a shard folder, or (with ``source``) the node's local copy of the
    metadata of a folder in object storage, whose tars ``source`` fetches as they are read
    (``data_pipeline.loaders.source.open_table`` opens either)."""
    root = Path(root)
    meta_path, manifest = root / "dataset.json", root / "manifest.parquet"
    if not meta_path.is_file() or not (manifest.is_file() or (root / "columns" / "meta.json").is_file()):
        raise DataError(
            f"{root.resolve()} is not a finished shard folder (dataset.json and manifest.parquet are required); "
            "create it with: python -m data_pipeline.make_shards SRC OUT"
        )
    meta = json.loads(meta_path.read_text())
    shards = tuple(check_shard_name(s, meta_path) for s in meta["shards"])
    if source is None and meta.get("tar_base"):
        raise DataError(
            f"{root} indexes tars in {meta['tar_base']}; publish it beside them (deepmim-upload {root} "
            f"{meta['tar_base']}) and train with data.shards={meta['tar_base']}"
        )
    common = {
        "root": root,
        "shards": shards,
        "num_classes": int(meta.get("num_classes", 0)),
        "tar_paths": {str(k): str(v) for k, v in meta.get("tars", {}).items()} if source is None else {},
        "label_source": str(meta.get("label", "cls")),
        "source": source,
        "label_values": tuple(int(v) for v in meta["label_values"]) if "label_values" in meta else None,
    }
    cols = read_columns(root, int(meta["num_samples"]))
    if cols is not None and len(cols["shard_rows"]) == len(shards) + 1:
        return SampleTable(
            shard_id=cols["shard"],
            offset=cols["offset"],
            size=cols["size"],
            width=cols["width"],
            height=cols["height"],
            label=cols["label"],
            keys=cols["keys"],
            formats=cols["format"],
            shard_rows=cols["shard_rows"],
            digest=cols["manifest_sha256"],
            **common,
        )
    return _from_parquet(manifest, meta, common)


def _from_parquet(manifest: Path, meta: dict, common: dict) -> SampleTable:
    """Shard folders written before the columns existed: the manifest loaded whole."""
    import pyarrow.parquet as pq

    root, shards = common["root"], common["shards"]
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
    formats = None
    if has_format:
        formats = np.asarray([FORMATS.index(f) for f in t.column("format").to_pylist()], dtype=np.uint8)
    grouped = len(shard_id) == 0 or not np.any(np.diff(shard_id) < 0)
    shard_rows = None
    if grouped:
        counts = np.bincount(shard_id, minlength=len(shards))
        shard_rows = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SampleTable(
        shard_id=shard_id,
        offset=t.column("offset").to_numpy().astype(np.int64),
        size=t.column("size").to_numpy().astype(np.int64),
        width=t.column("width").to_numpy().astype(np.int32),
        height=t.column("height").to_numpy().astype(np.int32),
        label=t.column("label").to_numpy().astype(np.int64),
        keys=t.column("key").combine_chunks(),
        formats=formats,
        shard_rows=shard_rows,
        **common,
    )


def overlap_warning(train_shards: str, val_shards: str) -> str | None:
    """A warning when the validation set is (partly) the training set: same folder or same JPEG bytes."""
    import pyarrow.parquet as pq

    a, b = Path(train_shards).resolve(), Path(val_shards).resolve()
    if a == b:
        return (
            f"the validation shards are the training shards ({a}): the accuracies measure memorization, "
            "not generalization; use a held-out split (make_shards of another folder)"
        )
    ca = set(pq.read_table(a / "manifest.parquet", columns=["checksum"]).column("checksum").to_pylist())
    cb = pq.read_table(b / "manifest.parquet", columns=["checksum"]).column("checksum").to_pylist()
    shared = sum(1 for c in cb if c in ca)
    if shared:
        return f"{shared} of {len(cb)} validation images are also in the training shards (same bytes)"
    return None
