"""Reconstruction targets, computed without gradients inside the training step.

A target object maps the augmented batch (and the shared mask) to a tensor the decoders are
trained against: [1, N, L, P] when every decoder shares it, [T, N, L, P] when each tap has its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.errors import TeacherError
from engine.models.mim import MaskState, patchify

if TYPE_CHECKING:
    from engine.config import Config, RunPlan


def normalized_pixel_target(imgs: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """imgs: [N, 3, H, W] -> [N, L, P] float32; per patch (x - mean) / sqrt(var + 1e-6) as in MAE.

    MAE uses the unbiased variance (``Tensor.var``'s default); we keep it to match its numbers.
    """
    target = patchify(imgs.float(), p)
    return patch_normalize(target) if norm_pix else target


class PixelTarget:
    """MAE's (normalized) pixel target, shared by every decoder."""

    kind = "pixel"

    def __init__(self, patch_size: int, norm_pix: bool = True):
        self.patch_size = patch_size
        self.norm_pix = norm_pix

    @torch.no_grad()
    def __call__(self, imgs: torch.Tensor, masks: MaskState) -> torch.Tensor:
        return normalized_pixel_target(imgs, self.patch_size, self.norm_pix)[None]


def patch_normalize(x: torch.Tensor) -> torch.Tensor:
    """[..., P] -> per-patch (x - mean) / sqrt(var + 1e-6), MAE's normalization."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + 1.0e-6) ** 0.5


def progressive_alphas(num_taps: int) -> list[float]:
    """a_k evenly from 0 (first tap) to 1 (final decoder): 0, 1/3, 2/3, 1 for four taps."""
    if num_taps == 1:
        return [1.0]
    return [k / (num_taps - 1) for k in range(num_taps)]


class MixedTarget:
    """DeepMIM's mixed target: tap k learns ``a_k * x + (1 - a_k) * x_hat``, with x_hat the frozen
    MAE generator's reconstruction from the same visible patches (same mask, same ids_restore).

    Mixing space:
    * ``norm`` (default): x and x_hat both as per-patch normalized pixels. The student's loss lives
      in that space, so a_k is exactly an interpolation of the loss target: a=1 is MAE's target,
      a=0 the generator's prediction, at a comparable scale on every patch. A generator trained
      without norm-pix has its output normalized with its own patch statistics.
    * ``raw``: x and x_hat as pixels (a norm-pix generator's output is mapped back with the true
      patch mean and variance, as in MAE's visualization); the mix is normalized afterwards when
      the student uses norm-pix. Re-normalizing a blend rescales it non-linearly per patch, which
      is why it is not the default.
    """

    kind = "mixed"

    def __init__(
        self,
        generator: torch.nn.Module,
        generator_norm_pix: bool,
        alphas: list[float],
        patch_size: int,
        norm_pix: bool,
        mix_space: str,
    ):
        self.module = generator
        self.generator_norm_pix = generator_norm_pix
        self.alphas = torch.tensor(alphas, dtype=torch.float32).view(-1, 1, 1, 1)
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.mix_space = mix_space

    @torch.no_grad()
    def generate(self, imgs: torch.Tensor, masks: MaskState) -> torch.Tensor:
        """The generator's reconstruction [N, L, P] (float32) in its own target space."""
        dtype = next(self.module.parameters()).dtype
        return self.module.predict(imgs.to(dtype), masks)[0].float()

    @torch.no_grad()
    def mix(self, imgs: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """imgs: [N, 3, H, W], x_hat: [N, L, P] -> targets [T, N, L, P] (float32)."""
        raw = patchify(imgs.float(), self.patch_size)
        a = self.alphas.to(raw.device)
        if self.mix_space == "norm":
            x = patch_normalize(raw)
            xh = x_hat if self.generator_norm_pix else patch_normalize(x_hat)
            return a * x[None] + (1.0 - a) * xh[None]
        if self.generator_norm_pix:
            mean, var = raw.mean(dim=-1, keepdim=True), raw.var(dim=-1, keepdim=True)
            x_hat = x_hat * (var + 1.0e-6) ** 0.5 + mean
        mixed = a * raw[None] + (1.0 - a) * x_hat[None]
        return patch_normalize(mixed) if self.norm_pix else mixed

    def __call__(self, imgs: torch.Tensor, masks: MaskState) -> torch.Tensor:
        return self.mix(imgs, self.generate(imgs, masks))


class FeatureTarget:
    """DeepMIM-CLIP and feature distillation: per-patch features of a frozen teacher (a CLIP tower,
    DINOv2, EVA-02, SigLIP, any timm ViT) on the unmasked crop, shared by every decoder."""

    def __init__(self, teacher: torch.nn.Module, kind: str = "features"):
        self.module = teacher
        self.kind = kind

    @torch.no_grad()
    def __call__(self, imgs: torch.Tensor, masks: MaskState) -> torch.Tensor:
        dtype = next(self.module.parameters()).dtype
        return self.module(imgs.to(dtype))[None]  # [1, N, L, C]


def feature_target(cfg: Config, plan: RunPlan):
    """The clip or features target of ``cfg``: (target, reference for checkpoints, teacher shape)."""
    from pathlib import Path

    from data_pipeline.dataset.hashing import sha256_file
    from engine.config import TeacherShape
    from engine.targets.timm_teachers import load_feature_teacher, teacher_stats

    t = cfg.target
    teacher, src = load_feature_teacher(t.teacher, t.teacher_arch, plan.grid, t.kind == "clip" or t.teacher_head)
    if t.feature_dim and t.feature_dim != teacher.out_dim:
        raise TeacherError(
            f"target.feature_dim={t.feature_dim} but the teacher {t.teacher} produces {teacher.out_dim}-d "
            "features; the decoders must predict the teacher's width"
        )
    st = teacher_stats(teacher)
    ref = {
        "kind": t.kind,
        "path": str(Path(t.teacher).resolve()),
        "sha256": sha256_file(src.weights),
        "arch": src.describe(),
        "width": st["width"],
        "layers": st["layers"],
        "patch": st["patch"],
        "out_dim": teacher.out_dim,
        "img_size": teacher.input_size,
        "mean": list(teacher.mean),
        "std": list(teacher.std),
    }
    shape = TeacherShape(
        t.kind,
        st["width"],
        st["layers"],
        st["patch"],
        teacher.out_dim,
        teacher.input_size,
        prefix=st["prefix"],
        params=st["params"],
        block_params=st["block_params"],
    )
    return FeatureTarget(teacher, t.kind), ref, shape


def build_target(cfg: Config, plan: RunPlan, generator: str | None = None):
    """The configured target, a reference for checkpoints, and the teacher's shape as read from
    its weights (None for pixels).

    Teachers are loaded on the CPU in float32 here; the trainer moves them to the device and
    the engine's dtype. All teacher problems surface now, before any training. ``generator``
    overrides ``target.generator`` (the run's frozen snapshot of it).
    """
    from pathlib import Path

    from data_pipeline.dataset.hashing import sha256_file
    from engine.config import TeacherShape
    from engine.targets.teachers import load_generator

    t = cfg.target
    p = plan.patch_size
    num_taps = len(plan.taps)
    if t.kind == "pixel":
        return PixelTarget(p, t.norm_pix), {"kind": "pixel"}, None
    if t.kind in ("clip", "features"):
        return feature_target(cfg, plan)
    gen = load_generator(generator or t.generator, plan.img_size)
    if gen.model.patch_size != p:
        raise TeacherError(f"generator {gen.source}: patch size {gen.model.patch_size} differs from the student's {p}")
    if t.generator_norm_pix == "auto":
        if gen.norm_pix is None:
            raise TeacherError(
                f"generator {gen.source}: an official MAE file does not record its target; set "
                "target.generator_norm_pix=true (mae_pretrain_vit_*_full.pth) or false (mae_visualize_vit_*.pth)"
            )
        gen_norm = gen.norm_pix
    else:
        gen_norm = t.generator_norm_pix == "true"
        if gen.norm_pix is not None and gen.norm_pix != gen_norm:
            raise TeacherError(
                f"target.generator_norm_pix={t.generator_norm_pix} but {gen.source} was trained with "
                f"target.norm_pix={gen.norm_pix}"
            )
    alphas = list(t.mix_alphas) or progressive_alphas(num_taps)
    if len(alphas) != num_taps:
        raise TeacherError(f"target.mix_alphas has {len(alphas)} values for {num_taps} taps")
    ref = {
        "kind": "mixed",
        "path": str(Path(gen.source).resolve()),
        "sha256": sha256_file(gen.source),
        "generator_norm_pix": gen_norm,
        "alphas": alphas,
        "mix_space": t.mix_space,
    }
    m = gen.model
    shape = TeacherShape(
        "mixed",
        m.spec.dim,
        m.spec.depth,
        p,
        3 * p * p,
        plan.img_size,
        m.decoders.embed.weight.shape[1],
        len(m.decoders.blocks),
    )
    return MixedTarget(m, gen_norm, alphas, p, t.norm_pix, t.mix_space), ref, shape
