"""Masked image modeling with deep supervision (DeepMIM; plain MAE with one tap).

Owns the mask (one per sample, shared by every decoder), the targets (normalized pixels, the
mixed target of a frozen MAE generator, or a frozen CLIP teacher's features), the encoder with
its decoder stack, and the reconstruction figures. Everything else is the loop's.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from engine.errors import CheckpointError, TeacherError
from engine.loop.task import AugmentSpec, StepOutput, Task, TaskContext, Timer
from engine.models.compile import try_compile
from engine.models.mim import DeepMIM, build_model, random_masking
from engine.models.param_groups import weight_decay_groups
from engine.targets.kinds import build_target

log = logging.getLogger(__name__)


class PretrainTask(Task):
    name = "pretrain"

    def __init__(self) -> None:
        super().__init__()
        self.target: Any = None
        self.target_ref: dict = {}
        self.img_size = 0
        self.mask_gen: torch.Generator | None = None
        self.dtype = torch.float32

    def setup(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        # Targets first: a teacher's width decides the decoders' prediction width.
        generator = self._frozen_generator() if cfg.target.kind == "mixed" else None
        self.target, self.target_ref, teacher = build_target(cfg, ctx.plan, generator)
        if teacher is not None:
            self.ctx = dataclasses.replace(ctx, plan=ctx.plan.with_teacher(teacher))
            log.info(
                "target %s from %s (sha256 %s...)",
                self.target_ref["kind"],
                self.target_ref["path"],
                self.target_ref["sha256"][:12],
            )
        plan = self.plan
        self.img_size = plan.img_size
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.module: DeepMIM = build_model(cfg, plan)
        if cfg.engine.fp8:
            from engine.models.fp8 import convert_encoder_to_fp8

            convert_encoder_to_fp8(self.module)
        self.metric_names = tuple(f"loss_tap{t}" for t in self.module.taps)
        n_params = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        log.info("model %s taps %s: %.2fM trainable parameters", cfg.model.arch, self.module.taps, n_params / 1e6)
        self.mask_gen = torch.Generator(device=ctx.dist.device)
        self.mask_gen.manual_seed(cfg.seed * 1_000_003 + 7 * ctx.dist.rank + 1)
        self.dtype = torch.float32

    def _frozen_generator(self) -> str | None:
        """A mixed-target run keeps the generator checkpoint it started with: the first start copies
        it into RUN_DIR/teacher/generator.pt (when it is one of our runs, which move on), later
        starts use that copy, so continuing or pruning the MAE run never changes this run's targets."""
        from engine.loop.dist import barrier
        from engine.targets.teachers import snapshot_generator
        from engine.weights.safe_load import safe_load

        snap = self.ctx.run_dir / "teacher" / "generator.pt"
        given = str(Path(self.cfg.target.generator).resolve())
        if not snap.is_file() and self.ctx.dist.is_main:
            snapshot_generator(self.cfg.target.generator, snap)
        barrier()
        if not snap.is_file():
            return None  # an official MAE file: used as it is
        info = safe_load(snap).get("snapshot", {})
        if info.get("given") != given:
            raise TeacherError(
                f"this run's generator is the snapshot of {info.get('given')} (step {info.get('step')}) in {snap}; "
                f"target.generator now names {given}: start a new run folder, or remove the snapshot knowingly"
            )
        log.info("generator: this run's snapshot of %s at step %s (%s)", info["given"], info["step"], snap)
        return str(snap)

    # ------------------------------------------------------------------ build
    def param_groups(self) -> list[dict]:
        return weight_decay_groups(self.module, self.cfg.optim.weight_decay)

    def augment(self) -> AugmentSpec:
        d = self.cfg.data
        return AugmentSpec(
            self.img_size, (d.crop_scale[0], d.crop_scale[1]), (d.crop_ratio[0], d.crop_ratio[1]), flip_prob=d.flip_prob
        )

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype
        teacher = getattr(self.target, "module", None)
        if teacher is not None:  # frozen, outside the optimizer and ZeRO; same device, engine dtype
            teacher.to(device, dtype)

    def compile(self, engine, dtype: torch.dtype) -> tuple[bool, str]:
        """Regional torch.compile of student and teacher blocks, probed on a batch of the real shape."""
        e, n, dev = self.cfg.engine, self.plan.micro_batch, self.ctx.dist.device
        imgs = torch.randn(n, 3, self.img_size, self.img_size, device=dev, dtype=dtype, requires_grad=True)
        gen = torch.Generator(dev).manual_seed(0)
        masks = random_masking(n, self.module.num_patches, self.cfg.mask.ratio, gen, dev)
        teacher = getattr(self.target, "module", None)
        modules = [self.module] + ([teacher] if teacher is not None else [])

        def step() -> torch.Tensor:
            targets = self.target(imgs.detach().float(), masks)
            return self.module(imgs, masks, targets)[0]

        return try_compile(modules, e.compile_backend, e.compile_mode, step, imgs)

    # ------------------------------------------------------------------ step
    def forward(self, engine: Any, batch: Any, timer: Timer) -> StepOutput:
        """Mask, targets (a frozen teacher runs here), then the student's forward and losses."""
        imgs = batch.img
        n = imgs.shape[0]
        masks = random_masking(n, self.module.num_patches, self.cfg.mask.ratio, self.mask_gen, imgs.device)
        if getattr(self.target, "module", None) is None:  # pixels: no teacher to time
            targets = self.target(imgs, masks)
        else:
            timer.start("teacher")
            targets = self.target(imgs, masks)
            timer.stop("teacher")
        loss, taps, _ = engine(imgs.to(self.dtype), masks, targets)
        return StepOutput(loss, taps.detach())

    # ------------------------------------------------------------------ state and checks
    def reference(self) -> dict:
        return {"target": self.target_ref}

    def check_resume(self, marker: dict) -> None:
        saved, now = marker.get("target"), self.target_ref
        if saved is not None and saved.get("sha256") != now.get("sha256"):
            raise CheckpointError(
                f"cannot resume: the {now['kind']} teacher changed (checkpoint: {saved.get('path')} sha256 "
                f"{str(saved.get('sha256'))[:12]}; now: {now.get('path')} sha256 {str(now.get('sha256'))[:12]})"
            )

    def state_dict(self) -> dict:
        return {"mask_gen": self.mask_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "mask_gen" in state:
            self.mask_gen.set_state(state["mask_gen"])

    # ------------------------------------------------------------------ figures
    def figure(self, engine, path: Path, count: int = 6) -> bool:
        """Reconstructions (pixel, mixed) or similarity maps (CLIP) of one center-cropped image of
        each of the first classes; rank 0 only, no collectives (ZeRO-2 keeps full weights per rank)."""
        from data_pipeline.dataset.locations import remote_spec
        from data_pipeline.loaders.eval_reader import center_crop, iter_raw
        from engine.observe.reconstructions import save_reconstructions

        picked, seen = [], set()
        for _, label, data in iter_raw(self.cfg.data.shards, remote_spec(self.cfg.data)):
            if label not in seen:
                seen.add(label)
                picked.append(center_crop(data, self.img_size))
            if len(picked) == count:
                break
        imgs = torch.stack(picked).to(self.ctx.dist.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        c = self.cfg
        save_reconstructions(self.module, imgs, c.mask.ratio, c.target.norm_pix, path, c.seed, self.target)
        return True
