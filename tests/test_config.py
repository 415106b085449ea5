"""Config tree: presets, overrides, validation messages, derived batch arithmetic, schedule."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from engine.config import Config, ConfigError, apply_overrides, derive, from_dict, to_dict, validate
from engine.loop.ds_setup import resolve_ds_config
from engine.loop.schedule import lr_at
from engine.presets import get_preset, list_presets
from tests.conftest import ROOT


def test_every_preset_validates_and_round_trips():
    for name in list_presets():
        cfg = get_preset(name)
        if cfg.target.kind == "clip" and not cfg.target.teacher:
            with pytest.raises(ConfigError, match="target.teacher"):  # ViT presets: the user names the file
                validate(cfg)
            cfg.target.teacher = "/weights/ViT-B-16.pt"
        if cfg.target.kind == "mixed" and not cfg.target.generator:
            with pytest.raises(ConfigError, match="target.generator"):
                validate(cfg)
            cfg.target.generator = "runs/mae_b16"
        validate(cfg)
        assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_paper_recipe_in_vit_presets():
    cfg = get_preset("deepmim_vit_b16_pixel")
    assert (cfg.data.global_batch, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (4096, 1600, 40)
    assert cfg.optim.base_lr == 1.5e-4 and cfg.optim.weight_decay == 0.05 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.mask.ratio == 0.75 and cfg.model.decoder_depth == 4 and cfg.model.decoder_dim == 512
    mae = get_preset("mae_vit_b16_pixel")
    assert mae.model.taps == [12] and mae.model.decoder_depth == 8


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset.*deepmim_tiny_pixel"):
        get_preset("deepmim_nope")


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["optim.base_lr=2e-4", "model.taps=3,4,6", "model.fused_decoders=false",
                                     "data.crop_scale=[0.3, 1.0]", "data.loader=torch"])  # fmt: skip
    assert cfg.optim.base_lr == 2e-4 and cfg.model.taps == [3, 4, 6] and cfg.model.fused_decoders is False
    assert cfg.data.crop_scale == [0.3, 1.0] and cfg.data.loader == "torch"
    with pytest.raises(ConfigError, match=r"optim has no field 'lrr'"):
        apply_overrides(Config(), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"schedule.epochs: cannot parse"):
        apply_overrides(Config(), ["schedule.epochs=many"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides(Config(), ["schedule.epochs"])


@pytest.mark.parametrize("ratio", ["0", "1", "1.2", "-0.5"])
def test_mask_ratio_outside_open_interval_is_refused(ratio):
    cfg = apply_overrides(Config(), [f"mask.ratio={ratio}"])
    with pytest.raises(ConfigError, match=r"mask.ratio=.*open interval \(0, 1\)"):
        validate(cfg)


@pytest.mark.parametrize(
    "override,field",
    [
        ("target.kind=pixels", "target.kind"),
        ("data.loader=pil", "data.loader"),
        ("model.decoder_heads=5", "model.decoder_heads"),
        ("schedule.warmup_epochs=2000", "schedule.warmup_epochs"),
        ("data.crop_scale=0.5,0.2", "data.crop_scale"),
        ("data.flip_prob=1.5", "data.flip_prob"),
    ],
)
def test_validation_names_the_field(override, field):
    cfg = apply_overrides(Config(), [override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(cfg)


def test_global_batch_must_divide_by_world_size():
    cfg = Config()
    cfg.data.global_batch, cfg.data.micro_batch = 96, 16
    d = derive(cfg, world_size=2, num_samples=10_000)
    assert d.grad_accum == 3 and d.steps_per_epoch == 10_000 // 96
    with pytest.raises(ConfigError, match=r"data.global_batch=96 is not divisible by .* = 16 \* 4 = 64"):
        derive(cfg, world_size=4, num_samples=10_000)


def test_derived_values():
    cfg = get_preset("deepmim_vit_b16_pixel")
    d = derive(cfg, world_size=16, num_samples=1_281_167)
    assert d.grad_accum == 1 and d.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert d.steps_per_epoch == 312 and d.total_steps == 312 * 1600 and d.warmup_steps == 312 * 40
    assert d.dropped_per_epoch == 1_281_167 - 312 * 4096
    with pytest.raises(ConfigError, match="too small"):
        derive(cfg, world_size=16, num_samples=1000)


def test_ds_config_batch_sizes_are_filled_and_cross_checked(tmp_path):
    cfg = get_preset("deepmim_tiny_pixel")
    d = derive(cfg, 2, 432)
    ds = resolve_ds_config(cfg, d)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        32,
        16,
        1,
    )
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "bf16": {"enabled": True}}))
    cfg.engine.ds_config = str(bad)
    with pytest.raises(ConfigError, match="train_batch_size=64 disagrees"):
        resolve_ds_config(cfg, d)


def test_schedule_is_warmup_then_cosine():
    peak, warm, total = 1.0, 10, 110
    assert lr_at(0, peak, warm, total) == 0.0
    assert lr_at(5, peak, warm, total) == pytest.approx(0.5)
    assert lr_at(10, peak, warm, total) == pytest.approx(1.0)
    assert lr_at(60, peak, warm, total) == pytest.approx(0.5)
    assert lr_at(110, peak, warm, total) == pytest.approx(0.0, abs=1e-12)
    lrs = [lr_at(s, peak, warm, total, min_lr=0.1) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1)
    assert lr_at(35, peak, warm, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.pretrain", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_errors_are_clear():
    proc = run_cli("--preset", "nope")
    assert proc.returncode == 2 and "unknown preset" in proc.stderr
    proc = run_cli("--preset", "deepmim_tiny_pixel", "--set", "mask.ratio=1.0")
    assert proc.returncode == 2 and "mask.ratio" in proc.stderr
    proc = run_cli("--preset", "deepmim_tiny_pixel", "--set", "target.kind=pixels", "--print-config")
    assert proc.returncode == 2 and "allowed values are ['pixel', 'mixed', 'clip']" in proc.stderr


def test_print_config():
    proc = run_cli("--preset", "deepmim_tiny_pixel", "--set", "optim.base_lr=3e-4", "--print-config")
    assert proc.returncode == 0
    out = json.loads(proc.stdout)
    cfg, derived = out["config"], out["derived"]
    assert cfg["optim"]["base_lr"] == 3e-4 and cfg["preset"] == "deepmim_tiny_pixel"
    # the values the preset leaves at 0 or empty, resolved, apart from what was set
    assert cfg["model"]["taps"] == [] and derived["taps"] == [3, 4, 5, 6]
    assert cfg["model"]["img_size"] == 0 and derived["img_size"] == 64
    assert cfg["optim"]["lr"] == 0.0 and derived["lr"] == 3e-4 * 32 / 256
