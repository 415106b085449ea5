"""The run plan: every value that follows from the config, decided once.

``plan_run(cfg, world_size, num_samples)`` turns the config and its model variant (and, when
known, the world size and the number of usable samples) into a frozen ``RunPlan``: image size,
patch grid, taps, the absolute learning rate, batch arithmetic (micro-batch, accumulation),
steps per epoch, total and warm-up steps, the samples left out per epoch, model FLOPs per image
and an estimate of peak memory per GPU. Tasks, models, teachers, the loop and export read the plan;
nothing else recomputes a derived value.

A plan without the world size or the dataset is partial: ``missing`` says what could not be
derived and why. A combination that cannot run (a world size that cannot hold the global batch,
a dataset too small for one step) raises ``ConfigError`` with advice that keeps the recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.config.schema import Config
from engine.errors import ConfigError
from engine.models.flops import FlopCount, count_flops, num_kept, vit_forward_macs
from engine.models.memory import (
    MemoryEstimate,
    block_activation_bytes,
    decoder_params,
    estimate_memory,
    stack_activation_bytes,
    vit_params,
)
from engine.models.registry import VariantSpec, get_variant

# What a CLIP teacher is assumed to be when its file is not read (planning before launch): the
# released DeepMIM-CLIP teacher, OpenAI's ViT-B/16 visual tower.
CLIP_B16 = {"width": 768, "layers": 12, "patch": 16, "out_dim": 512}
# A feature teacher whose weights are not read: DINOv2's ViT-B/14 (timm 1.0 counts its parameters).
DINOV2_B14 = {"width": 768, "layers": 12, "patch": 14}
DINOV2_B14_COUNTS = {"prefix": 1, "params": 85_678_848, "block_params": 85_072_896}  # at 196 px
# An official MAE generator's decoder (mae_pretrain_vit_*_full.pth, mae_visualize_vit_*.pth).
MAE_DECODER = {"dim": 512, "depth": 8}
DEFAULT_BUCKET = 5e8  # DeepSpeed's reduce_bucket_size default, when the JSON does not set it
# A frozen block under no_grad holds its input, output and MLP hidden state at once (6 of the 16
# values per token and channel a trained block keeps).
FROZEN_BLOCK_SHARE = 6 / 16


@dataclass(frozen=True)
class TeacherShape:
    """A frozen teacher's architecture, read from its weights (or assumed when planning)."""

    kind: str  # clip | features | mixed
    width: int
    layers: int
    patch: int
    out_dim: int  # clip, features: feature width; mixed: the generator's pixel width
    img_size: int  # the size the teacher runs at
    decoder_dim: int = 0  # mixed: the generator's decoder
    decoder_depth: int = 0
    assumed: bool = False
    # features: counted from the built model (MLP ratios, SwiGLU and registers differ by family)
    prefix: int = 1  # class and register tokens
    params: int = 0
    block_params: int = 0


@dataclass(frozen=True)
class RunPlan:
    task: str
    arch: str
    img_size: int
    patch_size: int
    grid: int  # patches per side
    num_patches: int
    taps: tuple[int, ...]  # pretraining: 1-indexed blocks feeding a decoder; empty otherwise
    pred_dim: int  # what each decoder predicts per patch (pretraining); 0 otherwise
    lr: float  # absolute peak lr (base_lr x global batch / 256 unless optim.lr is set)
    global_batch: int
    micro_batch: int | None  # per rank per forward/backward (None: auto, decided with the world size)
    epochs: int
    flops: FlopCount
    trainable_params: int
    frozen_params: int
    teacher: TeacherShape | None = None
    world_size: int | None = None
    grad_accum: int | None = None
    num_samples: int | None = None
    micro_steps_per_epoch: int | None = None  # micro-batches every rank takes per epoch
    steps_per_epoch: int | None = None  # optimizer steps per epoch
    dropped_per_epoch: int | None = None  # samples left out of each epoch so all ranks take equal steps
    total_steps: int | None = None  # optimizer steps of the whole schedule
    warmup_steps: int | None = None
    stop_step: int | None = None  # where this run stops (schedule.max_steps or total_steps)
    memory: MemoryEstimate | None = None
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    _inputs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return self.stop_step is not None

    def require_complete(self) -> RunPlan:
        if not self.complete:
            raise ConfigError("the run plan is incomplete: " + "; ".join(self.missing))
        return self

    def with_teacher(self, teacher: TeacherShape) -> RunPlan:
        """The same plan with a teacher read from its weights (FLOPs and memory follow)."""
        return plan_run(teacher=teacher, **self._inputs)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["taps"] = list(self.taps)
        out["flops"] = {
            "gflop_per_image": round(self.flops.per_image / 1e9, 2),
            "shares": {k: round(v, 3) for k, v in self.flops.shares().items()},
        }
        out["memory"] = self.memory.as_dict() if self.memory is not None else None
        out["missing"], out["notes"] = list(self.missing), list(self.notes)
        return out


# ------------------------------------------------------------------------------------ model


def resolve_taps(cfg: Config, spec: VariantSpec) -> tuple[int, ...]:
    taps = list(cfg.model.taps) if cfg.model.taps else list(spec.default_taps)
    if sorted(set(taps)) != taps:
        raise ConfigError(f"model.taps={taps}: must be strictly increasing block numbers")
    if taps[0] < 1 or taps[-1] != spec.depth:
        raise ConfigError(
            f"model.taps={taps}: blocks are 1-indexed and the last tap must be the final block "
            f"({spec.depth} for {spec.name})"
        )
    if cfg.target.weights and len(cfg.target.weights) != len(taps):
        raise ConfigError(f"target.weights={cfg.target.weights}: {len(cfg.target.weights)} values for taps {taps}")
    return tuple(taps)


def _image_size(cfg: Config, spec: VariantSpec) -> int:
    size = cfg.model.img_size or spec.img_size
    if size % spec.patch_size:
        raise ConfigError(f"model.img_size={size}: must be a multiple of the patch size {spec.patch_size}")
    return size


def _check_mask(cfg: Config, patches: int) -> None:
    ratio, kept = cfg.mask.ratio, num_kept(patches, cfg.mask.ratio)
    if not 0 < kept < patches:
        raise ConfigError(
            f"mask.ratio={ratio}: keeps {kept} of {patches} patches; at least one patch must be kept and one "
            f"masked (allowed: {1 / patches:.4f} < ratio <= {1 - 1 / patches:.4f})"
        )


def assumed_teacher(cfg: Config, spec: VariantSpec, img_size: int) -> TeacherShape | None:
    """The teacher a plan assumes before its weights are read."""
    t = cfg.target
    if cfg.task != "pretrain" or t.kind == "pixel":
        return None
    grid = img_size // spec.patch_size
    if t.kind == "clip":
        c = CLIP_B16
        out = t.feature_dim or c["out_dim"]
        return TeacherShape("clip", c["width"], c["layers"], c["patch"], out, grid * c["patch"], assumed=True)
    if t.kind == "features":
        c = DINOV2_B14
        out = t.feature_dim or c["width"]
        return TeacherShape(
            "features", c["width"], c["layers"], c["patch"], out, grid * c["patch"], assumed=True, **DINOV2_B14_COUNTS
        )
    return TeacherShape(
        "mixed",
        spec.dim,
        spec.depth,
        spec.patch_size,
        3 * spec.patch_size**2,
        img_size,
        MAE_DECODER["dim"],
        MAE_DECODER["depth"],
        assumed=True,
    )


def _teacher_flops_and_params(teacher: TeacherShape, mask_ratio: float) -> tuple[float, int]:
    if teacher.kind == "features":
        return feature_teacher_macs(teacher), teacher.params
    if teacher.kind == "clip":
        length = (teacher.img_size // teacher.patch) ** 2
        macs = vit_forward_macs(length, teacher.patch, teacher.width, teacher.layers, length + 1, teacher.out_dim)
        params = vit_params(teacher.img_size, teacher.patch, teacher.width, teacher.layers)
        return macs, params + teacher.width * teacher.out_dim
    gen = count_flops(
        img_size=teacher.img_size,
        patch=teacher.patch,
        dim=teacher.width,
        depth=teacher.layers,
        num_decoders=1,
        decoder_dim=teacher.decoder_dim,
        decoder_depth=teacher.decoder_depth,
        pred_dim=teacher.out_dim,
        mask_ratio=mask_ratio,
    )
    params = vit_params(teacher.img_size, teacher.patch, teacher.width, teacher.layers) + decoder_params(
        teacher.width, teacher.decoder_dim, teacher.decoder_depth, teacher.out_dim
    )
    return gen.encoder_macs + gen.decoder_macs, params


def feature_teacher_macs(t: TeacherShape) -> float:
    """One forward of a feature teacher on the full image: every block weight once per token, the
    attention's two [seq, seq] products, the patch embedding and (when used) the head on every token."""
    length = (t.img_size // t.patch) ** 2
    seq = length + t.prefix
    blocks = seq * t.block_params + t.layers * 2 * seq * seq * t.width
    head = length * t.width * t.out_dim if t.out_dim != t.width else 0
    return blocks + length * 3 * t.patch * t.patch * t.width + head


def _pretrain_shapes(
    cfg: Config, spec: VariantSpec, img: int, taps: tuple[int, ...], pred: int, teacher: TeacherShape | None
) -> tuple[FlopCount, int, int, float, float]:
    """(FLOPs, trainable params, frozen params, activation bytes per image, teacher working set)."""
    m, e = cfg.model, cfg.engine
    length = (img // spec.patch_size) ** 2
    visible = num_kept(length, cfg.mask.ratio) + 1
    flops = count_flops(
        img_size=img,
        patch=spec.patch_size,
        dim=spec.dim,
        depth=spec.depth,
        num_decoders=len(taps),
        decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth,
        pred_dim=pred,
        mask_ratio=cfg.mask.ratio,
    )
    frozen, transient = 0, 0.0
    if teacher is not None:
        t_macs, frozen = _teacher_flops_and_params(teacher, cfg.mask.ratio)
        flops = FlopCount(flops.encoder_macs, flops.decoder_macs, t_macs)
        t_tokens = (teacher.img_size // teacher.patch) ** 2 + teacher.prefix
        transient = block_activation_bytes(t_tokens, teacher.width) * FROZEN_BLOCK_SHARE
    seq = length + 1
    decoders = len(taps) * decoder_params(spec.dim, m.decoder_dim, m.decoder_depth, pred) + seq * m.decoder_dim
    trainable = vit_params(img, spec.patch_size, spec.dim, spec.depth, spec.mlp_ratio) + decoders  # (+ shared pos)
    acts = 2.0 * 3 * img * img + 2.0 * 2 * length * spec.dim  # input image and patch embedding (+ gather)
    acts += stack_activation_bytes(spec.depth, visible, spec.dim, e.act_ckpt_encoder)
    per_decoder = 2.0 * 2 * seq * m.decoder_dim + stack_activation_bytes(
        m.decoder_depth, seq, m.decoder_dim, e.act_ckpt_decoder
    )
    acts += len(taps) * per_decoder
    acts += 4.0 * 3 * len(taps) * length * pred + 4.0 * length * pred  # fp32 predictions, loss work, target
    return flops, trainable, frozen, acts, transient


def _classifier_shapes(cfg: Config, spec: VariantSpec, img: int, num_classes: int) -> tuple[FlopCount, int, int, float]:
    length = (img // spec.patch_size) ** 2
    enc = vit_forward_macs(length, spec.patch_size, spec.dim, spec.depth, length + 1)
    params = vit_params(img, spec.patch_size, spec.dim, spec.depth, spec.mlp_ratio)
    head = spec.dim * num_classes
    if cfg.finetune.freeze_encoder:  # the frozen encoder runs forward only, like a teacher
        return FlopCount(head, 0.0, enc), head + num_classes, params, 2.0 * spec.dim
    acts = 2.0 * 3 * img * img + stack_activation_bytes(spec.depth, length + 1, spec.dim, cfg.engine.act_ckpt_encoder)
    return FlopCount(enc + head, 0.0, 0.0), params + head + num_classes, 0, acts


# ------------------------------------------------------------------------------------ batches


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _needs_even(cfg: Config) -> bool:
    """Mixup/cutmix pair samples within a micro-batch."""
    return cfg.task != "pretrain" and (cfg.finetune.mixup > 0 or cfg.finetune.cutmix > 0)


def auto_micro_batch(per_rank: int, cap: int, even: bool) -> int | None:
    """The largest divisor of the per-rank batch that is at most ``cap`` (and even when asked)."""
    fits = [m for m in _divisors(per_rank) if m <= cap and (m % 2 == 0 or not even)]
    return max(fits) if fits else None


def batch_advice(global_batch: int, micro: int, world: int, base_lr: float, lr_fixed: bool) -> str:
    """How to make ``global_batch`` fit ``world`` ranks without breaking the recipe."""
    if global_batch % world == 0:
        fits = [m for m in _divisors(global_batch // world) if m <= micro]
        m = max(fits)
        return (
            f"data.micro_batch={m} (or 0, auto) keeps the global batch {global_batch} with accumulation "
            f"{global_batch // (m * world)}; the recipe is unchanged"
        )
    lo, hi = (global_batch // world) * world, (global_batch // world + 1) * world

    def what(g: int) -> str:
        if lr_fixed:
            return f"data.global_batch={g} (optim.lr is fixed: the lr per sample changes)"
        return f"data.global_batch={g} (lr {base_lr * g / 256:.4g} instead of {base_lr * global_batch / 256:.4g})"

    options = " or ".join(what(g) for g in (lo, hi) if g > 0)
    worlds = [w for w in _divisors(global_batch) if w <= 4 * world]
    near = sorted(sorted(worlds, key=lambda w: abs(w - world))[:3])
    return (
        f"{world} ranks cannot share {global_batch} samples per step evenly; the nearest global batches are "
        f"{options}; or keep the recipe on {', '.join(map(str, near))} ranks"
    )


def _batches(cfg: Config, world: int, samples: int | None) -> dict[str, int]:
    d = cfg.data
    if world <= 0:
        raise ConfigError(f"world size {world}: must be > 0")
    lr_fixed = cfg.optim.lr > 0
    if d.global_batch % world:
        raise ConfigError(
            f"data.global_batch={d.global_batch} on {world} ranks: not a multiple of the world size. "
            + batch_advice(d.global_batch, d.micro_batch or d.max_micro_batch, world, cfg.optim.base_lr, lr_fixed)
        )
    per_rank = d.global_batch // world
    micro = d.micro_batch or auto_micro_batch(per_rank, d.max_micro_batch, _needs_even(cfg))
    if micro is None:
        raise ConfigError(
            f"data.max_micro_batch={d.max_micro_batch}: no even micro-batch up to it divides the per-rank batch "
            f"{per_rank} (mixup/cutmix need an even one); set data.micro_batch explicitly or change the global batch"
        )
    if per_rank % micro:
        raise ConfigError(
            f"data.global_batch={d.global_batch} with data.micro_batch={micro} on {world} ranks: the per-rank batch "
            f"{per_rank} is not a multiple of {micro}. "
            + batch_advice(d.global_batch, micro, world, cfg.optim.base_lr, lr_fixed)
        )
    if _needs_even(cfg) and micro % 2:
        raise ConfigError(
            f"data.micro_batch={micro}: mixup/cutmix pair samples within a micro-batch, which must be even (or set "
            "finetune.mixup=0 finetune.cutmix=0)"
        )
    out = {"micro_batch": micro, "grad_accum": per_rank // micro}
    if samples is None:
        return out
    # Ranks read slices of floor(N/W) or floor(N/W)+1 samples; every rank takes the same number of
    # whole optimizer steps, so the smallest slice decides.
    steps = (samples // world) // per_rank
    if steps <= 0:
        raise ConfigError(
            f"data.global_batch={d.global_batch}: the dataset ({samples} usable samples over {world} ranks) is too "
            f"small for one optimizer step per epoch; use a global batch of at most {samples // world * world} or "
            "more data"
        )
    s = cfg.schedule
    total = steps * s.epochs
    out.update(
        micro_steps_per_epoch=steps * out["grad_accum"],
        steps_per_epoch=steps,
        dropped_per_epoch=samples - steps * d.global_batch,
        total_steps=total,
        warmup_steps=math.floor(steps * s.warmup_epochs),
        stop_step=min(total, s.max_steps) if s.max_steps > 0 else total,
    )
    return out


def _bucket_elems(cfg: Config) -> float:
    from engine.config.paths import resolve_repo_path

    try:
        ds = json.loads(Path(resolve_repo_path(cfg.engine.ds_config)).read_text())
        return float(ds.get("zero_optimization", {}).get("reduce_bucket_size", DEFAULT_BUCKET))
    except (OSError, ValueError):
        return DEFAULT_BUCKET


# ------------------------------------------------------------------------------------ the plan


def plan_run(
    cfg: Config,
    world_size: int | None = None,
    num_samples: int | None = None,
    num_classes: int | None = None,
    teacher: TeacherShape | None = None,
) -> RunPlan:
    """The run plan for ``cfg``; partial without ``world_size`` / ``num_samples``."""
    inputs = {"cfg": cfg, "world_size": world_size, "num_samples": num_samples, "num_classes": num_classes}
    spec = get_variant(cfg.model.arch)
    img = _image_size(cfg, spec)
    grid = img // spec.patch_size
    patches = grid * grid
    lr = cfg.optim.lr if cfg.optim.lr > 0 else cfg.optim.base_lr * cfg.data.global_batch / 256
    if cfg.schedule.min_lr > lr:
        raise ConfigError(f"schedule.min_lr={cfg.schedule.min_lr}: must be in [0, the peak lr {lr:.3g}]")
    notes, missing = [], []
    if cfg.task == "pretrain":
        _check_mask(cfg, patches)
        taps = resolve_taps(cfg, spec)
        teacher = teacher or assumed_teacher(cfg, spec, img)
        if cfg.target.kind in ("clip", "features"):
            pred = teacher.out_dim
            if teacher.assumed:
                which = (
                    "the CLIP teacher is assumed to be OpenAI's ViT-B/16"
                    if cfg.target.kind == "clip"
                    else ("the feature teacher is assumed to be DINOv2's ViT-B/14")
                )
                notes.append(f"{which} ({pred}-d features) until its weights are read")
        else:
            pred = 3 * spec.patch_size**2
            if teacher is not None and teacher.assumed:
                notes.append("the MAE generator is assumed to have MAE's 8x512 decoder until its weights are read")
        flops, trainable, frozen, per_image, transient = _pretrain_shapes(cfg, spec, img, taps, pred, teacher)
    else:
        taps, pred, teacher, transient = (), 0, None, 0.0
        classes = num_classes or cfg.finetune.num_classes
        if not classes:
            classes = 1000
            notes.append("FLOPs and memory assume 1000 classes until the training shards are read")
        flops, trainable, frozen, per_image = _classifier_shapes(cfg, spec, img, classes)
    plan: dict[str, Any] = {"micro_batch": cfg.data.micro_batch or None}
    memory = None
    if world_size is None:
        missing.append("batch arithmetic and memory need the world size (--world-size N)")
    else:
        plan.update(world_size=world_size, **_batches(cfg, world_size, num_samples))
        memory = estimate_memory(
            trainable=trainable,
            frozen=frozen,
            world_size=world_size,
            micro_batch=plan["micro_batch"],
            per_image_bytes=per_image,
            bucket_elems=_bucket_elems(cfg),
            frozen_transient_bytes=transient,
            async_save=cfg.checkpoint.async_save,
        )
    if num_samples is None:
        missing.append(f"steps per epoch and schedule lengths need the shards (data.shards={cfg.data.shards!r})")
    else:
        plan["num_samples"] = num_samples
    return RunPlan(
        task=cfg.task,
        arch=spec.name,
        img_size=img,
        patch_size=spec.patch_size,
        grid=grid,
        num_patches=patches,
        taps=taps,
        pred_dim=pred,
        lr=lr,
        global_batch=cfg.data.global_batch,
        epochs=cfg.schedule.epochs,
        flops=flops,
        trainable_params=trainable,
        frozen_params=frozen,
        teacher=teacher,
        memory=memory,
        missing=tuple(missing),
        notes=tuple(notes),
        _inputs=inputs,
        **plan,
    )
