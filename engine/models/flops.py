"""Model FLOPs per trained image, counted as docs/performance.md describes.

1 MAC = 2 FLOPs. A transformer block on N tokens of width D (MLP ratio 4) costs
``12*N*D^2 + 2*N^2*D`` MACs. The encoder runs the patch embedding on all patches and its blocks on
the visible tokens (+ cls); each decoder runs its input projection on the visible tokens, its
blocks on the full sequence (1 + L) and its head on every token; a frozen teacher runs one
forward. Model FLOPs per image = 2 * [3 * (encoder + decoders) + teacher]. Recomputation by
activation checkpointing is hardware work, not model work, and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 peak per device (TFLOP/s), for MFU. Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,  # SXM; the PCIe card is lower (756) and is matched first below
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
}


def num_kept(num_patches: int, ratio: float) -> int:
    """Visible patches per image under MAE masking (the rest are masked)."""
    return int(num_patches * (1 - ratio))


def block_macs(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """MACs of one pre-norm transformer block: QKV + projection (4*N*D^2), MLP (2*r*N*D^2),
    attention scores and values (2*N^2*D)."""
    return (4 + 2 * mlp_ratio) * tokens * dim * dim + 2 * tokens * tokens * dim


def vit_forward_macs(patches: int, patch: int, dim: int, depth: int, tokens: int, head_out: int = 0) -> float:
    """Patch embedding on ``patches`` patches, ``depth`` blocks on ``tokens`` tokens, and an
    optional head of ``head_out`` outputs on every token."""
    return patches * 3 * patch * patch * dim + depth * block_macs(tokens, dim) + tokens * dim * head_out


@dataclass(frozen=True)
class FlopCount:
    encoder_macs: float
    decoder_macs: float  # all decoders together
    teacher_macs: float

    @property
    def per_image(self) -> float:
        """Model FLOPs per trained image: forward + backward (x3) for the student, forward for the teacher."""
        return 2.0 * (3.0 * (self.encoder_macs + self.decoder_macs) + self.teacher_macs)

    def shares(self) -> dict[str, float]:
        total = 3.0 * (self.encoder_macs + self.decoder_macs) + self.teacher_macs
        return {
            "encoder": 3.0 * self.encoder_macs / total,
            "decoders": 3.0 * self.decoder_macs / total,
            "teacher": self.teacher_macs / total,
        }


def count_flops(
    *,
    img_size: int,
    patch: int,
    dim: int,
    depth: int,
    num_decoders: int,
    decoder_dim: int,
    decoder_depth: int,
    pred_dim: int,
    mask_ratio: float = 0.75,
    teacher: dict | None = None,
) -> FlopCount:
    """``teacher``: dict(width, layers, patch, out_dim, img_size) of a CLIP tower, or None."""
    length = (img_size // patch) ** 2
    visible = num_kept(length, mask_ratio) + 1
    enc = vit_forward_macs(length, patch, dim, depth, visible)
    seq = length + 1
    one_dec = visible * dim * decoder_dim + decoder_depth * block_macs(seq, decoder_dim) + seq * decoder_dim * pred_dim
    tch = 0.0
    if teacher:
        t_len = (teacher["img_size"] // teacher["patch"]) ** 2
        tch = vit_forward_macs(
            t_len, teacher["patch"], teacher["width"], teacher["layers"], t_len + 1, teacher["out_dim"]
        )
    return FlopCount(enc, num_decoders * one_dec, tch)


def flops_for_model(
    model, mask_ratio: float, teacher_ref: dict | None = None, img_size: int | None = None
) -> FlopCount:
    """FLOPs of a built DeepMIM model and of the CLIP teacher recorded in its target reference
    (a mixed-target generator is counted by the caller: it is itself a DeepMIM model)."""
    enc = model.encoder
    dec = model.decoders
    size = img_size or enc.patch_embed.img_size[0]
    teacher = None
    if teacher_ref and teacher_ref.get("kind") in ("clip", "features"):
        teacher = {
            "width": teacher_ref["width"],
            "layers": teacher_ref["layers"],
            "patch": teacher_ref.get("patch", model.patch_size),
            "out_dim": teacher_ref["out_dim"],
            "img_size": teacher_ref.get("img_size", size),
        }
    flops = count_flops(
        img_size=size,
        patch=model.patch_size,
        dim=model.spec.dim,
        depth=model.spec.depth,
        num_decoders=dec.num,
        decoder_dim=dec.embed.weight.shape[1],
        decoder_depth=len(dec.blocks),
        pred_dim=dec.pred.weight.shape[1],
        mask_ratio=mask_ratio,
        teacher=teacher,
    )
    return flops


def peak_flops(device_name: str, override_tflops: float = 0.0) -> float | None:
    """Dense bf16 peak in FLOP/s for MFU; None when the device is unknown (MFU is then not logged)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None
