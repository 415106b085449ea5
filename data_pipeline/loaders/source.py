"""A shard folder as the loaders see it: its sample table, wherever it lives, and the rows the
start-up check left out.

``open_table`` is the one place that tells a local folder from one in object storage: a local
folder is read as it is (``data_pipeline.dataset.table``); for ``s3://`` and ``https://`` the
folder's metadata is copied to the node's cache first and its tars are fetched as they are read
(``data_pipeline.remote``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.dataset.locations import RemoteSpec, is_remote
from data_pipeline.dataset.table import SampleTable, read_table


def open_table(location: str | Path, remote: RemoteSpec | None = None) -> SampleTable:
    """The sample table of a shard folder: a local path, or an ``s3://`` / ``https://`` location."""
    if is_remote(str(location)):
        from data_pipeline.remote.shards import RemoteShards

        return RemoteShards.open(str(location), remote or RemoteSpec()).table()
    return read_table(location)


@dataclass
class DatasetView:
    """A shard folder's samples and the rows left out of training (the start-up check's verdict)."""

    table: SampleTable
    excluded: tuple[int, ...] = ()

    @property
    def root(self) -> Path:
        return self.table.root

    @property
    def shards(self) -> tuple[str, ...]:
        return self.table.shards

    @property
    def total_samples(self) -> int:
        return len(self.table)

    @property
    def num_samples(self) -> int:
        return len(self.table) - len(self.excluded)

    @property
    def num_classes(self) -> int:
        return self.table.num_classes

    def shard_size(self, name: str) -> int:
        return len(self.table.rows_of(name))

    def tar(self, name: str) -> Path:
        return self.table.tar(name)

    def idx(self, name: str) -> Path:
        return self.table.idx(name)


def read_dataset(root: str | Path, view: str | Path | None = None, remote: RemoteSpec | None = None) -> DatasetView:
    """The samples of a shard folder; with ``view`` (a start-up check's folder), minus the rows it excluded."""
    table = open_table(root, remote)
    if view is None:
        return DatasetView(table)
    v = json.loads((Path(view) / "view.json").read_text())
    return DatasetView(table, tuple(v["excluded"]))
