"""Existing WebDataset shards indexed in place: webdataset's own ShardWriter output and an
img2dataset-style collection (jpg + txt + json, some PNG, a corrupt member), never written to."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.loaders.source import read_dataset
from data_pipeline.shards.index_shards import main as index_main
from data_pipeline.shards.verify import verify
from tests.helpers import make_img2dataset, photo_bytes


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def writer_shards(demo_tree, tmp_path_factory) -> Path:
    """36 samples written by webdataset.ShardWriter (jpg + cls), 12 per tar."""
    import webdataset as wds

    src = tmp_path_factory.mktemp("wds")
    classes = sorted(
        {p.parent.name for p in demo_tree.rglob("*.jpg")} | {p.parent.name for p in demo_tree.rglob("*.JPEG")}
    )
    with wds.ShardWriter(str(src / "train-%05d.tar"), maxcount=12, verbose=0) as sink:
        for i in range(36):
            data, cls = photo_bytes(demo_tree, i)
            sink.write({"__key__": f"sample{i:06d}", "jpg": data, "cls": classes.index(cls) if cls in classes else 0})
    return src


@pytest.fixture(scope="module")
def img2dataset_shards(demo_tree, tmp_path_factory) -> Path:
    return make_img2dataset(tmp_path_factory.mktemp("img2dataset"), demo_tree)


def test_shardwriter_shards_are_indexed_without_touching_the_tars(writer_shards, tmp_path):
    before = digest(writer_shards)
    out = tmp_path / "index"
    assert index_main([str(writer_shards / "train-{00000..00002}.tar"), str(out), "--workers", "1"]) == 0
    assert digest(writer_shards) == before  # not a byte changed, nothing added beside them
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_samples"] == 36 and meta["shards"] == ["train-00000", "train-00001", "train-00002"]
    assert all(Path(p).parent == writer_shards for p in meta["tars"].values())
    assert json.loads((out / "classes.json").read_text())  # labelled: a class mapping
    # our index files are the wds2idx format: DALI's own reader would take them
    first = (out / "train-00000.idx").read_text().splitlines()
    assert first[0] == "v1.2 12" and first[1].split()[0] in ("cls", "jpg")
    assert verify(out) == []
    table = read_dataset(out).table
    assert len(table) == 36 and set(np.unique(table.label)) <= set(range(9))


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_an_img2dataset_collection_is_indexed_skipping_what_cannot_train(img2dataset_shards, tmp_path, kind):
    before = digest(img2dataset_shards)
    out = tmp_path / "index"
    workers = "2" if kind == "dali" else "1"  # the parallel path once
    assert index_main([str(img2dataset_shards), str(out), "--label", "json:label", "--workers", workers]) == 0
    assert digest(img2dataset_shards) == before
    skipped = {s["source"].rsplit(":", 1)[1]: s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    assert set(skipped) == {"000000009", "000010005"}
    assert "no image member" in skipped["000000009"] and "header" in skipped["000010005"]
    table = read_dataset(out).table
    assert len(table) == 18 and sorted({table.format(i) for i in range(len(table))}) == ["jpeg", "png"]
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {name: i for i, name in enumerate(sorted(classes))}  # names numbered in sorted order
    assert verify(out) == []
    # every usable sample once per epoch, PNGs decoded like JPEGs, in both loaders
    spec = LoaderSpec(str(out), 0, 1, 6, 6, 32, seed=3, num_threads=1)
    loader = make_loader(kind, spec)
    seen = [k for batch in loader for k in batch.keys]
    assert len(seen) == len(set(seen)) == 18
    batch = next(iter(make_loader(kind, spec)))
    assert batch.img.shape == (6, 3, 32, 32) and torch.isfinite(batch.img).all()


def test_a_rerun_reuses_indexed_tars_and_other_arguments_are_refused(writer_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "index"
    src = str(writer_shards)
    assert index_main([src, str(out), "--workers", "1"]) == 0
    manifest = (out / "manifest.parquet").read_bytes()
    caplog.clear()
    assert index_main([src, str(out), "--workers", "1"]) == 0
    assert "3 of 3 tars already indexed and unchanged" in caplog.text
    assert (out / "manifest.parquet").read_bytes() == manifest
    assert index_main([src, str(out), "--label", "none"]) == 2  # a user error: exit 2
    assert "index of other sources or labels" in caplog.text


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    assert index_main([str(tmp_path / "nothing-{0..3}.tar"), str(tmp_path / "out")]) == 2
    (tmp_path / "a.tar").write_bytes(b"")
    assert index_main([str(tmp_path / "a.tar"), str(tmp_path)]) == 2  # OUT must not be the tars' own folder


def unlabeled_tars(src: Path, demo_tree: Path, count: int = 12) -> Path:
    """jpg + txt samples, no label anywhere (a self-supervised collection)."""
    from tests.helpers import write_tar

    src.mkdir()
    members = []
    for i in range(count):
        data, _ = photo_bytes(demo_tree, i)
        members += [(f"{i:06d}.jpg", data), (f"{i:06d}.txt", b"a caption")]
    write_tar(src / "00000.tar", members)
    return src


def test_label_auto_finds_each_kind_and_says_which(writer_shards, img2dataset_shards, demo_tree, tmp_path, caplog):
    """The default --label auto: .cls when the tars have it, else the .json 'label' field, else none;
    the summary line names the source and dataset.json records it."""
    caplog.set_level(logging.INFO)
    cases = [
        (writer_shards, "cls", "labels: the .cls members (--label auto)"),
        (img2dataset_shards, "json:label", "labels: the .json field 'label' (--label auto)"),
        (unlabeled_tars(tmp_path / "u", demo_tree), "none", "labels: none (unlabeled, label -1) (--label auto)"),
    ]
    for i, (src, mode, said) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert index_main([str(src), str(out), "--workers", "1"]) == 0
        meta = json.loads((out / "dataset.json").read_text())
        assert meta["label"] == mode and meta["label_requested"] == "auto" and said in caplog.text
    assert set(read_dataset(tmp_path / "out2").table.label) == {-1}


def test_unlabeled_tars_with_a_label_asked_for_fail_in_one_line_naming_the_flag(demo_tree, tmp_path, caplog):
    """Nothing usable is never a success: exit 2, one error line with the commonest reason and the flag
    that fixes it; the skips are one summary line, not one warning per sample; a rerun with the fix works
    in the same OUT."""
    src, out = unlabeled_tars(tmp_path / "u", demo_tree), tmp_path / "out"
    assert index_main([str(src), str(out), "--label", "cls", "--workers", "1"]) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no usable sample (12 skipped: no .cls member (12))" in errors[0].getMessage()
    assert "--label none" in errors[0].getMessage() and not (out / "dataset.json").exists()
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 0
    assert index_main([str(src), str(out), "--label", "none", "--workers", "1"]) == 0


def test_skips_are_counted_with_the_three_commonest_reasons(img2dataset_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert index_main([str(img2dataset_shards), str(tmp_path / "o"), "--label", "json:label", "--workers", "1"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("2 sample(s) skipped, listed in") and "no image member (1)" in warnings[0]


def test_tars_labelled_in_different_ways_are_refused_under_auto(writer_shards, demo_tree, tmp_path, caplog):
    src = unlabeled_tars(tmp_path / "u", demo_tree)
    mixed = [str(writer_shards / "train-00000.tar"), str(src / "00000.tar")]
    assert index_main([*mixed, str(tmp_path / "o"), "--workers", "1"]) == 2
    assert "--label auto found different labels in the tars (1 tar(s) cls, 1 tar(s) none)" in caplog.text
