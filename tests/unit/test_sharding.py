"""ImageNet-scale sharding: real-world image quirks, restartability, layouts, verification, stats."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.dataset.wds_index import read_index
from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.loaders.source import read_dataset
from data_pipeline.shards import stats, verify
from tests.conftest import make_shards


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def photo(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture()
def quirk_tree(tmp_path) -> tuple[Path, dict]:
    """One class folder per kind of file a real image tree contains."""
    root = tmp_path / "train"
    files: dict[str, bytes] = {}
    files["plain/a.JPEG"] = jpeg(photo(1))
    files["plain/b.JPEG"] = jpeg(photo(2))
    cmyk = Image.new("RGB", (40, 32), (200, 30, 30)).convert("CMYK")
    files["cmyk/red.JPEG"] = jpeg(cmyk)
    files["gray/g.JPEG"] = jpeg(photo(3).convert("L"))
    png = io.BytesIO()
    photo(4).save(png, format="PNG")
    files["png/looks_like.JPEG"] = png.getvalue()
    rgba = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(rgba, format="PNG")
    files["png/transparent.png"] = rgba.getvalue()
    bmp = io.BytesIO()
    photo(5).save(bmp, format="BMP")
    files["other/pic.bmp"] = bmp.getvalue()
    files["huge/big.JPEG"] = jpeg(photo(6, size=(600, 400)))
    files["bad/empty.JPEG"] = b""
    good = jpeg(photo(7))
    files["bad/truncated.JPEG"] = good[: len(good) // 2]
    files["bad/notes.txt"] = b"not an image at all"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.JPEG").write_bytes(good)  # hidden folders are not classes
    return root, files


def test_quirks_are_converted_or_skipped_with_exact_counts(quirk_tree, tmp_path):
    src, files = quirk_tree
    out = tmp_path / "out"
    make_shards(src, out, "--max-short-side", "256", "--quality", "90")
    summary = json.loads((out / "dataset.json").read_text())
    rows = {r["source"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    skipped = {s["source"]: s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    assert set(skipped) == {"bad/empty.JPEG", "bad/truncated.JPEG", "bad/notes.txt"}
    assert "empty" in skipped["bad/empty.JPEG"] and "not an image" in skipped["bad/notes.txt"]
    assert "truncated" in skipped["bad/truncated.JPEG"].lower() or "readable" in skipped["bad/truncated.JPEG"]
    assert summary["num_samples"] == len(rows) == 8 and summary["num_skipped"] == 3 and summary["num_files"] == 11
    assert rows["plain/a.JPEG"]["action"] == "copied"
    expect_reencoded = {
        "cmyk/red.JPEG",
        "gray/g.JPEG",
        "png/looks_like.JPEG",
        "png/transparent.png",
        "other/pic.bmp",
        "huge/big.JPEG",
    }
    assert {s for s, r in rows.items() if r["action"] != "copied"} == expect_reencoded
    assert summary["num_reencoded"] == len(expect_reencoded)
    assert (rows["huge/big.JPEG"]["width"], rows["huge/big.JPEG"]["height"]) == (384, 256)  # short side capped
    info = read_dataset(out)
    for r in rows.values():
        data = info.tar(r["shard"]).read_bytes()[r["offset"] : r["offset"] + r["size"]]
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (r["width"], r["height"])
        if r["action"] == "copied":
            assert data == files[r["source"]]  # pass-through: the original bytes
    red_row = rows["cmyk/red.JPEG"]
    red_bytes = info.tar(red_row["shard"]).read_bytes()[red_row["offset"] : red_row["offset"] + red_row["size"]]
    red = Image.open(io.BytesIO(red_bytes))
    r, g, b = np.asarray(red).reshape(-1, 3).mean(0)
    assert r > 150 and g < 80 and b < 80  # CMYK converted to the right colors, not inverted
    # every stored image decodes in DALI
    spec = LoaderSpec(str(out), 0, 1, 4, 4, 32, seed=0, num_threads=1)
    batches = list(make_loader("dali", spec))
    assert sum(len(b.keys) for b in batches) == 8 and all(b.img.shape == (4, 3, 32, 32) for b in batches)


def test_worker_count_does_not_change_the_output(demo_tree, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    make_shards(demo_tree, one, "--shard-size-mb", "0.05", "--seed", "3")
    from data_pipeline.shards.make_shards import main

    assert (
        main([str(demo_tree), str(two), "--shard-size-mb", "0.05", "--seed", "3", "--workers", "3", "--no-progress"])
        == 0
    )
    names = sorted(p.name for p in one.iterdir() if p.suffix in (".tar", ".idx"))
    assert names == sorted(p.name for p in two.iterdir() if p.suffix in (".tar", ".idx")) and len(names) >= 6
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)


def test_rerun_with_other_arguments_is_refused(demo_tree, tmp_path):
    from data_pipeline.shards.make_shards import main

    out = tmp_path / "out"
    make_shards(demo_tree, out, "--seed", "1")
    assert main([str(demo_tree), str(out), "--seed", "2", "--no-progress"]) == 2  # a user error: exit 2
    (out / "plan.json").unlink()  # by hand: the shards left can no longer say which plan they belong to
    assert main([str(demo_tree), str(out), "--seed", "2", "--no-progress"]) == 2
    assert not (out / "plan.json").exists()


def test_verify_catches_tampering_and_a_missing_index(demo_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    assert verify.verify(out, decode=True) == []
    info = read_dataset(out)
    s = read_index(info.idx(info.shards[1]))[0]
    jpg = s.component("jpg")
    with open(info.tar(info.shards[1]), "r+b") as f:
        f.seek(jpg.offset + jpg.size // 2)
        byte = f.read(1)
        f.seek(jpg.offset + jpg.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    info.idx(info.shards[2]).unlink()
    problems = verify.verify(out)
    text = "\n".join(problems)
    assert f"{info.shards[1]}/{s.key}: image bytes do not match the manifest checksum" in text
    assert f"{info.shards[1]}: tar checksum differs" in text
    assert f"{info.shards[2]}" in text and "missing" in text
    assert verify.main([str(out)]) == 1


def test_val_layout_gets_labels_from_the_label_file(demo_tree, tmp_path):
    train_out = tmp_path / "train_shards"
    make_shards(demo_tree, train_out)
    classes = json.loads((train_out / "classes.json").read_text())
    val = tmp_path / "val"
    val.mkdir()
    lines, expected = ["ImageId,PredictionString"], {}
    for i, cls in enumerate(["rocket", "cat", "flower", "cat"]):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (val / name).write_bytes(next((demo_tree / cls).iterdir()).read_bytes())
        lines.append(f"{name[:-5]},{cls} 1 2 3 4")  # the LOC_val_solution.csv form: no extension, boxes
        expected[name] = classes[cls]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "val_shards"
    make_shards(
        val,
        out,
        "--layout",
        "val",
        "--labels",
        str(tmp_path / "labels.csv"),
        "--classes",
        str(train_out / "classes.json"),
    )
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["source"]: r["label"] for r in rows} == expected
    assert json.loads((out / "classes.json").read_text()) == classes


def test_flat_layout_is_unlabeled(demo_tree, tmp_path):
    out = tmp_path / "out"
    make_shards(demo_tree / "cat", out, "--layout", "flat")
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 8 and {r["label"] for r in rows} == {-1}
    batch = next(iter(make_loader("dali", LoaderSpec(str(out), 0, 1, 4, 4, 32, seed=0, num_threads=1))))
    assert batch.label.tolist() == [-1] * 4


def test_stats(demo_shards, capsys):
    s = stats.compute(demo_shards)
    assert s["samples"] == 72 and s["classes"] == 9 and s["per_class_range"] == [8, 8]
    assert s["width"]["min"] >= 48 and s["jpeg_kb"]["median"] > 0
    assert stats.main([str(demo_shards)]) == 0
    text = capsys.readouterr().out
    assert "72 samples" in text and "astronaut" in text


@pytest.mark.parametrize("world", [3, 4])
def test_every_sample_once_per_epoch_across_ranks(demo_shards, world):
    """72 samples over 3 or 4 ranks with micro-batch 5: each epoch, the ranks' samples are
    disjoint, none repeats, and exactly the counted remainder is left out."""
    from engine.config import Config, plan_run

    cfg = Config()
    cfg.data.micro_batch, cfg.data.global_batch = 5, 5 * world
    d = plan_run(cfg, world, 72)
    loaders = [
        make_loader("dali", LoaderSpec(str(demo_shards), r, world, 5, 5, 32, seed=9, num_threads=1))
        for r in range(world)
    ]
    for _ in range(2):
        seen = [k for loader in loaders for b in loader for k in b.keys]
        assert len(seen) == len(set(seen)) == 72 - d.dropped_per_epoch
        assert d.dropped_per_epoch == 72 - world * 5 * d.micro_steps_per_epoch


def test_two_writers_into_one_folder_cooperate(demo_tree, tmp_path):
    """Two make_shards with the same arguments into the same folder at once (two nodes of one job): each
    takes the shards the other has not claimed, waits for the rest, and the folder is exactly what one
    writer makes. Threads here (flock treats each open file as its own owner, as it does processes);
    tests/integration/test_writers_runs.py runs real processes."""
    import threading

    from data_pipeline.shards.make_shards import main

    ref = tmp_path / "ref"
    make_shards(demo_tree, ref, "--shard-size-mb", "0.01")
    for attempt in range(3):
        out = tmp_path / f"shared{attempt}"
        argv = [str(demo_tree), str(out), "--shard-size-mb", "0.01", "--workers", "1", "--no-progress"]
        codes = []
        writers = [threading.Thread(target=lambda a=argv, c=codes: c.append(main(a))) for _ in range(2)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        assert codes == [0, 0]
        for name in sorted(p.name for p in ref.iterdir() if p.is_file()):
            assert (ref / name).read_bytes() == (out / name).read_bytes(), (attempt, name)
        assert not list(out.glob("*.tmp")) and verify.verify(out) == []


def test_a_rerun_repairs_damage_its_record_agrees_with(demo_tree, tmp_path):
    """A shard rewritten with other bytes and its part record rewritten to match (what interleaved writers
    of an earlier version left behind), and an index file damaged: the rerun checks the samples and the
    index on disk, not only the record, and rewrites both shards."""
    from data_pipeline.dataset.hashing import file_checksum

    ref, out = tmp_path / "ref", tmp_path / "out"
    make_shards(demo_tree, ref, "--shard-size-mb", "0.01")
    make_shards(demo_tree, out, "--shard-size-mb", "0.01")
    tar = out / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1024:1536] = bytes(512)  # inside the first image
    tar.write_bytes(bytes(data))
    part_path = out / "shard-000001.part.json"
    part = json.loads(part_path.read_text())
    part.update(tar_bytes=len(data), tar_checksum=file_checksum(tar))  # the record vouches for the damage
    part_path.write_text(json.dumps(part))
    idx = out / "shard-000002.idx"
    idx.write_text(idx.read_text().replace(" jpg ", " png ", 1))
    make_shards(demo_tree, out, "--shard-size-mb", "0.01")
    for name in ("shard-000001.tar", "shard-000001.part.json", "shard-000002.idx", "manifest.parquet"):
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
