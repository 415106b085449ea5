"""Config tree: presets, overrides, validation messages, derived batch arithmetic, schedule."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from engine.config import Config, ConfigError, apply_overrides, from_dict, plan_run, to_dict, validate
from engine.loop.ds_setup import native_cpu_bf16, resolve_ds_config, resolve_precision
from engine.loop.schedule import lr_at
from engine.presets import get_preset, list_presets


def test_every_preset_validates_and_round_trips():
    from engine.cli import check_paths

    for name in list_presets():
        cfg = get_preset(name)
        validate(cfg)  # planning needs no teacher file; a launch does
        if cfg.target.kind == "clip" and not cfg.target.teacher:
            with pytest.raises(ConfigError, match="target.teacher"):  # ViT presets: the user names the file
                check_paths(cfg)
        if cfg.target.kind == "mixed" and not cfg.target.generator:
            with pytest.raises(ConfigError, match="target.generator"):
                check_paths(cfg)
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
    cfg = apply_overrides(
        Config(),
        [
            "optim.base_lr=2e-4",
            "model.taps=3,4,6",
            "model.fused_decoders=false",
            "data.crop_scale=[0.3, 1.0]",
            "data.loader=torch",
        ],
    )
    assert cfg.optim.base_lr == 2e-4 and cfg.model.taps == [3, 4, 6] and cfg.model.fused_decoders is False
    assert cfg.data.crop_scale == [0.3, 1.0] and cfg.data.loader == "torch"
    # a list with or without brackets, quoted or not: the docs' DeepSpeed override among them
    for taps in ("3,4,6", "[3,4,6]", "[3, 4, 6]", "[ 3 , 4 , 6 ]"):
        assert apply_overrides(Config(), [f"model.taps={taps}"]).model.taps == [3, 4, 6]
    ds = "engine.ds_overrides=[gradient_clipping=1.0,zero_optimization.compute_grad_norm=true]"
    want = ["gradient_clipping=1.0", "zero_optimization.compute_grad_norm=true"]
    assert apply_overrides(Config(), [ds]).engine.ds_overrides == want
    assert apply_overrides(Config(), ['engine.ds_overrides=["gradient_clipping=1.0"]']).engine.ds_overrides == want[:1]
    with pytest.raises(ConfigError, match=r"model.taps: cannot parse"):
        apply_overrides(Config(), ["model.taps=[3,four]"])
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


def test_batch_arithmetic_with_an_explicit_micro_batch():
    cfg = Config()
    cfg.data.global_batch, cfg.data.micro_batch = 96, 16
    p = plan_run(cfg, world_size=2, num_samples=10_000)
    assert (p.micro_batch, p.grad_accum, p.steps_per_epoch) == (16, 3, 10_000 // 96)
    with pytest.raises(ConfigError, match=r"per-rank batch 24 is not a multiple of 16.*data.micro_batch=12"):
        plan_run(cfg, world_size=4, num_samples=10_000)


def test_auto_micro_batch_takes_the_per_rank_share_up_to_what_fits():
    cfg = get_preset("deepmim_vit_b16_pixel")  # global 4096, up to 256 per GPU
    assert cfg.data.micro_batch == 0
    assert (plan_run(cfg, 1).micro_batch, plan_run(cfg, 1).grad_accum) == (256, 16)
    assert (plan_run(cfg, 64).micro_batch, plan_run(cfg, 64).grad_accum) == (64, 1)
    assert (plan_run(cfg, 512).micro_batch, plan_run(cfg, 512).grad_accum) == (8, 1)


def test_a_world_size_that_cannot_hold_the_recipe_gets_advice_that_keeps_it():
    cfg = get_preset("deepmim_vit_b16_pixel")
    with pytest.raises(ConfigError) as err:
        plan_run(cfg, world_size=48, num_samples=1_281_167)
    msg = str(err.value)
    assert "\n" not in msg and "data.global_batch=4096 on 48 ranks" in msg
    assert "data.global_batch=4080" in msg and "data.global_batch=4128" in msg  # the nearest ones, lr given
    assert "32, 64" in msg  # world sizes that keep the recipe
    with pytest.raises(ConfigError, match="too small for one optimizer step"):
        plan_run(cfg, world_size=16, num_samples=1000)


def test_the_plan_of_the_paper_recipe():
    cfg = get_preset("deepmim_vit_b16_pixel")
    p = plan_run(cfg, world_size=16, num_samples=1_281_167)
    assert p.complete and p.grad_accum == 1 and p.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert p.steps_per_epoch == 312 and p.total_steps == 312 * 1600 and p.warmup_steps == 312 * 40
    assert p.dropped_per_epoch == 1_281_167 - 312 * 4096
    assert (p.img_size, p.grid, p.num_patches, p.taps, p.pred_dim) == (224, 14, 196, (6, 8, 10, 12), 768)
    assert p.flops.per_image / 1e9 == pytest.approx(92.1, abs=0.1)  # docs/performance.md's worked number
    partial = plan_run(cfg)
    assert not partial.complete and partial.steps_per_epoch is None and partial.memory is None
    assert any("world size" in m for m in partial.missing) and any("shards" in m for m in partial.missing)


def test_memory_estimate_tracks_the_measured_h100_peak():
    """bench/results: ViT-B DeepMIM at micro-batch 256 under DeepSpeed ZeRO-2 on one H100, compiled:
    22.2 GB (pixels) and 20.5 GB (CLIP) peak allocated."""
    for preset, measured in (("deepmim_vit_b16_pixel", 22.25), ("deepmim_vit_b16_clip", 20.49)):
        cfg = get_preset(preset)
        cfg.data.micro_batch = 256
        est = plan_run(cfg, 1, 1_281_167).memory
        assert abs(est.total_gb - measured) / measured < 0.15, (preset, est)
    cfg = get_preset("deepmim_vit_b16_pixel")
    cfg.data.micro_batch = 64
    plain = plan_run(cfg, 8).memory
    cfg.engine.act_ckpt_encoder = cfg.engine.act_ckpt_decoder = 1
    ckpt = plan_run(cfg, 8).memory
    assert ckpt.activations_gb < plain.activations_gb / 2 and ckpt.optimizer_gb == plain.optimizer_gb


def test_a_teacher_refines_the_plan():
    from engine.config import TeacherShape

    cfg = get_preset("deepmim_vit_b16_clip")
    assumed = plan_run(cfg, 64, 1_281_167)
    assert assumed.teacher.assumed and assumed.pred_dim == 512 and assumed.notes
    wide = assumed.with_teacher(TeacherShape("clip", 1024, 24, 14, 768, 224))
    assert wide.pred_dim == 768 and not wide.notes and wide.flops.teacher_macs > assumed.flops.teacher_macs
    assert wide.steps_per_epoch == assumed.steps_per_epoch


def test_ds_config_batch_sizes_are_filled_and_cross_checked(tmp_path):
    cfg = get_preset("deepmim_tiny_pixel")
    p = plan_run(cfg, 2, 432)
    ds = resolve_ds_config(cfg, p)
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
        resolve_ds_config(cfg, p)


def test_precision_auto_follows_the_hardware_and_a_resumed_checkpoint():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert not native_cpu_bf16(avx2)
    assert native_cpu_bf16(avx2.replace("avx2", "avx2 avx512f avx512_bf16"))
    assert native_cpu_bf16(avx2.replace("avx2", "avx2 amx_bf16 amx_tile"))
    assert resolve_precision("auto", "cuda", None, cpu_bf16=False) == ("bf16", "")
    assert resolve_precision("auto", "cpu", None, cpu_bf16=True) == ("bf16", "")
    precision, why = resolve_precision("auto", "cpu", None, cpu_bf16=False)
    assert precision == "fp32" and "no native bf16" in why
    # a resume keeps what the run trained in, whatever the new machine has
    assert resolve_precision("auto", "cpu", "bf16", cpu_bf16=False) == ("bf16", "")
    # the first lines of every run's log say which and why
    from engine.loop.ds_setup import precision_reason

    assert "was trained in bf16" in precision_reason("auto", "cpu", "bf16", False)
    assert "native bf16" in precision_reason("auto", "cpu", None, True)
    assert "no native bf16" in precision_reason("auto", "cpu", None, False)
    assert precision_reason("fp32", "cuda", None, True) == "engine.precision=fp32"
    assert resolve_precision("auto", "cuda", "fp32", cpu_bf16=False) == ("fp32", "")
    # an explicit setting wins, and a change on resume is said
    assert resolve_precision("bf16", "cpu", None, cpu_bf16=False) == ("bf16", "")
    precision, why = resolve_precision("fp32", "cuda", "bf16", cpu_bf16=False)
    assert precision == "fp32" and "trained in bf16" in why


def test_precision_sets_deepspeeds_bf16_and_a_contradiction_is_refused(tmp_path):
    cfg = get_preset("deepmim_tiny_pixel")
    assert cfg.engine.precision == "auto" and get_preset("deepmim_test_pixel").engine.precision == "bf16"
    p = plan_run(cfg, 2, 432)
    assert resolve_ds_config(cfg, p, "bf16")["bf16"]["enabled"] is True
    assert resolve_ds_config(cfg, p, "fp32")["bf16"]["enabled"] is False
    cfg.engine.ds_overrides = ["bf16.enabled=false"]
    assert resolve_ds_config(cfg, p, "fp32")["bf16"]["enabled"] is False  # auto resolved to fp32: agrees
    cfg.engine.precision = "bf16"
    with pytest.raises(ConfigError, match="set engine.precision=fp32 instead"):
        resolve_ds_config(cfg, p, "bf16")
    cfg.engine.precision = "fp16"
    with pytest.raises(ConfigError, match="engine.precision"):
        validate(cfg)


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


@pytest.fixture
def run_cli(capsys):
    """``engine.pretrain``'s command line, in this process: (exit code, stdout, stderr)."""
    from engine.pretrain import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


def test_cli_errors_are_clear(run_cli):
    proc = run_cli("--preset", "nope")
    assert proc.returncode == 2 and "unknown preset" in proc.stderr
    proc = run_cli("--preset", "deepmim_tiny_pixel", "--set", "mask.ratio=1.0")
    assert proc.returncode == 2 and "mask.ratio" in proc.stderr
    proc = run_cli("--preset", "deepmim_tiny_pixel", "--set", "target.kind=pixels", "--print-config")
    assert proc.returncode == 2 and "allowed values are ['pixel', 'mixed', 'clip', 'features']" in proc.stderr


def test_print_config(run_cli):
    proc = run_cli("--preset", "deepmim_tiny_pixel", "--set", "optim.base_lr=3e-4", "--print-config")
    assert proc.returncode == 0
    out = json.loads(proc.stdout)
    cfg, plan = out["config"], out["plan"]
    assert cfg["optim"]["base_lr"] == 3e-4 and cfg["preset"] == "deepmim_tiny_pixel"
    # the values the preset leaves at 0 or empty, resolved, apart from what was set
    assert cfg["model"]["taps"] == [] and plan["taps"] == [3, 4, 5, 6]
    assert cfg["model"]["img_size"] == 0 and plan["img_size"] == 64
    assert cfg["optim"]["lr"] == 0.0 and plan["lr"] == 3e-4 * 32 / 256


@pytest.mark.parametrize("preset", ["deepmim_vit_b16_clip", "deepmim_vit_l16_pixel", "deepmim_vit_h14_mixed"])
def test_print_config_for_64_gpus_plans_the_whole_run(tmp_path, preset, run_cli):
    """A shard folder's size is read from dataset.json: the plan is complete, memory included,
    without the teacher files (their shape is assumed and said so)."""
    shards = tmp_path / "imagenet"
    shards.mkdir()
    (shards / "dataset.json").write_text(json.dumps({"num_samples": 1_281_167, "shards": []}))
    proc = run_cli("--preset", preset, "--set", f"data.shards={shards}", "--print-config", "--world-size", "64")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert plan["world_size"] == 64 and plan["micro_batch"] == 64 and plan["grad_accum"] == 1
    assert plan["steps_per_epoch"] == 312 and plan["total_steps"] == 312 * 1600 and plan["missing"] == []
    assert 1 < plan["memory"]["total_gb"] < 80 and plan["flops"]["gflop_per_image"] > 90
    proc = run_cli("--preset", preset, "--set", f"data.shards={shards}", "--print-config", "--world-size", "48")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "4080" in proc.stderr


def test_print_config_without_shards_says_what_is_missing(run_cli):
    proc = run_cli("--preset", "deepmim_vit_b16_pixel", "--set", "data.shards=/nonexistent", "--print-config")
    plan = json.loads(proc.stdout)["plan"]
    assert proc.returncode == 0 and plan["steps_per_epoch"] is None and plan["grad_accum"] == 16
    assert any("data.shards='/nonexistent'" in m for m in plan["missing"])


def test_print_config_prices_the_run(run_cli):
    """Checkpoint size and count from the plan's parameters; time and GPU-hours from the committed GPU
    measurement of the same model and target, named; none for a model never measured."""
    import json as _json

    from engine.config.pricing import measured_rate

    args = ("--print-config", "--world-size", "32", "--num-samples", "1281167")
    doc = _json.loads(run_cli("--preset", "deepmim_vit_b16_clip", *args).stdout)
    price, plan = doc["price"], doc["plan"]
    assert price["checkpoint_gb"] == pytest.approx(1.95, abs=0.05)  # measured on CPU: 1.95 GB for ViT-B
    assert price["checkpoints_saved"] == -(-plan["stop_step"] // 1000) and price["checkpoints_kept"] == 3
    rate = measured_rate("deepmim_vit_base_patch16", "clip")
    assert rate is not None and rate["device"] in price["measured"] and rate["file"] in price["measured"]
    hours = plan["stop_step"] * 4096 / (rate["img_per_s"] * 32) / 3600
    assert price["hours"] == pytest.approx(hours, abs=0.1) and price["gpu_hours"] == pytest.approx(32 * hours, abs=1)
    doc = _json.loads(run_cli("--preset", "deepmim_vit_h14_pixel", *args).stdout)
    assert doc["price"]["time"].startswith("no measurement for deepmim_vit_huge_patch14")
    doc = _json.loads(
        run_cli("--preset", "deepmim_tiny_pixel", "--set", "data.max_micro_batch=8", "--print-config").stdout
    )
    assert doc["warnings"] == [
        "data.max_micro_batch has no effect: data.micro_batch=16 is fixed (the preset's); max_micro_batch only bounds "
        "the automatic choice: set data.micro_batch=0 as well, or set data.micro_batch itself"
    ]
