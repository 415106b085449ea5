"""The fine-tuned model: a plain timm ``VisionTransformer`` built from a registry variant.

Fine-tuning (DeepMIM's and MAE's recipe): global average pooling of the patch tokens with a new
``fc_norm``; the pretrained final ``norm`` has no place in that model and is dropped; the new head
is initialized with a truncated normal of std 2e-5. Linear probing (MAE's): the cls token after
the pretrained ``norm``, a BatchNorm without affine parameters before the head (std 0.01), and a
frozen encoder. Loading names every key it drops or adds; any other mismatch is an error.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.errors import ConfigError
from engine.models.registry import get_variant

if TYPE_CHECKING:
    from engine.config import Config, RunPlan

log = logging.getLogger(__name__)

NEW_KEYS = ("fc_norm.", "head.")  # keys a pretrained encoder never has


def timm_args(cfg: Config, plan: RunPlan, num_classes: int) -> tuple[str, dict]:
    """timm model name and keyword arguments of the classifier (what export.json records)."""
    spec = get_variant(plan.arch)
    kwargs = dict(spec.timm_kwargs)
    if plan.img_size != spec.img_size:
        kwargs["img_size"] = plan.img_size
    kwargs.update(num_classes=num_classes, global_pool=cfg.finetune.global_pool)
    return spec.timm_name, kwargs


class ProbeHead(nn.Sequential):
    """BatchNorm1d without affine parameters, then the linear head (MAE's linear probe). The norm
    keeps its statistics in float32 whatever the engine's dtype: bf16 running means would blur."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[0](x.float())
        return self[1](y.to(self[1].weight.dtype))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent plain linear head in eval mode: weight [C, D], bias [C] (float32)."""
        bn, fc = self[0], self[1]
        inv = torch.rsqrt(bn.running_var.float() + bn.eps)
        w = fc.weight.float() * inv[None, :]
        return w, fc.bias.float() - w @ bn.running_mean.float()


def build_classifier(cfg: Config, plan: RunPlan, num_classes: int) -> nn.Module:
    import timm

    f = cfg.finetune
    name, kwargs = timm_args(cfg, plan, num_classes)
    model = timm.create_model(name, pretrained=False, drop_path_rate=f.drop_path, **kwargs)
    head = model.head
    nn.init.trunc_normal_(head.weight, std=f.head_init_std)
    nn.init.zeros_(head.bias)
    if f.head_norm == "batchnorm":
        probe = ProbeHead(head.in_features, num_classes)
        probe[1].load_state_dict(head.state_dict())
        model.head = probe
    if f.freeze_encoder:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
    return model


def check_encoder_fits(shape, plan: RunPlan, what: str) -> None:
    """An encoder read from a file must be the plan's variant (width, depth, patch); another image
    size is fine (the position embedding is resampled)."""
    spec = get_variant(plan.arch)
    if (shape.width, shape.depth, shape.patch) != (spec.dim, spec.depth, spec.patch_size):
        raise ConfigError(
            f"{what} holds a {shape.describe()}; model.arch={spec.name} is a ViT width {spec.dim}, {spec.depth} "
            f"blocks, patch {spec.patch_size}: use a preset of that size (or another file)"
        )


def load_encoder(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, list[str]]:
    """Pretrained encoder weights (timm layout) into the classifier. Returns the keys dropped (in the
    weights, not in the model: the final norm under average pooling) and new (in the model, not in
    the weights: fc_norm, head). Anything else that does not match is an error naming the keys."""
    from timm.layers import resample_abs_pos_embed

    ours = model.state_dict()
    state = dict(state)
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != ours["pos_embed"].shape:  # another image size: resample the grid
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(pe, list(grid), num_prefix_tokens=1)
        old = round((pe.shape[1] - 1) ** 0.5)
        log.info(
            "%s: the encoder was pretrained on a %dx%d patch grid; its position embedding is resampled (bicubic, as "
            "MAE does) to this run's %dx%d grid",
            what,
            old,
            old,
            grid[0],
            grid[1],
        )
    new = sorted(k for k in ours if k not in state)
    dropped = sorted(k for k in state if k not in ours)
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(ours[k].shape)}"
        for k in state
        if k in ours and state[k].shape != ours[k].shape
    ]
    bad_new = [k for k in new if not k.startswith(NEW_KEYS)]
    bad_dropped = [k for k in dropped if not k.startswith("norm.")]
    if bad_new or bad_dropped or wrong:
        raise ConfigError(
            f"{what} does not fit {type(model).__name__}: missing {bad_new[:6]}, unexpected {bad_dropped[:6]}, "
            f"wrong shape {wrong[:6]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=False)
    return {"dropped": dropped, "new": new}


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a plain timm classifier (a probe head folded into one linear layer)."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    if isinstance(model.head, ProbeHead):
        w, b = model.head.folded()
    else:
        w, b = model.head.weight.detach().float(), model.head.bias.detach().float()
    state.update({"head.weight": w.contiguous(), "head.bias": b.contiguous()})
    return state
