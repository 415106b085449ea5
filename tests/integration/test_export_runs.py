"""Export to timm, per-block evaluation, and the TensorBoard log of a real run."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.tools.evaluate import evaluate, load_encoder, render
from engine.tools.export import export, load_timm_encoder
from tests.conftest import ROOT, cpu_env


@pytest.fixture
def trained_run(pixel_run) -> Path:
    return pixel_run


@pytest.mark.launcher
def test_export_loads_strictly_into_timm_with_equal_features(trained_run, tmp_path):
    out = tmp_path / "export"
    meta = export(trained_run, out, fmt="mae")
    assert meta["source_step"] == 6 and meta["timm_model"] == "vit_tiny_patch16_224"
    assert meta["architecture"].startswith("ViT patch 4, width 32, depth 4")  # true to the model, whatever its name
    assert meta["dropped_keys"] and all(k.startswith("decoders.") for k in meta["dropped_keys"])
    weights = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())  # consolidated fp32 masters
    # the fp32 masters round to the bf16 weights the model trained with
    module = torch.load(trained_run / "checkpoints/step_00000006/mp_rank_00_model_states.pt", weights_only=False)[
        "module"
    ]
    assert all(torch.equal(weights[k].to(torch.bfloat16), module[f"encoder.{k}"]) for k in weights)
    for name in ("model.safetensors", "config.json", "mae_checkpoint.pth"):
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    for f in out.iterdir():  # world-readable, like the rest of the run folder
        assert f.stat().st_mode & 0o044 == 0o044, f
    timm_model = load_timm_encoder(out)  # strict=True inside
    ours, _ = load_encoder(export=str(out))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(timm_model.forward_features(x), ours.forward_all(x)[-1], atol=1e-5)
    # MAE's main_finetune.py reads checkpoint['model']
    mae = torch.load(out / "mae_checkpoint.pth", weights_only=True)["model"]
    assert mae.keys() == weights.keys() and all(torch.equal(mae[k], weights[k]) for k in weights)
    # the CLI, and a clear error for a missing step
    cmd = [sys.executable, "-m", "engine.tools.export", str(trained_run), str(tmp_path / "e2"), "--step", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "no complete checkpoint at step 5" in proc.stderr


@pytest.mark.launcher
def test_timm_reads_the_export_with_its_own_loader_and_data_config(trained_run, tmp_path):
    """timm.create_model("local-dir:...") builds and loads the export, and timm's data pipeline
    (resolve_data_config, used by train.py and validate.py) gets the statistics it was trained with."""
    import timm
    from timm.data import resolve_data_config

    out = tmp_path / "export"
    meta = export(trained_run, out)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ref = load_timm_encoder(out)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), ref.forward_features(x))
    data = resolve_data_config({}, model=model)
    assert list(data["mean"]) == meta["normalization"]["mean"] and list(data["std"]) == meta["normalization"]["std"]
    assert tuple(data["input_size"]) == (3, 16, 16) and data["interpolation"] == "bicubic"
    assert round(16 / data["crop_pct"]) == meta["eval_transform"]["resize_short_side"]


@pytest.mark.launcher
def demo_shards_of(run) -> str:
    return json.loads((run / "config.json").read_text())["config"]["data"]["shards"]


def test_deepspeeds_own_tools_read_our_checkpoints_as_documented(trained_run, tmp_path):
    """checkpoints/latest names the newest complete checkpoint; zero_to_fp32.py and ds_to_universal run
    without extra flags and give the export's tensors."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    export(run, tmp_path / "export")
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    proc = subprocess.run(
        [sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "fp32")],
        cwd=tmp_path,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    full = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(full[f"encoder.{k}"], v) for k, v in weights.items())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpts / "step_00000006"),
            "--output_folder",
            str(tmp_path / "universal" / "step_00000006"),
        ],
        cwd=tmp_path,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    universal = tmp_path / "universal" / "step_00000006"
    for k, v in weights.items():
        assert torch.equal(torch.load(universal / "zero" / f"encoder.{k}" / "fp32.pt")["param"], v)
    # --resume onto that folder is refused before launch, naming the checkpoint that resumes
    check = ["--preset", "deepmim_test_pixel", "--run-dir", str(run), "--set", f"data.shards={demo_shards_of(run)}"]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.pretrain", *check, "--resume", str(universal), "--check"],
        cwd=tmp_path,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "universal checkpoint" in proc.stderr and "--resume RUN/checkpoints/step_00000006" in proc.stderr


@pytest.mark.launcher
def test_evaluator_gives_one_row_per_block(trained_run, demo_shards):
    enc, cfg = load_encoder(run=str(trained_run))
    assert cfg.model.arch == "deepmim_vit_test_patch4"
    rows = evaluate(enc, 16, str(demo_shards), str(demo_shards), k=5)
    assert [r["block"] for r in rows] == [1, 2, 3, 4]
    assert all(0.0 <= r["linear"] <= 1.0 and 0.0 <= r["knn"] <= 1.0 for r in rows)
    table = render(rows)
    assert table.count("\n") == 1 + len(rows)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.tools.evaluate",
            "--random",
            "deepmim_vit_test_patch4",
            "--train-shards",
            str(demo_shards),
            "--val-shards",
            str(demo_shards),
        ],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "| 4 |" in proc.stdout and "linear probe" in proc.stdout


@pytest.mark.launcher
def test_tensorboard_and_figures(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ev.Reload()
    scalars = set(ev.Tags()["scalars"])
    for tag in (
        "loss/total",
        "loss/block2",
        "loss/block3",
        "loss/block4",
        "optim/lr",
        "speed/img_per_s",
        "time/data_wait_share",
        "memory/peak_gb",
        "faults/skipped_updates",
    ):
        assert tag in scalars, tag
    assert [e.step for e in ev.Scalars("loss/total")] == [2, 4, 6]
    assert "figures/reconstructions" in ev.Tags()["images"]
    assert sorted(p.name for p in (trained_run / "figures").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
