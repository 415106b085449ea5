"""The manifest's columns as files every rank of a node maps instead of loading.

``make_shards`` and ``index_shards`` write, next to ``manifest.parquet``, a ``columns/`` folder: one
NumPy file per numeric column the loaders and the plan read (shard id, byte offset, size, width,
height, label, image format), the row where each shard starts, and the sample keys as an Arrow IPC
file. ``np.load(mmap_mode="r")`` and ``pyarrow.memory_map`` map them: pages are read when touched
and shared by every process of the node through the page cache, so eight ranks of a 2-billion-sample
dataset hold one copy in memory, not eight, and a rank that reads one shard touches only its rows.

``meta.json`` names the manifest digest the columns were written from; a folder without columns
(written before they existed) is read from the Parquet manifest as before.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from data_pipeline.dataset.files import atomic_json, replace_folder, temp_name
from data_pipeline.dataset.hashing import file_digest

log = logging.getLogger(__name__)

FORMATS = ("jpeg", "png", "webp")
NUMERIC = {
    "shard": np.int32,
    "offset": np.int64,
    "size": np.int64,
    "width": np.int32,
    "height": np.int32,
    "label": np.int64,
}


def write_columns(root: Path, shard_names: list[str]) -> dict:
    """Write ``root/columns/`` from ``root/manifest.parquet`` (rows grouped by shard, in ``shard_names``
    order); returns what ``dataset.json`` records about it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(root / "manifest.parquet")
    out = temp_name(root / "columns")
    out.mkdir()
    position = {s: i for i, s in enumerate(shard_names)}
    shard = np.asarray([position[s] for s in t.column("shard").to_pylist()], dtype=np.int32)
    if len(shard) and np.any(np.diff(shard) < 0):
        raise ValueError("manifest rows are not grouped by shard in dataset order")
    counts = np.bincount(shard, minlength=len(shard_names)) if len(shard) else np.zeros(len(shard_names), np.int64)
    np.save(out / "shard_rows.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    np.save(out / "shard.npy", shard)
    for name, dtype in NUMERIC.items():
        if name != "shard":
            np.save(out / f"{name}.npy", t.column(name).to_numpy().astype(dtype))
    if "format" in t.column_names:
        codes = np.asarray([FORMATS.index(f) for f in t.column("format").to_pylist()], dtype=np.uint8)
        np.save(out / "format.npy", codes)
    keys = pa.table({"key": t.column("key").combine_chunks()})
    with pa.OSFile(str(out / "keys.arrow"), "wb") as sink, pa.ipc.new_file(sink, keys.schema) as writer:
        writer.write_table(keys)
    write_key_ranges(out, t.column("key").to_pylist())
    st = (root / "manifest.parquet").stat()
    meta = {
        "rows": t.num_rows,
        "manifest_sha256": file_digest(root / "manifest.parquet"),
        "manifest_bytes": st.st_size,
        "manifest_mtime_ns": st.st_mtime_ns,
        # where each .npy file's array starts: a reader of object storage fetches one shard's rows by range
        "data_offsets": {p.name: npy_data_offset(p) for p in sorted(out.glob("*.npy"))},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    replace_folder(out, root / "columns")
    return meta


def write_key_ranges(out: Path, keys: list[str]) -> None:
    """The keys again, in a form read by byte range: ``key_bytes.bin`` (every key's UTF-8 bytes, in row
    order) and ``key_offsets.npy`` (int64 [N+1]: where row i's key starts in it)."""
    encoded = [k.encode() for k in keys]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    np.save(out / "key_offsets.npy", offsets)
    (out / "key_bytes.bin").write_bytes(b"".join(encoded))


def npy_data_offset(path: Path) -> int:
    """Bytes before the array in a .npy file (its header)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        read(f)  # (shape, fortran order, dtype): not needed here
        return f.tell()


def read_columns(root: Path, rows: int) -> dict | None:
    """The mapped columns of a shard folder, or None when it has none (or they do not match)."""
    folder = root / "columns"
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("rows") != rows:
        return None
    manifest = root / "manifest.parquet"
    if manifest.is_file():  # (a remote folder's local copy holds the columns only)
        st = manifest.stat()
        if (st.st_size, st.st_mtime_ns) != (meta.get("manifest_bytes"), meta.get("manifest_mtime_ns")):
            log.warning("%s: the manifest changed after its columns were written; reading the manifest", root)
            return None
    import pyarrow as pa

    cols = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in [*NUMERIC, "shard_rows"]}
    fmt = folder / "format.npy"
    cols["format"] = np.load(fmt, mmap_mode="r") if fmt.is_file() else None
    cols["keys"] = pa.ipc.open_file(pa.memory_map(str(folder / "keys.arrow"))).read_all().column("key").combine_chunks()
    cols["manifest_sha256"] = meta.get("manifest_sha256")
    return cols


def main(argv: list[str] | None = None) -> int:
    """Write the columns of a shard folder made before they existed (its manifest is not changed)."""
    import argparse

    from engine.errors import StackError

    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.columns",
        description="Write the memory-mapped columns (columns/) of an existing shard folder, so that ranks map "
        "them instead of loading the manifest, and the block order can be used.",
    )
    ap.add_argument("folder", help="a shard folder (dataset.json + manifest.parquet)")
    args = ap.parse_args(argv)
    root = Path(args.folder)
    try:
        meta = json.loads((root / "dataset.json").read_text())
        info = write_columns(root, list(meta["shards"]))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {root}: {err}", file=sys.stderr)
        return 2
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    meta["manifest_sha256"] = info["manifest_sha256"]
    atomic_json(root / "dataset.json", meta)
    print(f"wrote {root / 'columns'} ({info['rows']} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
