"""One typed config tree for a pretraining run.

Every knob lives in a nested dataclass, one per component. Presets (``engine.presets``) are plain
functions returning a ``Config``; the command line changes single fields by dotted path
(``--set optim.base_lr=1e-4``). ``validate`` runs once at start-up and names the field and the
allowed values on failure. Values that follow from others (learning rate from base lr and global
batch, accumulation steps, steps per epoch) are computed in ``derive`` and never written back, so
the config written to the run folder is exactly what the user asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


@dataclass
class ModelConfig:
    arch: str = "deepmim_vit_base_patch16"  # encoder variant in engine.registry
    img_size: int = 0  # 0 = the variant's native size
    # 1-indexed encoder blocks that feed a decoder; the last must be the final block. Empty = the
    # variant's default (the paper's 6/8/10/12 for ViT-B; 1/2, 2/3, 5/6 depth for others).
    taps: list[int] = field(default_factory=list)
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    fused_decoders: bool = True  # one batched pass over all decoders; False = per-decoder loop
    # decoder attention kernel: auto (SDPA chooses) | flash | efficient | cudnn | math (one SDPA kernel) | flex
    decoder_attention: str = "auto"
    qkv_layout: str = "packed"  # packed (one GEMM, permuted views) | split (three GEMMs, copy-free q/k/v)


@dataclass
class MaskConfig:
    ratio: float = 0.75


@dataclass
class TargetConfig:
    kind: str = "pixel"  # pixel | mixed | clip
    norm_pix: bool = True  # MAE's per-patch normalized pixel target
    weights: list[float] = field(default_factory=list)  # per tap; empty = 1.0 each
    # clip: CLIP visual-tower weights (OpenAI layout or timm's); the width is read from them.
    teacher: str = ""
    feature_dim: int = 0  # expected teacher width; 0 = whatever the weights say
    # mixed: MAE generator = our run/checkpoint folder (a pixel-target run) or an official MAE .pth
    generator: str = ""
    generator_norm_pix: str = "auto"  # auto (read from our checkpoint) | true | false (official files)
    mix_alphas: list[float] = field(default_factory=list)  # a_k per tap; empty = 0 .. 1 evenly (0, 1/3, 2/3, 1)
    mix_space: str = "norm"  # norm (per-patch normalized pixels) | raw (pixels, normalized after mixing)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (fused; pretraining, fine-tuning) | lars (timm's; linear probing)
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    lr: float = 0.0  # absolute lr; overrides base_lr when > 0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # lars only


@dataclass
class ScheduleConfig:
    epochs: int = 1600
    warmup_epochs: float = 40.0
    min_lr: float = 0.0
    # Stop after this many optimizer steps without changing the schedule's shape (0 = run all).
    max_steps: int = 0


@dataclass
class DataConfig:
    shards: str = "data/shards"  # folder written by data_pipeline.make_shards
    loader: str = "dali"  # dali | torch (fallback)
    global_batch: int = 4096
    micro_batch: int = 64  # per rank, per forward/backward
    num_threads: int = 8  # DALI threads / torch DataLoader workers per rank
    decode_device: str = "auto"  # auto (gpu when CUDA is present) | gpu | cpu
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    flip_prob: float = 0.5  # horizontal flips (0 for data whose classes a mirror changes: text, digits)
    val_shards: str = ""  # labeled validation shards (fine-tuning, probing): evaluated every epoch and at the end
    eval_batch: int = 0  # evaluation batch per rank; 0 = micro_batch


@dataclass
class InitConfig:
    # fine-tuning and probing: encoder weights from a pretraining run folder (its newest complete
    # checkpoint), one checkpoint folder, or an engine.tools.export folder; empty = random init
    pretrained: str = ""


@dataclass
class FinetuneConfig:
    """Classification on top of a pretrained encoder (fine-tuning and linear probing)."""

    num_classes: int = 0  # 0 = the training shards' number of classes
    global_pool: str = "avg"  # avg (mean of patch tokens, then a new fc_norm) | token (cls, after the encoder norm)
    freeze_encoder: bool = False  # linear probing: only the head trains
    head_norm: str = "none"  # none | batchnorm (BatchNorm1d without affine before the head: MAE's linear probe)
    head_init_std: float = 2e-5  # truncated-normal std of the new head's weight
    drop_path: float = 0.1
    layer_decay: float = 0.75  # lr scale = layer_decay ** (blocks above); 1.0 = off
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0  # probability of mixup or cutmix per batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm's RandAugment policy; empty = off
    reprob: float = 0.25  # random erasing probability (per image, pixel noise, one box)
    eval_crop: float = 0.875  # evaluation: resize the short side to img_size / eval_crop, center crop img_size


@dataclass
class CheckpointConfig:
    interval: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3
    keep_every_epochs: int = 0  # also keep one checkpoint at the end of every N-th epoch (0 = off)
    resume: str = "auto"  # auto (newest complete checkpoint in run_dir) | never | <checkpoint dir>
    on_signal: bool = True  # SIGTERM/SIGUSR1: finish the step, save, exit 0 (RUN_DIR/PREEMPTED)


@dataclass
class FaultConfig:
    max_bad_steps: int = 3  # this many consecutive non-finite steps -> roll back to the last checkpoint
    max_rollbacks: int = 3  # more rollbacks than this in one process -> stop with an error
    data_checks: str = "markers"  # start-up data checks: index | markers | decode
    max_bad_sample_share: float = 0.001  # stop when more of the samples than this are unreadable
    # A rank without a step for stall_factor x the median step time (at least stall_min_s) is reported,
    # with the ranks that are behind or silent; after stall_exit_s the process exits (code 4; 0 = never).
    stall_factor: float = 20.0
    stall_min_s: float = 120.0
    stall_exit_s: float = 900.0
    heartbeat_s: float = 10.0  # seconds between heartbeat files (RUN_DIR/heartbeat/), the watchdog's side channel


@dataclass
class DebugConfig:
    """Fault drills for tests and for rehearsing recovery; all empty in real runs."""

    nan_loss_steps: list[int] = field(default_factory=list)  # make the loss NaN at these optimizer steps
    nan_grad_steps: list[int] = field(default_factory=list)  # poison one gradient at these steps
    pause_before_marker_s: float = 0.0  # hold a save open before its completeness marker
    step_sleep_s: float = 0.0  # slow every optimizer step down (to interrupt runs at a chosen point)
    flag_lag: int = -1  # steps between a fault flag and the reaction; -1 = the device's (2 on GPU, 0 on CPU)


@dataclass
class LogConfig:
    interval: int = 50  # optimizer steps between metric lines (the only host-device syncs)
    level: str = "INFO"
    reconstructions: bool = True  # write reconstructions.png at the end of a run
    # CUDA only: count host-device syncs inside train_step on steps that do not log (should be 0)
    sync_debug: bool = False
    sample_keys: bool = False  # write every rank's sample keys per step to RUN_DIR/sample_keys/
    progress: str = "auto"  # tqdm bar on rank 0 (step, epoch, img/s, loss, ETA): auto (on a terminal) | on | off
    tensorboard: bool = True  # RUN_DIR/tensorboard: losses per tap, lr, speed, time shares, memory, MFU
    figure_interval: int = 0  # steps between reconstruction / similarity figures (0 = only at the end)


@dataclass
class EngineConfig:
    ds_config: str = "ds_configs/zero2_bf16.json"
    # torch.compile of the repeated blocks (encoder, decoders, teacher): each block class is
    # compiled once and reused, so compile time stays small; on failure training runs eager.
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    # activation checkpointing: 0 = off, 1 = every block, k = every k-th block
    act_ckpt_encoder: int = 0
    act_ckpt_decoder: int = 0
    peak_tflops: float = 0.0  # dense bf16 peak per device for MFU; 0 = look up the device name
    # FP8 training of the encoder's linear layers (torchao float8; emulated on CPU). Opt-in and not yet
    # recommended: it must first match bf16's loss curve on a GPU (see the README's speed section).
    fp8: bool = False
    # DeepSpeed knobs changed from the command line: "zero_optimization.reduce_bucket_size=5e8" (JSON values)
    ds_overrides: list[str] = field(default_factory=list)


@dataclass
class Config:
    task: str = "pretrain"  # pretrain | finetune | linprobe (set by the preset; decides which sections matter)
    preset: str = ""
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    init: InitConfig = field(default_factory=InitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# ----------------------------------------------------------------------------------------------
# Serialization and overrides


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output; unknown keys are an error (typos must not pass)."""
    return _build(Config, data, "")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix or 'config'}: unknown field(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` strings in order; values are parsed by the field's type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        path, raw = item.split("=", 1)
        set_field(cfg, path.strip(), raw.strip())
    return cfg


def set_field(cfg: Config, path: str, raw: str) -> None:
    parts = path.split(".")
    obj: Any = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:depth])} is not a section; cannot set {path}")
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            where = ".".join(parts[:depth]) or "config"
            raise ConfigError(f"{path}: {where} has no field {name!r}; fields: {names}")
        if depth == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[name]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{path} is a section; set one of its fields")
            setattr(obj, name, parse_value(raw, tp, path))
        else:
            obj = getattr(obj, name)


def parse_value(raw: str, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            text = raw.strip()
            if text.startswith("["):
                items = json.loads(text)
            else:
                items = [s for s in text.split(",") if s.strip()]
            return [parse_value(str(v), item_tp, path) for v in items]
        if origin in (typing.Union, types.UnionType):
            raise ValueError("union fields are not settable from the command line")
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot parse {raw!r} as {tp}: {err}") from None
    raise ConfigError(f"{path}: unsupported field type {tp}")


# ----------------------------------------------------------------------------------------------
# Validation and derived values


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{path}={value!r}: allowed values are {list(allowed)}")


GUARD_RING = 8  # steps of fault flags the non-finite guard keeps on the host (engine.loop.guard)


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


def _validate_model(cfg: Config) -> None:
    from engine.models.registry import get_variant

    m = cfg.model
    spec = get_variant(m.arch)
    _check(m.img_size >= 0, f"model.img_size={m.img_size}: 0 (the variant's {spec.img_size}) or a positive size")
    size = m.img_size or spec.img_size
    _check(size % spec.patch_size == 0,
           f"model.img_size={m.img_size}: must be a multiple of the patch size {spec.patch_size}")  # fmt: skip
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
    _check(d.global_batch > 0, f"data.global_batch={d.global_batch}: must be > 0")
    _check(d.micro_batch > 0, f"data.micro_batch={d.micro_batch}: must be > 0")
    _check(d.eval_batch >= 0, f"data.eval_batch={d.eval_batch}: 0 (= data.micro_batch) or a positive batch")
    _check(d.num_threads > 0, f"data.num_threads={d.num_threads}: must be > 0")
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
    peak = o.lr if o.lr > 0 else o.base_lr * cfg.data.global_batch / 256
    _check(0 <= s.min_lr <= peak, f"schedule.min_lr={s.min_lr}: must be in [0, the peak lr {peak:.3g}]")


def _validate_run(cfg: Config) -> None:
    _check(cfg.seed >= 0, f"seed={cfg.seed}: must be >= 0")
    _one_of("log.level", cfg.log.level, ("DEBUG", "INFO", "WARNING", "ERROR"))
    _one_of("log.progress", cfg.log.progress, ("auto", "on", "off"))
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
    _one_of("engine.compile_mode", e.compile_mode,
            ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))  # fmt: skip
    _check(e.peak_tflops >= 0, f"engine.peak_tflops={e.peak_tflops}: must be >= 0 (0 = look up the device)")


def _validate_pretrain(cfg: Config) -> None:
    from engine.models.registry import get_variant

    spec = get_variant(cfg.model.arch)
    ratio = cfg.mask.ratio
    _check(0.0 < ratio < 1.0, f"mask.ratio={ratio}: must be in the open interval (0, 1)")
    patches = ((cfg.model.img_size or spec.img_size) // spec.patch_size) ** 2
    kept = int(patches * (1 - ratio))
    _check(0 < kept < patches, f"mask.ratio={ratio}: keeps {kept} of {patches} patches; at least one patch must be "
           f"kept and one masked (allowed: {1 / patches:.4f} < ratio <= {1 - 1 / patches:.4f})")  # fmt: skip
    t = cfg.target
    _one_of("target.kind", t.kind, ("pixel", "mixed", "clip"))
    for w in t.weights:
        _check(w >= 0, f"target.weights={t.weights}: weights must be >= 0")
    _one_of("target.mix_space", t.mix_space, ("norm", "raw"))
    _one_of("target.generator_norm_pix", t.generator_norm_pix, ("auto", "true", "false"))
    _check(all(0.0 <= a <= 1.0 for a in t.mix_alphas), f"target.mix_alphas={t.mix_alphas}: each must be in [0, 1]")
    _check(t.feature_dim >= 0, f"target.feature_dim={t.feature_dim}: must be >= 0")
    if t.kind == "clip":
        _check(bool(t.teacher), "target.teacher: a CLIP weights file is required for target.kind=clip")
    if t.kind == "mixed":
        _check(bool(t.generator), "target.generator: an MAE checkpoint is required for target.kind=mixed")
        _check(
            t.mix_space == "raw" or t.norm_pix,
            "target.mix_space=norm mixes normalized pixels and needs target.norm_pix=true (or use mix_space=raw)",
        )


def _validate_finetune(cfg: Config) -> None:
    f = cfg.finetune
    _check(bool(cfg.data.val_shards), "data.val_shards: labeled validation shards are required for fine-tuning "
           "and probing (they are evaluated every epoch)")  # fmt: skip
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
    _check(ra == "" or ra.startswith("rand"), f"finetune.rand_augment={ra!r}: empty (off) or timm's form, e.g. "
           "'rand-m9-mstd0.5-inc1'")  # fmt: skip
    if f.mixup > 0 or f.cutmix > 0:
        _check(cfg.data.micro_batch % 2 == 0,
               f"data.micro_batch={cfg.data.micro_batch}: mixup/cutmix pair samples within a micro-batch, which must "
               "be even (or set finetune.mixup=0 finetune.cutmix=0)")  # fmt: skip
    if cfg.task == "linprobe":
        _check(f.freeze_encoder, "finetune.freeze_encoder: must be true for task=linprobe")


@dataclass(frozen=True)
class Derived:
    """Values computed from the config, the world size and the dataset size. Never written back."""

    world_size: int
    grad_accum: int
    lr: float
    micro_steps_per_epoch: int  # micro-batches each rank yields per epoch
    steps_per_epoch: int  # optimizer steps per epoch
    dropped_per_epoch: int  # samples left out of each epoch so all ranks take equal steps
    total_steps: int  # optimizer steps of the whole schedule
    warmup_steps: int
    stop_step: int  # where this run stops (max_steps or total_steps)


def derive(cfg: Config, world_size: int, num_samples: int) -> Derived:
    """The one place where batch arithmetic and schedule lengths are computed."""
    d = cfg.data
    _check(world_size > 0, f"world size {world_size}: must be > 0")
    per_step = d.micro_batch * world_size
    _check(
        d.global_batch % per_step == 0,
        f"data.global_batch={d.global_batch} is not divisible by data.micro_batch * world_size = "
        f"{d.micro_batch} * {world_size} = {per_step}; choose a global batch that is a multiple of {per_step}",
    )
    grad_accum = d.global_batch // per_step
    # Ranks read contiguous slices of sizes floor(N/W) or floor(N/W)+1 (DALI's split); every rank
    # takes the same number of whole optimizer steps, so the smallest slice decides.
    per_rank = num_samples // world_size
    steps_per_epoch = per_rank // (d.micro_batch * grad_accum)
    _check(
        steps_per_epoch > 0,
        f"data.global_batch={d.global_batch}: the dataset ({num_samples} samples over {world_size} ranks) "
        "is too small for one optimizer step per epoch",
    )
    micro = steps_per_epoch * grad_accum
    lr = cfg.optim.lr if cfg.optim.lr > 0 else cfg.optim.base_lr * d.global_batch / 256
    total = steps_per_epoch * cfg.schedule.epochs
    warmup = math.floor(steps_per_epoch * cfg.schedule.warmup_epochs)
    stop = min(total, cfg.schedule.max_steps) if cfg.schedule.max_steps > 0 else total
    return Derived(
        world_size=world_size,
        grad_accum=grad_accum,
        lr=lr,
        micro_steps_per_epoch=micro,
        steps_per_epoch=steps_per_epoch,
        dropped_per_epoch=num_samples - micro * d.micro_batch * world_size,
        total_steps=total,
        warmup_steps=warmup,
        stop_step=stop,
    )


# ----------------------------------------------------------------------------------------------
# Resuming with a changed config

# A checkpoint cannot be continued under these: the weights, the targets or the data would not mean
# what they meant.
INCOMPATIBLE = ("task", "model.arch", "model.img_size", "model.taps", "model.decoder_dim", "model.decoder_depth",
                "model.decoder_heads", "target.kind", "target.feature_dim")  # fmt: skip
# These only change bookkeeping, speed or logging: a resume with them changed is the same run.
HARMLESS_PREFIXES = ("log.", "checkpoint.", "engine.", "debug.", "preset", "run_dir", "data.num_threads",
                     "data.decode_device", "data.micro_batch", "data.loader", "model.fused_decoders",
                     "model.decoder_attention", "model.qkv_layout", "fault.", "data.eval_batch")  # fmt: skip


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_for_resume(saved: Config, now: Config) -> tuple[list[str], list[str], list[str]]:
    """(incompatible, training-changing, harmless) differences, each as 'field: old -> new'."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(now))
    errors, changes, harmless = [], [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        if key in INCOMPATIBLE:
            errors.append(line)
        elif key.startswith(HARMLESS_PREFIXES):
            harmless.append(line)
        else:
            changes.append(line)
    return errors, changes, harmless


def fingerprint(cfg: Config) -> str:
    """Hash of every field that shapes the training (all but the harmless ones)."""
    import hashlib

    flat = {k: v for k, v in _flatten(to_dict(cfg)).items() if not k.startswith(HARMLESS_PREFIXES)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def resolved(cfg: Config, derived: Derived | None = None, num_samples: int | None = None) -> dict[str, Any]:
    """What the user set (``config``) and, separately, what follows from it (``derived``): the
    values a preset leaves at 0 or empty (image size, taps, lr) and, when the world size and the
    dataset are known, the batch arithmetic and schedule lengths."""
    from engine.models.registry import get_variant

    spec = get_variant(cfg.model.arch)
    out: dict[str, Any] = {
        "img_size": cfg.model.img_size or spec.img_size,
        "patch_size": spec.patch_size,
        "lr": cfg.optim.lr if cfg.optim.lr > 0 else cfg.optim.base_lr * cfg.data.global_batch / 256,
    }
    if cfg.task == "pretrain":
        out["taps"] = list(cfg.model.taps) or list(spec.default_taps)
    if derived is not None:
        out.update(dataclasses.asdict(derived))
        if num_samples is not None:
            out["num_samples"] = num_samples
    return {"config": to_dict(cfg), "derived": out}
