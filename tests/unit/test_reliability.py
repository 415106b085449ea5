"""Bad inputs found before training, and file-system faults as one line: fine-tuning labels, weight
files that declare impossible shapes or lie about themselves, full and read-only disks, leftovers."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from engine.config import to_dict
from engine.disk import DiskError
from engine.errors import TeacherError
from engine.presets import get_preset
from tests.conftest import make_shards
from tests.helpers import in_process_config, train_in_process


def pretrain(run: Path, shards: Path, steps: int, *sets: str, faults=None) -> dict:
    return train_in_process(in_process_config(run, shards, steps, *sets), faults)


def finetune_check(capsys, train: Path, val: Path, *sets: str) -> tuple[int, str]:
    from engine.finetune import main

    code = main(
        [
            "--preset",
            "finetune_test",
            "--run-dir",
            "/tmp/never-made",
            "--set",
            f"data.shards={train}",
            "--set",
            f"data.val_shards={val}",
            "--set",
            "init.pretrained=",
            *[a for s in sets for a in ("--set", s)],
            "--check",
        ]
    )
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ fine-tuning labels


def test_validation_labels_outside_the_head_are_refused_before_training(demo_tree, demo_shards, tmp_path, capsys):
    extra = tmp_path / "val_tree"
    shutil.copytree(demo_tree, extra)
    shutil.copytree(next(p for p in extra.iterdir() if p.is_dir()), extra / "zz_tenth_class")
    val = tmp_path / "val"
    make_shards(extra, val, "--shard-size-mb", "0.05")  # its own classes.json: ten classes
    code, err = finetune_check(capsys, demo_shards, val)
    assert code == 2 and err.count("\n") == 1 and "'zz_tenth_class'" in err and "not in the training" in err, err
    unlabeled = tmp_path / "unlabeled"
    make_shards(demo_tree, unlabeled, "--shard-size-mb", "0.05", "--layout", "flat")
    code, err = finetune_check(capsys, demo_shards, unlabeled)
    assert code == 2 and "labels [-1] outside the classifier's 9 classes" in err, err


def test_validation_classes_numbered_otherwise_are_mapped_by_name(demo_tree, demo_shards, tmp_path, capsys):
    from data_pipeline.dataset.labels import validation_label_map
    from data_pipeline.dataset.table import read_table
    from data_pipeline.loaders.eval_loader import EvalLoader, EvalSpec

    train_classes = json.loads((demo_shards / "classes.json").read_text())
    reversed_ids = {name: len(train_classes) - 1 - i for name, i in train_classes.items()}
    (tmp_path / "classes.json").write_text(json.dumps(reversed_ids))
    val = tmp_path / "val"
    make_shards(demo_tree, val, "--shard-size-mb", "0.05", "--classes", str(tmp_path / "classes.json"))
    code, _ = finetune_check(capsys, demo_shards, val)
    assert code == 0
    mapping, note = validation_label_map(demo_shards, val, read_table(val).label, 9)
    assert "mapped by class name" in note
    loader = EvalLoader("torch", EvalSpec(str(val), 0, 1, 16, 16, num_threads=1, label_map=tuple(mapping)))
    table = read_table(val)
    names = {v: k for k, v in reversed_ids.items()}
    for batch in loader:  # every label is the training set's number for that class
        for row, label in zip(batch.rows, batch.label.tolist()):
            assert label == train_classes[names[int(table.label[row])]]


# ------------------------------------------------------------------ weight files that lie


def test_a_clip_file_declaring_an_impossible_width_is_refused_before_allocating(tmp_path):
    from engine.targets.teachers import load_clip_teacher
    from engine.targets.timm_teachers import load_feature_teacher

    huge = torch.zeros(1).expand(1_048_576, 3, 16, 16)  # a tiny file whose tensor claims 13 TB of model
    sd = {
        "visual.conv1.weight": huge,
        "visual.class_embedding": torch.zeros(1).expand(1_048_576),
        "visual.positional_embedding": torch.zeros(1).expand(197, 1_048_576),
        "visual.ln_pre.weight": torch.zeros(1).expand(1_048_576),
        "visual.ln_post.weight": torch.zeros(1).expand(1_048_576),
        "visual.proj": torch.zeros(1).expand(1_048_576, 512),
        "visual.transformer.resblocks.0.ln_1.weight": torch.zeros(1).expand(1_048_576),
    }
    torch.save(sd, tmp_path / "clip.pt")
    assert (tmp_path / "clip.pt").stat().st_size < 100_000
    with pytest.raises(TeacherError, match="width 1048576, outside any known ViT"):
        load_feature_teacher(tmp_path / "clip.pt", "", grid=14, use_head=False)
    with pytest.raises(TeacherError, match="width 1048576, outside any known ViT"):
        load_clip_teacher(tmp_path / "clip.pt")


@pytest.fixture
def export_folder(tmp_path) -> Path:
    """An export of the test variant as engine.tools.export writes it (model.safetensors + export.json)."""
    out = tmp_path / "export"
    out.mkdir()
    kw = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 0}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    save_file(model.state_dict(), str(out / "model.safetensors"))
    meta = {
        "kind": "encoder",
        "weights": "model.safetensors",
        "timm_model": "vit_tiny_patch16_224",
        "timm_kwargs": kw,
        "config": to_dict(get_preset("deepmim_test_pixel")),
    }
    (out / "export.json").write_text(json.dumps(meta))
    return out


def corrupt_header(path: Path, how: str) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    if how == "length":
        path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif how == "json":
        path.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    else:  # offsets that point past the end of the file
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"] = [0, 10**12]
        text = json.dumps(header).encode().ljust(n)[:n]
        path.write_bytes(data[:8] + text + data[8 + n :])


@pytest.mark.parametrize("damage", ["length", "json", "offsets", "kind", "config", "resnet50"])
def test_a_damaged_or_wrong_export_is_one_line_before_launch(
    export_folder, demo_shards, demo_val_shards, damage, capsys
):
    meta = json.loads((export_folder / "export.json").read_text())
    if damage in ("length", "json", "offsets"):
        corrupt_header(export_folder / "model.safetensors", damage)
    elif damage == "kind":
        meta["kind"] = "classifier"
    elif damage == "config":
        del meta["config"]
    else:
        meta["timm_model"] = "resnet50"
    (export_folder / "export.json").write_text(json.dumps(meta))
    code, err = finetune_check(capsys, demo_shards, demo_val_shards, f"init.pretrained={export_folder}")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    expected = {
        "length": "corrupt safetensors header",
        "json": "corrupt safetensors header",
        "offsets": "corrupt safetensors header",
        "kind": "fine-tuned classifier",
        "config": "no 'config'",
        "resnet50": "'resnet50', not one of this project's ViT encoders",
    }
    assert expected[damage] in err, err


# ------------------------------------------------------------------ file systems


def test_a_full_disk_while_writing_metrics_is_one_line_naming_the_file(demo_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(DiskError) as err:
        pretrain(run, demo_shards, 3)
    assert "no space left writing" in str(err.value) and "metrics.jsonl" in str(err.value)
    assert err.value.exit_code == 2 and "MB free" in str(err.value)


def test_shared_memory_of_killed_runs_is_reclaimed_and_live_buffers_kept():
    from engine.loop.dist import reclaim_stale_shared_memory

    stale = Path(f"/dev/shm/deepspeed_allreduce_buffer_test_{os.getpid()}_stale")
    live = Path(f"/dev/shm/deepspeed_allreduce_buffer_test_{os.getpid()}_live")
    young = Path(f"/dev/shm/deepspeed_allreduce_buffer_test_{os.getpid()}_young")
    for p in (stale, live, young):
        p.write_bytes(b"\0" * 4096)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    holder = open(live, "rb")  # noqa: SIM115 (held open by a live process: this one)
    try:
        removed = reclaim_stale_shared_memory()
        assert str(stale) in removed and not stale.exists()
        assert live.exists() and young.exists()  # held by a live process; too young to judge
    finally:
        holder.close()
        for p in (stale, live, young):
            p.unlink(missing_ok=True)


def test_a_rank_releases_only_the_shared_memory_buffer_it_mapped(monkeypatch):
    """At exit a rank unlinks its own all-reduce buffer; a buffer of the same name that this process
    never mapped (a later job given the same freed port) is left to its owner."""
    import mmap

    from engine.loop.dist import release_shared_memory

    port = str(40000 + os.getpid() % 20000)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    name = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0")
    name.write_bytes(b"\0" * 4096)
    try:
        release_shared_memory()  # not mapped here: someone else's
        assert name.exists()
        with open(name, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            release_shared_memory()
            assert not name.exists()
    finally:
        name.unlink(missing_ok=True)
