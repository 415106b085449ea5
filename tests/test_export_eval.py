"""Export to timm, per-block evaluation, and the run's TensorBoard log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from engine.models.mim import MaskedViTEncoder
from engine.models.registry import get_variant
from engine.tools.evaluate import evaluate, knn, linear_probe, load_encoder, render
from engine.tools.export import export, load_timm_encoder, split_encoder
from tests.conftest import ROOT, cpu_env


@pytest.fixture
def trained_run(pixel_run) -> Path:
    return pixel_run


@pytest.mark.launcher
def test_export_loads_strictly_into_timm_with_equal_features(trained_run, tmp_path):
    out = tmp_path / "export"
    meta = export(trained_run, out)
    assert meta["source_step"] == 6 and meta["timm_model"] == "vit_tiny_patch16_224"
    assert meta["dropped_keys"] and all(k.startswith("decoders.") for k in meta["dropped_keys"])
    weights = load_file(str(out / "encoder.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())  # consolidated fp32 masters
    # the fp32 masters round to the bf16 weights the model trained with
    module = torch.load(trained_run / "checkpoints/step_00000006/mp_rank_00_model_states.pt", weights_only=False)[
        "module"
    ]
    assert all(torch.equal(weights[k].to(torch.bfloat16), module[f"encoder.{k}"]) for k in weights)
    import hashlib

    assert (
        meta["sha256"]["encoder.safetensors"] == hashlib.sha256((out / "encoder.safetensors").read_bytes()).hexdigest()
    )
    timm_model = load_timm_encoder(out)  # strict=True inside
    ours, _ = load_encoder(export=str(out))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(timm_model.forward_features(x), ours.forward_all(x)[-1], atol=1e-5)
    # the CLI, and a clear error for a missing step
    cmd = [sys.executable, "-m", "engine.tools.export", str(trained_run), str(tmp_path / "e2"), "--step", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "no complete checkpoint at step 5" in proc.stderr


@pytest.mark.parametrize("arch", ["deepmim_vit_large_patch16", "deepmim_vit_huge_patch14"])
def test_vit_l_h_layouts_match_timm(arch):
    """Names and shapes of our ViT-L/H encoders are timm's (built on the meta device: no memory, no init)."""
    spec = get_variant(arch)
    with torch.device("meta"):
        enc = MaskedViTEncoder(spec, spec.img_size)
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    ours = {
        k: tuple(v.shape) for k, v in split_encoder({f"encoder.{k}": v for k, v in enc.state_dict().items()})[0].items()
    }
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vit_b_layout_loads_into_timm_with_equal_features(tmp_path):
    spec = get_variant("deepmim_vit_base_patch16")
    torch.manual_seed(0)
    enc = MaskedViTEncoder(spec, spec.img_size).eval()
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state["decoders.pred.weight"] = torch.zeros(1)
    encoder, dropped = split_encoder(state)
    assert dropped == ["decoders.pred.weight"]
    save_file(encoder, str(tmp_path / "encoder.safetensors"))
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0).eval()
    model.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")), strict=True)
    x = torch.randn(1, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), enc.forward_all(x)[-1], atol=1e-4)


def test_probe_and_knn_on_separable_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    x = np.eye(4)[y] * 3 + rng.normal(0, 0.3, (120, 4))
    assert linear_probe(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    assert knn(x[::2].astype(np.float32), y[::2], x[1::2].astype(np.float32), y[1::2], k=5) == 1.0
    noise = rng.normal(0, 1, (120, 4))
    assert linear_probe(noise[::2], y[::2], noise[1::2], y[1::2]) < 0.6


@pytest.mark.launcher
def test_evaluator_gives_one_row_per_block(trained_run, demo_shards):
    enc, cfg = load_encoder(run=str(trained_run))
    assert cfg.model.arch == "deepmim_vit_test_patch4"
    rows = evaluate(enc, 16, str(demo_shards), str(demo_shards), k=5)
    assert [r["block"] for r in rows] == [1, 2, 3, 4]
    assert all(0.0 <= r["linear"] <= 1.0 and 0.0 <= r["knn"] <= 1.0 for r in rows)
    table = render(rows)
    assert table.count("\n") == 1 + len(rows)
    proc = subprocess.run([sys.executable, "-m", "engine.tools.evaluate", "--random", "deepmim_vit_test_patch4",
                           "--train-shards", str(demo_shards), "--val-shards", str(demo_shards)],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "| 4 |" in proc.stdout and "linear probe" in proc.stdout


@pytest.mark.launcher
def test_tensorboard_and_figures(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ev.Reload()
    scalars = set(ev.Tags()["scalars"])
    for tag in ("loss/total", "loss/block2", "loss/block3", "loss/block4", "optim/lr", "speed/img_per_s",
                "time/data_wait_share", "memory/peak_gb", "faults/skipped_updates"):  # fmt: skip
        assert tag in scalars, tag
    assert [e.step for e in ev.Scalars("loss/total")] == [2, 4, 6]
    assert "figures/reconstructions" in ev.Tags()["images"]
    assert sorted(p.name for p in (trained_run / "figures").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]


def test_evaluator_warns_when_validation_is_not_held_out(demo_tree, demo_shards, demo_val_shards, tmp_path):
    from engine.tools.evaluate import overlap_warning
    from tests.conftest import make_shards

    assert "are the training shards" in overlap_warning(str(demo_shards), str(demo_shards))
    assert overlap_warning(str(demo_shards), str(demo_val_shards)) is None
    # a "validation" folder that reuses one training class's photos byte for byte
    cls = sorted(p for p in demo_tree.iterdir() if p.is_dir())[0]
    shutil.copytree(cls, tmp_path / "src" / cls.name)
    make_shards(tmp_path / "src", tmp_path / "mixed")
    n = len(list(cls.iterdir()))
    assert overlap_warning(str(demo_shards), str(tmp_path / "mixed")) == (
        f"{n} of {n} validation images are also in the training shards (same bytes)"
    )
