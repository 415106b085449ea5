"""Which order an epoch is read in: the global order or the block order, chosen once per run."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from data_pipeline.dataset.locations import is_remote
from data_pipeline.order.global_order import GlobalOrder
from engine.errors import DataError

if TYPE_CHECKING:
    from data_pipeline.dataset.table import SampleTable


BLOCK_ABOVE = 100_000_000  # data.order=auto: more samples than this are read in the block order


def resolve_order(setting: str, shards: str, rows: int) -> str:
    """data.order=auto -> block for object storage or more than BLOCK_ABOVE samples, else global."""
    if setting != "auto":
        return setting
    return "block" if is_remote(shards) or rows > BLOCK_ABOVE else "global"


def make_order(kind: str, table: SampleTable, window: int):
    """The epoch order over ``table``'s rows: the global order or the block order (``data_pipeline.order``)."""
    if kind == "global":
        return GlobalOrder(len(table))
    if kind != "block":
        raise DataError(f"data.order={kind!r}: allowed values are ['auto', 'global', 'block']")
    if table.shard_rows is None:
        raise DataError(
            f"data.order=block needs the manifest's rows grouped by shard, and {table.root} is not; write its "
            f"columns: python -m data_pipeline.columns {table.root}"
        )
    from data_pipeline.order.block_order import BlockOrder

    return BlockOrder(np.asarray(table.shard_rows, dtype=np.int64), window)
