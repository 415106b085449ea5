"""The layouts users download: Hugging Face Parquet image datasets (make_shards --layout parquet) and
timm's WebDataset sets (index_shards with _info.json), one split at a time, never merged; a source
that yields nothing is a one-line failure naming the likely fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.dataset.hashing import checksum
from data_pipeline.loaders.source import read_dataset
from data_pipeline.shards.index_shards import main as index_main
from data_pipeline.shards.make_shards import main as make_main
from data_pipeline.shards.verify import verify
from tests.helpers import photo_bytes, write_tar

NAMES = ["tench", "goldfish", "great white shark"]


def hf_parquet(root: Path, demo_tree: Path, split: str, files: int, rows: int, start: int = 0) -> list[tuple]:
    """``datasets``' layout: data/<split>-0000K-of-0000N.parquet, image struct<bytes, path>, label
    (ClassLabel names in the schema metadata); every fourth image a PNG. Returns (bytes, label) per row."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}}}
    out = []
    for k in range(files):
        images, labels = [], []
        for r in range(rows):
            i = start + k * rows + r
            data, _ = photo_bytes(demo_tree, i, "PNG" if i % 4 == 3 else "JPEG")
            images.append({"bytes": data, "path": f"{i}.jpg"})
            labels.append(i % 3 if split != "test" else -1)
            out.append((data, labels[-1]))
        table = pa.table({"image": images, "label": pa.array(labels, pa.int64())})
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        pq.write_table(table, root / "data" / f"{split}-{k:05d}-of-{files:05d}.parquet", row_group_size=4)
    return out


def test_a_hugging_face_parquet_split_becomes_shards(demo_tree, tmp_path, caplog):
    """JPEG bytes pass through unchanged, PNGs are re-encoded, labels and class names come from the
    files; the validation files beside them are left out with --split train, and refused without it."""
    caplog.set_level(logging.INFO)
    src = tmp_path / "hf"
    rows = hf_parquet(src, demo_tree, "train", 2, 10)
    hf_parquet(src, demo_tree, "validation", 1, 6, start=40)
    out = tmp_path / "shards"
    assert make_main([str(src), str(out), "--layout", "parquet", "--no-progress"]) == 2
    assert "several splits (train, validation); choose one with --split train" in caplog.text
    args = [str(src), str(out), "--layout", "parquet", "--split", "train", "--no-progress", "--shard-size-mb", "0.05"]
    assert make_main([*args, "--workers", "2"]) == 0
    assert verify(out) == []
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_samples"] == 20 and len(meta["shards"]) > 1
    assert json.loads((out / "classes.json").read_text()) == {n: i for i, n in enumerate(NAMES)}
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    by_source = {r["source"]: r for r in table}
    for i, (data, label) in enumerate(rows):
        r = by_source[f"data/train-{i // 10:05d}-of-00002.parquet/{i % 10}"]
        assert r["label"] == label and r["class_name"] == NAMES[label]
        assert (r["action"] == "copied") == (i % 4 != 3)  # JPEG bytes unchanged, PNG re-encoded
        if i % 4 != 3:
            assert r["checksum"] == checksum(data)
    assert len(read_dataset(out).table) == 20
    # restartable: a rerun keeps every finished shard
    assert make_main(args) == 0 and "already finished and verified" in caplog.text


def test_parquet_files_given_as_a_flat_folder_fail_naming_the_layout(demo_tree, tmp_path, caplog):
    src = tmp_path / "hf"
    hf_parquet(src, demo_tree, "train", 1, 4)
    out = tmp_path / "o"
    assert make_main([str(src), str(out), "--layout", "flat", "--no-progress"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no usable sample" in errors[0] and "use --layout parquet" in errors[0]
    assert make_main([str(src), str(out), "--layout", "parquet", "--no-progress"]) == 0  # same OUT, fixed


def timm_wds(root: Path, demo_tree: Path) -> Path:
    """timm/imagenet-1k-wds: imagenet1k-{train,validation}-NNNN.tar (jpg, cls, json) and _info.json."""
    root.mkdir()
    lengths = {"train": [5, 4], "validation": [3]}
    i = 0
    for split, counts in lengths.items():
        for k, n in enumerate(counts):
            members = []
            for _ in range(n):
                data, _ = photo_bytes(demo_tree, i)
                members += [(f"{i:08d}.jpg", data), (f"{i:08d}.cls", str(i % 3).encode())]
                members += [(f"{i:08d}.json", json.dumps({"filename": f"{i}.JPEG"}).encode())]
                i += 1
            write_tar(root / f"imagenet1k-{split}-{k:04d}.tar", members)
    info = {
        "name": "imagenet-1k",
        "splits": {
            s: {"filenames": [f"imagenet1k-{s}-{k:04d}.tar" for k in range(len(c))], "shard_lengths": c}
            for s, c in lengths.items()
        },
    }
    (root / "_info.json").write_text(json.dumps(info))
    return root


def test_timms_webdataset_layout_is_indexed_one_split_at_a_time(demo_tree, tmp_path, caplog):
    src = timm_wds(tmp_path / "wds", demo_tree)
    assert index_main([str(src), str(tmp_path / "both"), "--workers", "1"]) == 2
    assert "holds the splits train, validation" in caplog.text and "--split" in caplog.text
    for split, n in (("train", 9), ("validation", 3)):
        out = tmp_path / split
        assert index_main([str(src), str(out), "--split", split, "--workers", "1"]) == 0
        meta = json.loads((out / "dataset.json").read_text())
        assert meta["num_samples"] == n and meta["label"] == "cls"
        assert all(split in Path(t).name for t in meta["tars"].values())
    # without the info file the tar names still tell the splits apart
    (src / "_info.json").unlink()
    assert index_main([str(src), str(tmp_path / "x"), "--workers", "1"]) == 2
    assert "tars of several splits (train, validation)" in caplog.text
    assert index_main([str(src), str(tmp_path / "y"), "--split", "validation", "--workers", "1"]) == 0


@pytest.mark.parametrize("split", ["test"])
def test_an_unlabeled_parquet_split_is_unlabeled(demo_tree, tmp_path, split):
    src = tmp_path / "hf"
    hf_parquet(src, demo_tree, split, 1, 4)
    assert make_main([str(src), str(tmp_path / "o"), "--layout", "parquet", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["num_samples"] == 4 and meta["label_values"] == [-1] and meta["num_classes"] == 0
