"""The manifest rows of a folder in object storage, one shard at a time: what a node holds is what
its ranks read, not the whole manifest.

A folder written by ``make_shards``, ``index_shards`` or ``python -m data_pipeline.columns`` has its
columns as plain arrays (``columns/<name>.npy``, with each array's start recorded in
``columns/meta.json``) and its keys in a form read by byte range (``key_offsets.npy``,
``key_bytes.bin``). Rows are grouped by shard, so one shard's rows are one byte range of every column:
when a rank first reads a shard, ``ShardRows`` fetches those ranges (a few small GETs, next to the
shard's own tar) and keeps the rows of the last shards it read in memory. At 2 billion samples in
200,000 shards over 64 nodes, a node holds the shard list and the rows of the shards its ranks read
(bench/data_meta.py measures it), where a copy of the columns would be about 110 GB per node.

``LazyColumn`` indexes like the NumPy column it stands for (by one row or an array of rows), so the
loaders and the start-up checks read a remote table as they read a local one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from data_pipeline.dataset.columns import NUMERIC
from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.remote.retry import ChangedObject, with_retries
from data_pipeline.remote.stores import ObjectStore
from engine.errors import DataError

ROW_COLUMNS = {name: dtype for name, dtype in NUMERIC.items() if name != "shard"}  # the shard id is derived


def lazy_layout(columns_meta: dict) -> bool:
    """Whether a folder's columns can be read one shard at a time (written with their layout)."""
    offsets = columns_meta.get("data_offsets") or {}
    return all(f"{name}.npy" in offsets for name in (*ROW_COLUMNS, "key_offsets", "shard_rows"))


class ShardRows:
    def __init__(
        self,
        store: ObjectStore,
        spec: RemoteSpec,
        shards: tuple[str, ...],
        shard_rows: np.ndarray,
        columns_meta: dict,
        tar_bytes: dict[str, int],
        keep: int = 32,
    ):
        self.store, self.spec, self.shards = store, spec, shards
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)  # [S+1] first row of each shard
        self.offsets = dict(columns_meta["data_offsets"])
        self.has_format = "format.npy" in self.offsets
        self.tar_bytes = tar_bytes
        self.keep = keep
        self.fetched_bytes = 0
        self._blocks: OrderedDict[int, dict] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # worker processes keep blocks of their own
        return {**self.__dict__, "_blocks": OrderedDict(), "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def num_rows(self) -> int:
        return int(self.shard_rows[-1])

    def shard_of(self, rows):
        """Shard index of each row (an int for an int, an array for an array)."""
        found = np.searchsorted(self.shard_rows, rows, side="right") - 1
        return int(found) if np.ndim(found) == 0 else found.astype(np.int32)

    def block(self, sid: int) -> dict:
        """Every column of shard ``sid``'s rows (``key``: a list of strings)."""
        with self._lock:
            got = self._blocks.get(sid)
            if got is not None:
                self._blocks.move_to_end(sid)
                return got
        got = self._fetch(sid)  # (two threads may fetch the same shard at once: the same bytes)
        with self._lock:
            self._blocks[sid] = got
            while len(self._blocks) > self.keep:
                self._blocks.popitem(last=False)
        return got

    def _range(self, name: str, start: int, end: int) -> bytes:
        obj = f"columns/{name}"
        data = with_retries(lambda: self.store.get_range(obj, start, end), self.store.where(obj), self.spec)
        if len(data) != end - start:
            raise ChangedObject(
                f"{self.store.where(obj)}: {len(data)} bytes at {start} where {end - start} were asked: the columns "
                "changed since dataset.json was written; publish the folder again (deepmim-upload)"
            )
        self.fetched_bytes += len(data)
        return data

    def _fetch(self, sid: int) -> dict:
        a, b = int(self.shard_rows[sid]), int(self.shard_rows[sid + 1])
        cols: dict = {}
        for name, dtype in (*ROW_COLUMNS.items(), *((("format", np.uint8),) if self.has_format else ())):
            size = np.dtype(dtype).itemsize
            base = self.offsets[f"{name}.npy"]
            cols[name] = np.frombuffer(self._range(f"{name}.npy", base + a * size, base + b * size), dtype=dtype)
        base = self.offsets["key_offsets.npy"]
        offsets = np.frombuffer(self._range("key_offsets.npy", base + 8 * a, base + 8 * (b + 1)), dtype=np.int64)
        raw = self._range("key_bytes.bin", int(offsets[0]), int(offsets[-1]))
        at = offsets - offsets[0]
        cols["key"] = [raw[at[i] : at[i + 1]].decode() for i in range(b - a)]
        name = self.shards[sid]
        end = cols["offset"] + cols["size"]
        if name in self.tar_bytes and b > a and int(end.max()) > self.tar_bytes[name]:
            raise DataError(
                f"shard {name}: its manifest rows place {int((end > self.tar_bytes[name]).sum())} sample(s) past the "
                f"end of its tar ({self.tar_bytes[name]} bytes, as dataset.json records); index the folder again",
                rank_local=True,
            )
        return cols


class LazyColumn:
    """A manifest column, indexed by one row or an array of rows; only their shards are fetched."""

    def __init__(self, rows: ShardRows, name: str, dtype):
        self.rows, self.name, self.dtype = rows, name, np.dtype(dtype)

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, idx):
        r = self.rows
        if isinstance(idx, (int, np.integer)):
            sid = r.shard_of(int(idx))
            return r.block(sid)[self.name][int(idx) - r.shard_rows[sid]]
        idx = np.asarray(idx, dtype=np.int64)
        sids = r.shard_of(idx)
        out = np.empty(idx.shape, dtype=self.dtype)
        for sid in np.unique(sids):
            at = sids == sid
            out[at] = r.block(int(sid))[self.name][idx[at] - r.shard_rows[sid]]
        return out

    def __array__(self, *_args, **_kwargs):
        raise TypeError(f"{self.name}: a column of a folder in object storage is read by rows, not whole")


class ShardIdColumn(LazyColumn):
    """The shard of each row, from where the shards start (nothing is fetched)."""

    def __init__(self, rows: ShardRows):
        super().__init__(rows, "shard", np.int32)

    def __getitem__(self, idx):
        return self.rows.shard_of(idx)


class _Key(str):
    def as_py(self) -> str:  # as a pyarrow string scalar answers (the local tables' keys)
        return str(self)


class LazyKeys(LazyColumn):
    def __init__(self, rows: ShardRows):
        super().__init__(rows, "key", object)

    def __getitem__(self, idx):
        r = self.rows
        sid = r.shard_of(int(idx))
        return _Key(r.block(sid)["key"][int(idx) - r.shard_rows[sid]])
