"""Validation of a config tree, once, before any work: every message names the field and what
is allowed. Cross-field checks that need the variant or the world size live in the run plan
(``engine.config.plan``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from data_pipeline.dataset.locations import is_remote
from engine.config.schema import GUARD_RING, Config
from engine.errors import ConfigError


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{path}={value!r}: allowed values are {list(allowed)}")


def _finite_floats(obj: Any, prefix: str = "") -> None:
    """Every float in the tree is finite: inf or NaN anywhere is a typo, never a setting."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _finite_floats(value, path + ".")
        elif isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
            values = value if isinstance(value, list) else [value]
            _check(all(math.isfinite(v) for v in values), f"{path}={value}: must be a finite number")


def validate(cfg: Config) -> None:
    """Check every value before any work: the message names the field and the allowed values."""
    _one_of("task", cfg.task, ("pretrain", "finetune", "linprobe"))
    _finite_floats(cfg)
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_optim(cfg)
    _validate_run(cfg)
    if cfg.task == "pretrain":
        _validate_pretrain(cfg)
    else:
        _validate_finetune(cfg)
    from engine.config.plan import plan_run

    plan_run(cfg)  # cross-field checks: image size and patch, taps, mask ratio, min_lr vs the peak lr


def _validate_model(cfg: Config) -> None:
    from engine.models.registry import get_variant

    m = cfg.model
    get_variant(m.arch)  # an unknown name lists the registered ones
    _check(m.img_size >= 0, f"model.img_size={m.img_size}: 0 (the variant's size) or a positive size")
    _check(m.decoder_dim > 0 and m.decoder_depth > 0, "model.decoder_dim and model.decoder_depth must be > 0")
    _one_of("model.decoder_attention", m.decoder_attention, ("auto", "flash", "efficient", "cudnn", "math", "flex"))
    _one_of("model.qkv_layout", m.qkv_layout, ("packed", "split"))
    _check(
        m.decoder_heads > 0 and m.decoder_dim % m.decoder_heads == 0,
        f"model.decoder_heads={m.decoder_heads}: must divide model.decoder_dim={m.decoder_dim}",
    )


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _one_of("data.loader", d.loader, ("dali", "torch"))
    _one_of("data.decode_device", d.decode_device, ("auto", "gpu", "cpu"))
    _one_of("data.on_change", d.on_change, ("refuse", "next_epoch"))
    _check(d.global_batch > 0, f"data.global_batch={d.global_batch}: must be > 0")
    _check(d.micro_batch >= 0, f"data.micro_batch={d.micro_batch}: 0 (auto) or a positive batch")
    _check(d.max_micro_batch > 0, f"data.max_micro_batch={d.max_micro_batch}: must be > 0")
    _check(d.eval_batch >= 0, f"data.eval_batch={d.eval_batch}: 0 (= data.micro_batch) or a positive batch")
    _check(d.num_threads > 0, f"data.num_threads={d.num_threads}: must be > 0")
    _one_of("data.order", d.order, ("auto", "global", "block"))
    _check(d.block_window >= 1, f"data.block_window={d.block_window}: shards per shuffle window, >= 1")
    _check(d.cache_gb >= 0, f"data.cache_gb={d.cache_gb}: 0 (auto) or a budget in GB")
    _check(d.prefetch_shards >= 1, f"data.prefetch_shards={d.prefetch_shards}: must be >= 1")
    _check(d.fetch_retries >= 1, f"data.fetch_retries={d.fetch_retries}: must be >= 1")
    _check(d.fetch_timeout_s > 0, f"data.fetch_timeout_s={d.fetch_timeout_s}: must be > 0")
    _check(d.fetch_patience_s > 0, f"data.fetch_patience_s={d.fetch_patience_s}: must be > 0 seconds")
    stall = cfg.fault.stall_exit_s
    _check(
        not is_remote(d.shards) or not stall or d.fetch_patience_s < stall,
        f"data.fetch_patience_s={d.fetch_patience_s:g} must be below fault.stall_exit_s={stall:g}: a rank that "
        "waits out the storage makes no step meanwhile, and the watchdog would end the run first",
    )
    if is_remote(d.shards):
        _check(
            d.order != "global",
            f"data.order=global with data.shards={d.shards!r}: the global order reads every shard at random; "
            "shards in object storage need data.order=block (or auto)",
        )
    _check(
        not is_remote(d.val_shards),
        f"data.val_shards={d.val_shards!r}: validation shards are read whole every epoch; keep them on local "
        "disk (copy them with: aws s3 sync URL DIR)",
    )
    _check(0 <= d.flip_prob <= 1, f"data.flip_prob={d.flip_prob}: a probability in [0, 1]")
    _check(
        len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
        f"data.crop_scale={d.crop_scale}: must be [lo, hi] with 0 < lo <= hi <= 1",
    )
    _check(
        len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1],
        f"data.crop_ratio={d.crop_ratio}: must be [lo, hi] with 0 < lo <= hi",
    )


def _validate_optim(cfg: Config) -> None:
    o, s = cfg.optim, cfg.schedule
    _one_of("optim.name", o.name, ("adamw", "lars"))
    _check(o.base_lr > 0 or o.lr > 0, f"optim.base_lr={o.base_lr}, optim.lr={o.lr}: one of them must be > 0")
    _check(o.lr >= 0 and o.base_lr >= 0, "optim.lr and optim.base_lr must be >= 0")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas}: two values in [0, 1)")
    _check(o.eps > 0, f"optim.eps={o.eps}: must be > 0 (it keeps AdamW's division away from zero)")
    _check(0 <= o.momentum < 1, f"optim.momentum={o.momentum}: must be in [0, 1)")
    _check(s.epochs > 0, f"schedule.epochs={s.epochs}: must be > 0")
    _check(0 <= s.warmup_epochs <= s.epochs, f"schedule.warmup_epochs={s.warmup_epochs}: must be in [0, epochs]")
    _check(s.max_steps >= 0, f"schedule.max_steps={s.max_steps}: must be >= 0")
    _check(s.min_lr >= 0, f"schedule.min_lr={s.min_lr}: must be >= 0")


def _validate_run(cfg: Config) -> None:
    _check(cfg.seed >= 0, f"seed={cfg.seed}: must be >= 0")
    _one_of("log.level", cfg.log.level, ("DEBUG", "INFO", "WARNING", "ERROR"))
    _one_of("log.progress", cfg.log.progress, ("auto", "on", "off"))
    _one_of("engine.compile", str(cfg.engine.compile).lower(), ("auto", "true", "false"))
    _one_of("engine.precision", cfg.engine.precision, ("bf16", "fp32", "auto"))
    _check(cfg.checkpoint.interval > 0, f"checkpoint.interval={cfg.checkpoint.interval}: must be > 0")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last={cfg.checkpoint.keep_last}: must be >= 1")
    _check(cfg.checkpoint.keep_every_epochs >= 0, "checkpoint.keep_every_epochs: must be >= 0")
    _check(cfg.log.interval > 0, f"log.interval={cfg.log.interval}: must be > 0")
    _check(cfg.log.figure_interval >= 0, f"log.figure_interval={cfg.log.figure_interval}: must be >= 0")
    f = cfg.fault
    _check(f.max_bad_steps >= 1, f"fault.max_bad_steps={f.max_bad_steps}: must be >= 1")
    _check(f.max_rollbacks >= 0, f"fault.max_rollbacks={f.max_rollbacks}: must be >= 0")
    _one_of("fault.data_checks", f.data_checks, ("index", "markers", "decode"))
    _check(0 <= f.max_bad_sample_share < 1, f"fault.max_bad_sample_share={f.max_bad_sample_share}: must be in [0, 1)")
    _check(f.stall_factor > 1, f"fault.stall_factor={f.stall_factor}: must be > 1 (a multiple of the median step time)")
    _check(f.stall_min_s > 0, f"fault.stall_min_s={f.stall_min_s}: must be > 0 seconds")
    _check(f.heartbeat_s > 0, f"fault.heartbeat_s={f.heartbeat_s}: must be > 0 seconds")
    _check(f.stall_exit_s >= 0, f"fault.stall_exit_s={f.stall_exit_s}: seconds >= 0 (0 = never exit)")
    lag = cfg.debug.flag_lag
    ring = GUARD_RING
    _check(-1 <= lag < ring, f"debug.flag_lag={lag}: -1 (the device's) or 0..{ring - 1} (the guard keeps {ring} steps)")
    e = cfg.engine
    for name in ("act_ckpt_encoder", "act_ckpt_decoder"):
        k = getattr(e, name)
        _check(k >= 0, f"engine.{name}={k}: 0 (off) or k >= 1 (every k-th block)")
    _one_of(
        "engine.compile_mode",
        e.compile_mode,
        ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    _check(e.peak_tflops >= 0, f"engine.peak_tflops={e.peak_tflops}: must be >= 0 (0 = look up the device)")


def _validate_pretrain(cfg: Config) -> None:
    ratio = cfg.mask.ratio
    _check(0.0 < ratio < 1.0, f"mask.ratio={ratio}: must be in the open interval (0, 1)")
    t = cfg.target
    _one_of("target.kind", t.kind, ("pixel", "mixed", "clip", "features"))
    _one_of("target.feature_loss", t.feature_loss, ("cosine", "smooth_l1"))
    _check(
        t.kind == "features" or not t.teacher_head,
        f"target.teacher_head=true is for target.kind=features (kind={t.kind}: clip always projects)",
    )
    _check(
        t.kind in ("clip", "features") or not t.teacher_arch,
        f"target.teacher_arch={t.teacher_arch!r} names a feature teacher; set target.kind=features (or clip)",
    )
    for w in t.weights:
        _check(w >= 0, f"target.weights={t.weights}: weights must be >= 0")
    _one_of("target.mix_space", t.mix_space, ("norm", "raw"))
    _one_of("target.generator_norm_pix", t.generator_norm_pix, ("auto", "true", "false"))
    _check(all(0.0 <= a <= 1.0 for a in t.mix_alphas), f"target.mix_alphas={t.mix_alphas}: each must be in [0, 1]")
    _check(t.feature_dim >= 0, f"target.feature_dim={t.feature_dim}: must be >= 0")
    if t.kind == "mixed":
        _check(
            t.mix_space == "raw" or t.norm_pix,
            "target.mix_space=norm mixes normalized pixels and needs target.norm_pix=true (or use mix_space=raw)",
        )


def _validate_finetune(cfg: Config) -> None:
    f = cfg.finetune
    _check(
        bool(cfg.data.val_shards),
        "data.val_shards: labeled validation shards are required for fine-tuning "
        "and probing (they are evaluated every epoch)",
    )
    _check(f.num_classes >= 0, f"finetune.num_classes={f.num_classes}: 0 (from the shards) or the class count")
    _one_of("finetune.global_pool", f.global_pool, ("avg", "token"))
    _one_of("finetune.head_norm", f.head_norm, ("none", "batchnorm"))
    _check(f.head_init_std > 0, f"finetune.head_init_std={f.head_init_std}: must be > 0")
    _check(0 <= f.drop_path < 1, f"finetune.drop_path={f.drop_path}: must be in [0, 1)")
    _check(0 < f.layer_decay <= 1, f"finetune.layer_decay={f.layer_decay}: must be in (0, 1] (1 = off)")
    _check(0 <= f.smoothing < 1, f"finetune.smoothing={f.smoothing}: must be in [0, 1)")
    _check(f.mixup >= 0 and f.cutmix >= 0, f"finetune.mixup={f.mixup}, finetune.cutmix={f.cutmix}: alphas >= 0")
    for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
        v = getattr(f, name)
        _check(0 <= v <= 1, f"finetune.{name}={v}: a probability in [0, 1]")
    _check(0 < f.eval_crop <= 1, f"finetune.eval_crop={f.eval_crop}: must be in (0, 1]")
    ra = f.rand_augment
    _check(
        ra == "" or ra.startswith("rand"),
        f"finetune.rand_augment={ra!r}: empty (off) or timm's form, e.g. 'rand-m9-mstd0.5-inc1'",
    )
    if f.mixup > 0 or f.cutmix > 0:
        _check(
            cfg.data.micro_batch % 2 == 0,
            f"data.micro_batch={cfg.data.micro_batch}: mixup/cutmix pair samples within a micro-batch, which must "
            "be even (or set finetune.mixup=0 finetune.cutmix=0)",
        )
    if cfg.task == "linprobe":
        _check(f.freeze_encoder, "finetune.freeze_encoder: must be true for task=linprobe")


def ineffective(cfg: Config, overrides: list[str]) -> list[str]:
    """``--set`` values that the rest of the config makes moot (usually a value the preset fixes), one
    sentence each: said before launch instead of being silently ignored."""
    given = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    t, d = cfg.target, cfg.data
    rules = [
        (
            "data.max_micro_batch",
            d.micro_batch > 0,
            f"data.micro_batch={d.micro_batch} is fixed (the preset's); max_micro_batch only bounds the automatic "
            "choice: set data.micro_batch=0 as well, or set data.micro_batch itself",
        ),
        ("optim.base_lr", cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} is set and overrides it"),
        ("target.generator", t.kind != "mixed", f"target.kind={t.kind}: only a mixed target reads a generator"),
        ("target.mix_alphas", t.kind != "mixed", f"target.kind={t.kind}: only a mixed target mixes"),
        (
            "target.teacher",
            t.kind not in ("clip", "features"),
            f"target.kind={t.kind}: only clip and features targets read a teacher",
        ),
        ("target.norm_pix", t.kind in ("clip", "features"), f"target.kind={t.kind}: the targets are features"),
        ("init.pretrained", cfg.task == "pretrain", "pretraining starts from random weights (it is for fine-tuning)"),
    ]
    out = [f"{key} has no effect: {why}" for key, moot, why in rules if key in given and moot]
    if cfg.task == "pretrain":
        out += [
            f"{k} has no effect: a pretraining run has no classifier"
            for k in sorted(given)
            if k.startswith("finetune.")
        ]
    return out
