"""DeepMIM: a masked ViT encoder whose intermediate blocks each feed an independent decoder.

Shape legend (used in every docstring of the model code):
    N  batch size                    L  patches per image (196 for /16 at 224)
    K  kept (visible) patches        S  decoder sequence length, 1 + L (cls first)
    D  encoder width                 E  decoder width
    T  number of taps (decoders)     P  prediction width (3 * p * p for pixels)
    H, W image height and width      p  patch size

The encoder is built from timm's ``Block`` and keeps timm's ``VisionTransformer`` attribute
names (cls_token, pos_embed, patch_embed, blocks, norm), so its state dict loads into
``timm.create_model(..., num_classes=0)`` as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.errors import ConfigError
from engine.models.decoders import DecoderStack
from engine.models.flops import num_kept
from engine.models.losses import LOSSES
from engine.models.registry import VariantSpec, get_variant

if TYPE_CHECKING:
    from engine.config import Config, RunPlan

# ----------------------------------------------------------------------------------------------
# Small pure functions


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: [N, 3, H, W] -> [N, L, p*p*3], patches in row-major order, pixels (p, q, c) inside."""
    n, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    """x: [N, L, p*p*c] -> [N, c, H, W]; the inverse of ``patchify`` for square grids."""
    n, length, _ = x.shape
    g = round(math.sqrt(length))
    if g * g != length:
        raise ValueError(f"unpatchify needs a square grid, got L={length}")
    x = x.reshape(n, g, g, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, g * p, g * p)


@dataclass
class MaskState:
    """One mask per sample, shared by every decoder (and by a mixed-target generator).

    ids_keep:    [N, K] patch indices the encoder sees, in shuffled order
    ids_restore: [N, L] position of each patch in the (kept + masked) shuffled sequence
    mask:        [N, L] 1.0 where the patch is masked, 0.0 where it is visible
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def random_masking(
    n: int, num_patches: int, ratio: float, generator: torch.Generator, device: torch.device | str
) -> MaskState:
    """MAE masking: argsort of uniform noise per sample; the K lowest-noise patches are kept.

    The noise comes from an explicit generator so masks are reproducible and checkpointable.
    """
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"mask.ratio={ratio}: must be in the open interval (0, 1)")
    keep = num_kept(num_patches, ratio)
    noise = torch.rand(n, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return MaskState(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE's): [grid*grid (+1), dim], a zero row for cls.

    Half of the channels encode the row coordinate, half the column; computed in float64.
    """
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs dim % 4 == 0, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")  # MAE puts w first
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([encode(gw), encode(gh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: [N, L, C], ids: [N, K] -> [N, K, C]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Encoder


class MaskedViTEncoder(nn.Module):
    """ViT encoder in timm layout that runs on the visible patches and returns tap outputs."""

    def __init__(self, spec: VariantSpec, img_size: int, act_ckpt_every: int = 0):
        super().__init__()
        self.patch_size = spec.patch_size
        self.depth = spec.depth
        self.act_ckpt_every = act_ckpt_every
        self.patch_embed = PatchEmbed(img_size, spec.patch_size, 3, spec.dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        grid = img_size // spec.patch_size
        # Fixed, not learned (requires_grad=False), but kept a parameter so the state dict matches timm.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(spec.dim, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                Block(spec.dim, spec.heads, spec.mlp_ratio, qkv_bias=True, norm_layer=_layer_norm)
                for _ in range(spec.depth)
            ]
        )
        self.norm = _layer_norm(spec.dim)
        self.num_patches = num_patches
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.act_ckpt_every and self.training and i % self.act_ckpt_every == 0 and torch.is_grad_enabled():
            return checkpoint(self.blocks[i], x, use_reentrant=False)
        return self.blocks[i](x)

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
        """imgs: [N, 3, H, W], ids_keep: [N, K] -> one [N, 1+K, D] tensor per tap.

        Intermediate taps are the raw residual stream after block t (1-indexed); only the final
        block's output goes through the encoder norm.
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = gather_tokens(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        tap_set = set(taps)
        outs = []
        for i in range(self.depth):
            x = self._run_block(i, x)
            if i + 1 in tap_set and i + 1 != self.depth:
                outs.append(x)
        outs.append(self.norm(x))
        return outs

    def forward_all(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """Unmasked forward (evaluation/export): [N, 3, H, W] -> per-block outputs [N, 1+L, D].

        Entry i is the raw output of block i+1; the last entry is normed, as in timm's
        ``forward_features``.
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        outs[-1] = self.norm(x)
        return outs


def _layer_norm(dim: int, **kwargs) -> nn.LayerNorm:
    """LayerNorm with MAE's eps; kwargs carries timm's device/dtype factory arguments."""
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


# ----------------------------------------------------------------------------------------------
# Full model


class DeepMIM(nn.Module):
    """Encoder with taps + one independent decoder per tap (stacked, see ``DecoderStack``)."""

    def __init__(
        self,
        spec: VariantSpec,
        img_size: int,
        taps: list[int],
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        pred_dim: int,
        loss_kind: str = "mse",
        tap_weights: list[float] | None = None,
        fused: bool = True,
        act_ckpt_encoder: int = 0,
        act_ckpt_decoder: int = 0,
        decoder_attention: str = "auto",
        qkv_layout: str = "packed",
    ):
        super().__init__()
        self.spec = spec
        self.taps = list(taps)
        self.loss_kind = loss_kind
        self.loss_fn = LOSSES[loss_kind]  # replaced by a compiled version when compile is on
        weights = torch.tensor(tap_weights if tap_weights else [1.0] * len(taps), dtype=torch.float32)
        if weights.numel() != len(taps):
            raise ConfigError(f"target.weights has {weights.numel()} values for {len(taps)} taps {self.taps}")
        self.register_buffer("tap_weights", weights, persistent=False)
        self.patch_size = spec.patch_size
        self.encoder = MaskedViTEncoder(spec, img_size, act_ckpt_encoder)
        grid = img_size // spec.patch_size
        self.decoders = DecoderStack(
            num=len(taps),
            enc_dim=spec.dim,
            dim=decoder_dim,
            depth=decoder_depth,
            heads=decoder_heads,
            pred_dim=pred_dim,
            pos_embed=sincos_pos_embed_2d(decoder_dim, grid),
            fused=fused,
            act_ckpt_every=act_ckpt_decoder,
            attention_backend=decoder_attention,
            qkv_layout=qkv_layout,
        )

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    def predict(self, imgs: torch.Tensor, masks: MaskState) -> torch.Tensor:
        """imgs: [N, 3, H, W] in the parameters' dtype -> predictions [T, N, L, P]."""
        feats = self.encoder(imgs, masks.ids_keep, self.taps)
        return self.decoders(feats, masks.ids_restore)

    def forward(
        self, imgs: torch.Tensor, masks: MaskState, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, 3, H, W], targets: [T or 1, N, L, P] -> (weighted total loss [], per-tap
        losses [T], predictions [T, N, L, P]). The loss lives in forward so that DeepSpeed and
        torch.compile see the whole model step."""
        preds = self.predict(imgs, masks)
        taps = self.loss_fn(preds, targets, masks.mask)
        return (taps * self.tap_weights).sum(), taps, preds


def build_model(cfg: Config, plan: RunPlan) -> DeepMIM:
    """The pretraining model of a run: shapes from the plan, options from the config."""
    return DeepMIM(
        spec=get_variant(plan.arch),
        img_size=plan.img_size,
        taps=list(plan.taps),
        decoder_dim=cfg.model.decoder_dim,
        decoder_depth=cfg.model.decoder_depth,
        decoder_heads=cfg.model.decoder_heads,
        pred_dim=plan.pred_dim,
        loss_kind=cfg.target.feature_loss if cfg.target.kind in ("clip", "features") else "mse",
        tap_weights=list(cfg.target.weights) or None,
        fused=cfg.model.fused_decoders,
        act_ckpt_encoder=cfg.engine.act_ckpt_encoder,
        act_ckpt_decoder=cfg.engine.act_ckpt_decoder,
        decoder_attention=cfg.model.decoder_attention,
        qkv_layout=cfg.model.qkv_layout,
    )
