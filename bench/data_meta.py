"""Benchmark: manifest metadata a node holds for shards in object storage, against what its ranks read.

    python -m bench.data_meta [--samples 2000000000] [--nodes 64] [--ranks-per-node 8] --json OUT

At scale (``--samples``, shards of ``--shard-size``), one node's ranks are planned with the real block
order (``data_pipeline.order.block_order``) for one epoch: the shards each rank reads rows of, their
rows' metadata (fetched by range, one shard at a time: ``data_pipeline.remote.rows``) and the shard
list every node copies, against the rows the node's ranks read and against a copy of the whole columns
(what nodes held before rows were read by shard). Bytes per row: 33 of numbers (offset, size, width,
height, label, format), 8 of key offset and ``--key-bytes`` of key.

Measured (``--measured-shards``): a real shard folder served by a local HTTP server; one rank of a
two-rank world reads its epoch's rows' metadata through the real fetch path, and the bytes fetched are
compared with what the plan predicts for that rank.
"""

from __future__ import annotations

import argparse
import time

from bench import answer_help_early

ROW_NUMBERS = 8 + 8 + 4 + 4 + 8 + 1  # offset, size, width, height, label, format


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.data_meta", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=float, default=2e9, help="samples in the dataset (default 2e9)")
    ap.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default 10,000)")
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--window", type=int, default=4, help="block order: shards per shuffle window")
    ap.add_argument("--key-bytes", type=int, default=16, help="average key length in bytes")
    ap.add_argument("--measured-shards", type=int, default=12, help="shards of the measured folder (0: skip)")
    ap.add_argument("--json", help="write the results here")
    return ap


def rank_shards(order, seed: int, epoch: int, world: int, rank: int, per_step: int) -> tuple[set[int], int]:
    """(shards whose rows a rank reads in an epoch, rows it reads), from the block order's plan."""
    import numpy as np

    from data_pipeline.order.phases import Phase

    pool = order.pool(seed, epoch, [Phase(world, 0)])
    stream = order.stream(seed, epoch, [Phase(world, 0)], rank, per_step)
    lo, hi = stream._lo, stream._lo + stream.length
    w0 = int(np.searchsorted(pool.cum, lo, side="right")) - 1
    w1 = int(np.searchsorted(pool.cum, hi - 1, side="right")) - 1
    blocks = pool.removed.blocks
    shards = {int(s) for w in range(w0, w1 + 1) for s in blocks.order[w * blocks.window : (w + 1) * blocks.window]}
    return shards, stream.length


def at_scale(a: argparse.Namespace) -> dict:
    import numpy as np

    from data_pipeline.order.block_order import BlockOrder

    n = int(a.samples)
    num_shards = -(-n // a.shard_size)
    starts = np.minimum(np.arange(num_shards + 1, dtype=np.int64) * a.shard_size, n)
    order = BlockOrder(starts, a.window)
    world = a.nodes * a.ranks_per_node
    row_bytes = ROW_NUMBERS + 8 + a.key_bytes
    t0 = time.perf_counter()
    node_shards: set[int] = set()
    rows_read = 0
    for rank in range(a.ranks_per_node):  # node 0's ranks
        shards, rows = rank_shards(order, 7, 3, world, rank, 4096 // world or 1)
        node_shards |= shards
        rows_read += rows
    plan_s = time.perf_counter() - t0
    sizes = np.diff(starts)
    fetched_rows = int(sizes[sorted(node_shards)].sum())
    shard_list = (num_shards + 1) * 8 + num_shards * (24 + 40 + 12)  # shard_rows.npy; dataset.json per shard
    held = fetched_rows * row_bytes + shard_list
    whole = n * (ROW_NUMBERS + 4) + n * (a.key_bytes + 4) + shard_list  # columns + shard ids + keys.arrow
    return {
        "samples": n,
        "shards": num_shards,
        "nodes": a.nodes,
        "ranks": world,
        "window": a.window,
        "row_bytes": row_bytes,
        "rows_read_by_node": rows_read,
        "rows_fetched_by_node": fetched_rows,
        "node_metadata_gb": round(held / 1e9, 3),
        "read_metadata_gb": round(rows_read * row_bytes / 1e9, 3),
        "ratio_to_read": round(held / (rows_read * row_bytes), 3),
        "whole_columns_gb": round(whole / 1e9, 1),
        "held_at_once_per_rank_mb": round(32 * a.shard_size * row_bytes / 1e6, 1),  # ShardRows keeps 32 shards
        "plan_s": round(plan_s, 2),
    }


def measured(a: argparse.Namespace) -> dict:
    """One rank of two reads its epoch's metadata from a shard folder served over HTTP on loopback."""
    import functools
    import http.server
    import tempfile

    global RangeHandler
    RangeHandler = RangeHandler or _range_handler()
    import threading
    from pathlib import Path

    import numpy as np

    from data_pipeline.dataset.locations import RemoteSpec
    from data_pipeline.loaders.source import open_table
    from data_pipeline.order.block_order import BlockOrder
    from data_pipeline.order.phases import Phase
    from data_pipeline.shards.demo_data import build
    from data_pipeline.shards.make_shards import main as make_shards

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root / "tree", per_class=4 * a.measured_shards, size=32, seed=0)
        shard_mb = sum(p.stat().st_size for p in (root / "tree").rglob("*.jpg")) / a.measured_shards / 2**20
        argv = [str(root / "tree"), str(root / "shards"), "--shard-size-mb", f"{shard_mb:.4f}", "--workers", "1"]
        assert make_shards([*argv, "--no-progress"]) == 0
        handler = functools.partial(RangeHandler, directory=str(root / "shards"))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            table = open_table(url, RemoteSpec(cache_dir=str(root / "cache")))
            order = BlockOrder(np.asarray(table.shard_rows), 2)
            stream = order.stream(0, 0, [Phase(2, 0)], 1, 4)
            for rows in stream.batches(4):  # what a loader reads of each row, without decoding
                table.width[rows], table.offset[rows], table.size[rows], [table.key(i) for i in rows]
            shards, rows_read = rank_shards(order, 0, 0, 2, 1, 4)
            starts = np.asarray(table.shard_rows)
            key_at = np.load(root / "shards" / "columns" / "key_offsets.npy")
            numbers = ROW_NUMBERS - (0 if table.source.rows.has_format else 1)
            predicted = sum(  # per shard: its rows' numbers, key offsets (one more) and key bytes
                int(starts[s + 1] - starts[s]) * numbers + 8 * int(starts[s + 1] - starts[s] + 1)
                + int(key_at[starts[s + 1]] - key_at[starts[s]])
                for s in shards
            )  # fmt: skip
            fetched = table.source.rows.fetched_bytes
            return {
                "shards": len(table.shards),
                "samples": len(table),
                "rank_reads_shards": len(shards),
                "rank_rows_read": rows_read,
                "bytes_fetched": fetched,
                "bytes_predicted_by_plan": round(predicted),
                "bytes_whole_columns": sum(p.stat().st_size for p in (root / "shards" / "columns").iterdir()),
            }
        finally:
            server.shutdown()


def _range_handler():
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        """Static files with byte ranges (``Range: bytes=a-b``), as object stores and mirrors serve them."""

        def log_message(self, *_args) -> None:
            return None

        def send_head(self):
            rng = self.headers.get("Range", "")
            if not rng.startswith("bytes="):
                return super().send_head()
            import io

            path = self.translate_path(self.path)
            try:
                data = open(path, "rb").read()  # noqa: SIM115 (small files)
            except OSError:
                self.send_error(404)
                return None
            a, _, b = rng[len("bytes=") :].partition("-")
            start, end = int(a), min(int(b) + 1 if b else len(data), len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            return io.BytesIO(data[start:end])

    return Handler


RangeHandler = None  # built on first use (http.server is imported then)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from bench.common import header, write_json

    scale = at_scale(a)
    print(
        f"{scale['samples']:,} samples, {scale['shards']:,} shards, {scale['nodes']} nodes x {a.ranks_per_node} "
        f"ranks: a node holds {scale['node_metadata_gb']} GB of metadata for the {scale['read_metadata_gb']} GB "
        f"its ranks read in an epoch ({scale['ratio_to_read']}x); the whole columns: {scale['whole_columns_gb']} GB",
        flush=True,
    )
    out = {**header("data_meta", window=a.window, key_bytes=a.key_bytes), "at_scale": scale}
    if a.measured_shards:
        m = measured(a)
        print(
            f"measured over HTTP: one rank fetched {m['bytes_fetched']:,} bytes of rows for {m['rank_reads_shards']} "
            f"of {m['shards']} shards (plan: {m['bytes_predicted_by_plan']:,}); the whole columns are "
            f"{m['bytes_whole_columns']:,} bytes",
            flush=True,
        )
        out["measured"] = m
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    answer_help_early(build_parser)
    raise SystemExit(main())
