"""Hostile and unlucky inputs, in-process: no code runs from weight files, inconsistent shards are
named, a killed job's lock is not in the way, bad values named in one line."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers import MARK, Payload


def base(run: Path, shards: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--preset",
        "deepmim_test_pixel",
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={steps}",
        "--set",
        "log.reconstructions=false",
        *extra,
    ]


def openai_visual_module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module tree whose parameter names are the keys of an OpenAI CLIP state dict."""

    class Root(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Root()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


def test_torchscript_clip_is_read_without_running_it(tmp_path):
    from engine.targets.teachers import ClipArch, TeacherError, load_clip_teacher
    from engine.tools.teacher_tools import random_openai_clip

    arch = ClipArch(width=64, layers=2, patch=4, grid=4, out_dim=24)
    sd = random_openai_clip(arch, seed=3, with_text_tower=False)
    archive = tmp_path / "ViT-test.pt"
    torch.jit.save(torch.jit.script(openai_visual_module(sd)), str(archive))
    torch.save(sd, tmp_path / "plain.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_clip_teacher(archive)(x), load_clip_teacher(tmp_path / "plain.pt")(x))

    # the same archive with a pickle payload in place of its data: refused, nothing runs
    marker = tmp_path / MARK
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(
                item, pickle.dumps(Payload(marker), protocol=2) if item.filename.endswith("/data.pkl") else data
            )
    with pytest.raises(TeacherError) as err:
        load_clip_teacher(evil)
    assert str(evil) in str(err.value) and "os" in str(err.value) and not marker.exists()


def test_index_and_manifest_disagreeing_with_the_tar_are_named(demo_shards, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.dataset.wds_index import read_index, write_index
    from data_pipeline.loaders import preflight
    from data_pipeline.loaders.source import read_dataset

    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    info = read_dataset(root)
    a, b = info.shards[0], info.shards[1]
    entries = read_index(root / f"{a}.idx")
    write_index(root / f"{a}.idx", entries[:-2])  # the index lists fewer samples than the tar holds
    t = pq.read_table(root / "manifest.parquet").to_pylist()
    phantom = dict(next(r for r in t if r["shard"] == b), key="phantom_sample", offset=10**6)
    pq.write_table(pa.Table.from_pylist([*t, phantom]), root / "manifest.parquet")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "num_samples": meta["num_samples"] + 1}))
    info = read_dataset(root)
    with caplog.at_level("WARNING"):
        view = preflight.run(info, "markers", tmp_path / "view", 0, 1, lambda x: [x], lambda: None)
    log = caplog.text
    assert f"shard {a}: the manifest lists {info.shard_size(a)} samples, the index {info.shard_size(a) - 2}" in log
    assert f"shard {b}: the manifest lists {info.shard_size(b)} samples, the index {info.shard_size(b) - 1}" in log
    bad = json.loads((tmp_path / "view" / "bad_samples.json").read_text())
    assert [(x["shard"], x["key"]) for x in bad] == [(b, "phantom_sample")] and view.num_samples == 72


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("schedule.min_lr=-1", "schedule.min_lr"),
        ("mask.ratio=0.95", "mask.ratio"),
        ("mask.ratio=1.0", "mask.ratio"),
        ("debug.flag_lag=9", "debug.flag_lag"),
        ("optim.eps=-1", "optim.eps"),
        ("model.img_size=-16", "model.img_size"),
        ("model.img_size=18", "model.img_size"),
        ("seed=-3", "seed"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.base_lr=nan", "optim.base_lr"),
        ("data.decode_device=gpu", "data.decode_device"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(demo_shards, tmp_path, capsys, override, field):
    from engine.pretrain import main

    run = tmp_path / "unused"
    assert main([*base(run, demo_shards, 2), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: ") and field in err, err
    assert not run.exists()  # refused before any work


def test_verify_and_stats_report_problems_without_tracebacks(demo_shards, tmp_path, capsys, caplog):
    from data_pipeline.shards import stats, verify
    from tests.helpers import truncate_tar

    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    name = json.loads((root / "dataset.json").read_text())["shards"][0]
    truncate_tar(root, name, keep_samples=2)
    assert verify.main([str(root)]) == 1  # (its report is log lines)
    assert "Traceback" not in caplog.text and name in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert stats.main([str(empty)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "manifest.parquet is missing" in err


def test_shard_names_must_be_plain_file_names(demo_shards, tmp_path):
    from data_pipeline.loaders.source import read_dataset
    from engine.errors import DataError

    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["shards"][0] = "../escape"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="not a plain file name"):
        read_dataset(root)
