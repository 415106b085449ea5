"""Shard writer and loaders: round trips through real tar shards, real DALI (CPU) and the fallback."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.dataset.wds_index import read_index
from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.loaders.source import read_dataset
from data_pipeline.order.phases import rank_range
from data_pipeline.shards.make_shards import plan_shards
from data_pipeline.shards.sources import SourceItem, sample_key
from tests.conftest import make_shards


def manifest(root: Path) -> dict[str, dict]:
    rows = pq.read_table(root / "manifest.parquet").to_pylist()
    return {f"{r['shard']}/{r['key']}": r for r in rows}


def test_shards_hold_the_original_jpeg_bytes_and_labels(demo_tree, demo_shards):
    info = read_dataset(demo_shards)
    assert info.num_samples == 72 and len(info.shards) >= 3
    classes = json.loads((demo_shards / "classes.json").read_text())
    assert classes == {name: i for i, name in enumerate(sorted(p.name for p in demo_tree.iterdir()))}
    rows = manifest(demo_shards)
    assert len(rows) == 72
    # read the shards with the webdataset library itself: an independent check of the format
    urls = [str(info.tar(s)) for s in info.shards]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        row = next(r for r in rows.values() if r["key"] == sample["__key__"])
        assert sample["jpg"] == (demo_tree / row["source"]).read_bytes()  # bytes unchanged
        assert int(sample["cls"]) == row["label"] == classes[row["source"].split("/")[0]]
        seen += 1
    assert seen == 72


def test_index_files_match_the_tar_layout(demo_shards):
    info = read_dataset(demo_shards)
    for name in info.shards:
        entries = read_index(info.idx(name))
        with tarfile.open(info.tar(name)) as tar:
            members = {m.name: m for m in tar.getmembers()}
        raw = info.tar(name).read_bytes()
        for s in entries:
            for c in s.components:
                assert members[c.name].offset_data == c.offset and members[c.name].size == c.size
            cls = s.component("cls")
            assert raw[cls.offset : cls.offset + cls.size].decode().isdigit()


def test_shuffle_is_deterministic_under_the_seed():
    items = [SourceItem(f"c{i % 3}/f{i}.jpg", i % 3, 1000 + i) for i in range(50)]
    a = plan_shards(items, seed=5, shard_bytes=8000)
    b = plan_shards(items, seed=5, shard_bytes=8000)
    c = plan_shards(items, seed=6, shard_bytes=8000)
    assert a == b and a != c
    assert sorted(x.rel for s in a for x in s) == sorted(x.rel for x in items)
    assert all(sum(x.size for x in s) <= 8000 for s in a)


def test_bad_files_are_skipped_counted_and_named(demo_tree, tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for f in sorted((demo_tree / "cat").iterdir())[:3]:
            (src / cls / f.name).write_bytes(f.read_bytes())
    (src / "a" / "notes.txt").write_text("not an image")
    (src / "b" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    make_shards(src, out)
    summary = json.loads((out / "dataset.json").read_text())
    skipped = json.loads((out / "skipped.json").read_text())
    assert summary["num_samples"] == 6 and summary["num_skipped"] == 2
    assert {s["source"] for s in skipped} == {"a/notes.txt", "b/empty.jpg"}
    assert all(s["reason"] for s in skipped)


def test_sample_keys_are_webdataset_safe():
    assert sample_key("n01440764/n01440764_10026.JPEG") == "n01440764__n01440764_10026"
    assert "." not in sample_key("cls/a.b.c.jpg")


def test_rank_ranges_partition_the_data():
    for n, w in ((72, 2), (73, 2), (10, 3), (5, 5)):
        ranges = [rank_range(n, r, w) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert {e - s for s, e in ranges} <= {n // w, n // w + 1}


def spec(root: Path, rank: int, world: int, micro: int, accum: int = 1, **kw) -> LoaderSpec:
    return LoaderSpec(str(root), rank, world, micro, micro * accum, img_size=32, seed=3, num_threads=1, **kw)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_two_ranks_read_every_sample_once_per_epoch(demo_shards, kind):
    rows = manifest(demo_shards)
    world, micro = 2, 4
    steps = (72 // world) // micro  # 9 micro-batches per rank = all 72 samples
    loaders = [make_loader(kind, spec(demo_shards, r, world, micro)) for r in range(world)]
    epochs = []
    for _ in range(2):
        keys = []
        for loader in loaders:
            count = 0
            for batch in loader:
                count += 1
                keys += batch.keys
                for key, label in zip(batch.keys, batch.label.tolist()):
                    assert rows[key]["label"] == label
            assert count == steps  # equal batches on every rank
        assert len(keys) == 72 and set(keys) == set(rows)  # exactly once across ranks
        epochs.append(keys)
    assert epochs[0] != epochs[1]  # reshuffled
    assert all(loader.epoch == 2 and loader.position == 0 for loader in loaders)


def test_uneven_split_yields_equal_steps_and_no_duplicates(demo_shards):
    """72 samples over 5 ranks: slices of 14 or 15; each rank yields 3 batches of 4."""
    keys = []
    for r in range(5):
        loader = make_loader("dali", spec(demo_shards, r, 5, 4))
        batches = list(loader)
        assert len(batches) == 3
        keys += [k for b in batches for k in b.keys]
    assert len(keys) == len(set(keys)) == 60  # 12 samples left out of this epoch, none twice


def test_fallback_matches_dali_shapes_and_dtypes(demo_shards):
    out = {}
    for kind in ("dali", "torch"):
        batch = next(iter(make_loader(kind, spec(demo_shards, 0, 1, 6))))
        out[kind] = batch
        assert batch.img.shape == (6, 3, 32, 32) and batch.img.dtype == torch.float32
        assert batch.label.shape == (6,) and batch.label.dtype == torch.int64
        assert len(batch.keys) == 6
        # ImageNet-normalized pixels: roughly zero-centered, unit-scale values
        assert -3.0 < batch.img.mean() < 3.0 and 0.2 < batch.img.std() < 3.0
    assert out["dali"].img.device == out["torch"].img.device


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_loader_state_restores_the_exact_remaining_batches(demo_shards, kind):
    s = spec(demo_shards, 1, 2, 4)
    loader = make_loader(kind, s)
    ref, state = [], None
    for epoch in range(2):
        for i, batch in enumerate(loader):
            ref.append((batch.keys, batch.img.clone()))
            if epoch == 0 and i == 4:
                state = loader.state_dict()
    restored = make_loader(kind, s, state)
    got = [(b.keys, b.img) for _ in range(2) for b in restored]
    assert len(got) == len(ref) - 5
    for (k1, i1), (k2, i2) in zip(got, ref[5:]):
        assert k1 == k2 and torch.equal(i1, i2)


def test_augmentation_is_random_resized_crop_and_flip(demo_shards):
    """Two epochs of the same sample give different crops; outputs keep the photo's colors."""
    s = spec(demo_shards, 0, 1, 8)
    loader = make_loader("dali", s)
    views: dict[str, list[torch.Tensor]] = {}
    for _ in range(2):
        for b in loader:
            for k, img in zip(b.keys, b.img):
                views.setdefault(k, []).append(img)
    differing = sum(not torch.equal(v[0], v[1]) for v in views.values() if len(v) == 2)
    assert differing >= len(views) * 0.9


def test_randaugment_leaves_no_generated_files_behind(demo_shards):
    """DALI's RandAugment converts its functions into files in the temp folder: they are gone once the
    pipeline is built (a killed rank could not delete them), and the pipeline still runs."""
    import os
    import sys

    from data_pipeline.loaders.dali_loader import AUTOGRAPH_PREFIX

    loader = make_loader("dali", spec(demo_shards, 0, 1, 8, rand_augment="rand-m9-n2-mstd0.5-inc1"))
    generated = [m.__file__ for n, m in list(sys.modules.items()) if n.startswith(AUTOGRAPH_PREFIX)]
    assert generated and not any(os.path.exists(f) for f in generated)
    batches = [b for _, b in zip(range(2), loader)]
    assert len(batches) == 2 and batches[1].img.shape[0] == 8


def test_missing_shard_folder_is_a_clear_error(tmp_path):
    from engine.errors import DataError

    with pytest.raises(DataError, match="make_shards"):
        read_dataset(tmp_path / "nope")


def test_reencodes_png_under_jpeg_name(tmp_path):
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    (src / "fake.JPEG").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    make_shards(src.parent, out)
    row = pq.read_table(out / "manifest.parquet").to_pylist()[0]
    assert row["action"].startswith("reencoded") and (row["width"], row["height"]) == (40, 30)
    data = (out / f"{row['shard']}.tar").read_bytes()[row["offset"] : row["offset"] + row["size"]]
    assert Image.open(io.BytesIO(data)).format == "JPEG"
