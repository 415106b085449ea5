"""Metadata a node can hold: for a shard folder in object storage, only the shard list is copied, and a
rank fetches the manifest rows of the shards it reads, by range, when it first reads them."""

from __future__ import annotations

import uuid

import numpy as np

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.dataset.table import read_table
from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.shards.upload import upload
from tests.memory_store import MemoryStore  # noqa: F401 (registers mem://)


def test_a_rank_fetches_the_rows_of_the_shards_it_reads(demo_shards, tmp_path):
    """Rank 1 of 2 reads its epoch in the block order: the rows fetched are exactly those of the shards it
    reads (numbers, key offsets and keys), and they are the local table's rows."""
    from data_pipeline.loaders.source import open_table
    from data_pipeline.order.block_order import BlockOrder
    from data_pipeline.order.phases import Phase

    url = f"mem://{uuid.uuid4().hex[:8]}/demo"
    upload(demo_shards, url, workers=2)
    local = read_table(demo_shards)
    table = open_table(url, RemoteSpec(cache_dir=str(tmp_path / "cache")))
    copied = sorted(p.name for p in (table.root / "columns").iterdir())
    assert copied == ["meta.json", "shard_rows.npy"]  # no column was copied whole
    starts = np.asarray(local.shard_rows)
    stream = BlockOrder(starts, 1).stream(5, 0, [Phase(2, 0)], 1, 4)
    keys = [table.key(i) for rows in stream.batches(4) for i in rows]  # what a loader reads of each row
    read = {k.split("/")[0] for k in keys}
    assert read and read < set(local.shards)  # this rank reads some of the shards
    rows_of_read = sum(int(starts[local.shards.index(s) + 1] - starts[local.shards.index(s)]) for s in read)
    per_row = 8 + 8 + 4 + 4 + 8 + 8  # offset, size, width, height, label, key offset
    keys_bytes = sum(len(local.keys[int(i)].as_py()) for s in read for i in local.rows_of(s))
    assert table.source.rows.fetched_bytes == rows_of_read * per_row + 8 * len(read) + keys_bytes
    for i in range(0, len(local), 7):  # the rows read by shard are the local table's rows
        assert table.key(i) == local.key(i) and int(table.width[i]) == int(local.width[i])
        assert int(table.offset[i]) == int(local.offset[i]) and int(table.label[i]) == int(local.label[i])
    rows = np.arange(len(local))
    assert np.array_equal(table.shard_id[rows], local.shard_id[rows]) and np.array_equal(table.size[rows], local.size)
    assert list(table.distinct_labels()) == sorted(set(local.label.tolist()))


def test_a_loader_reads_a_remote_epoch_through_rows_read_by_shard(demo_shards, tmp_path):
    url = f"mem://{uuid.uuid4().hex[:8]}/demo"
    upload(demo_shards, url, workers=2)
    got = []
    for rank in range(2):
        spec = LoaderSpec(url, rank, 2, 4, 4, img_size=16, seed=5, num_threads=1, order="block",
                          remote=RemoteSpec(cache_dir=str(tmp_path / "cache")))  # fmt: skip
        got += [k for b in make_loader("torch", spec) for k in b.keys]
    assert len(got) == len(set(got)) == 72 and set(got) <= {read_table(demo_shards).key(i) for i in range(72)}
