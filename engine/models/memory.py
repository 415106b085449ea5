"""Parameter counts and an estimate of peak GPU memory per rank, from shapes alone (no torch).

How the estimate is made (docs/performance.md has the comparison with measurements):

* **Model states under ZeRO-2 with bf16**: every rank keeps the bf16 weights (2 bytes per
  trainable parameter) and a bf16 gradient buffer (2), plus its 1/W share of the fp32 master
  weights, Adam's two moments and the fp32 gradient partition (16 / W); DeepSpeed's reduce and
  all-gather buckets add ``reduce_bucket_size`` bf16 elements each.
* **Activations kept for backward**: a pre-norm ViT block keeps about 16 values per token and
  channel in bf16 (two LayerNorm inputs and outputs, q/k/v, the attention output, the projection,
  the 4x-wide MLP hidden state before and after GELU): ``32 * tokens * width`` bytes. A block under
  activation checkpointing keeps only its input (2 bytes per value) and recomputes one block at a
  time. The decoders' predictions and the loss work in float32.
* **Frozen teachers** keep only their bf16 weights and one block's activations at a time.

Measured on an H100 (bench/results, micro-batch 256, compiled, DeepSpeed ZeRO-2 on one GPU): the
estimate is within a few percent of ``torch.cuda.max_memory_allocated`` for ViT-B; eager runs
use more (up to ~15%) because unfused elementwise ops keep extra temporaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GB = 1e9
BLOCK_VALUES = 16  # bf16 values a pre-norm ViT block keeps per token and channel for backward


def vit_params(img_size: int, patch: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Parameters of a ViT encoder in timm's layout (patch embedding, cls, position embedding,
    blocks, final norm)."""
    tokens = (img_size // patch) ** 2 + 1
    hidden = int(dim * mlp_ratio)
    block = 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim + 4 * dim  # qkv+proj, mlp, 2 norms
    return 3 * patch * patch * dim + dim + dim + tokens * dim + depth * block + 2 * dim


def decoder_params(enc_dim: int, dim: int, depth: int, pred_dim: int, mlp_ratio: float = 4.0) -> int:
    """One MAE-style decoder: input projection, mask token, blocks, norm, prediction head."""
    hidden = int(dim * mlp_ratio)
    block = 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim + 4 * dim
    return enc_dim * dim + dim + dim + depth * block + 2 * dim + dim * pred_dim + pred_dim


def block_activation_bytes(tokens: int, dim: int) -> float:
    return 2.0 * BLOCK_VALUES * tokens * dim


def stack_activation_bytes(depth: int, tokens: int, dim: int, ckpt_every: int) -> float:
    """Activations ``depth`` blocks keep for backward, with checkpointing of every k-th block."""
    full = block_activation_bytes(tokens, dim)
    if not ckpt_every:
        return depth * full
    checkpointed = len(range(0, depth, ckpt_every))
    return (depth - checkpointed) * full + checkpointed * 2.0 * tokens * dim + full  # + one recompute


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of one rank, in GB (1e9 bytes)."""

    weights_gb: float
    gradients_gb: float
    optimizer_gb: float  # fp32 master weights + Adam moments + fp32 gradient partition (this rank's share)
    buckets_gb: float
    activations_gb: float  # micro-batch x per image
    teacher_gb: float
    total_gb: float
    per_image_mb: float  # activations of one image
    # host (CPU) memory, not in total_gb: the copy of the state an asynchronous save writes from,
    # kept from one save to the next (rank 0: the bf16 weights and its fp32 master + Adam share)
    host_snapshot_gb: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


def estimate_memory(
    *,
    trainable: int,
    frozen: int,
    world_size: int,
    micro_batch: int,
    per_image_bytes: float,
    bucket_elems: float,
    frozen_transient_bytes: float = 0.0,
    async_save: bool = False,
) -> MemoryEstimate:
    """``trainable``/``frozen``: parameter counts; ``per_image_bytes``: activations of one image;
    ``frozen_transient_bytes``: a frozen module's working set per image (one block at a time)."""
    weights = 2.0 * trainable
    grads = 2.0 * trainable
    optim = 16.0 * trainable / world_size
    buckets = 2 * 2.0 * bucket_elems if world_size > 1 else 2.0 * bucket_elems
    acts = micro_batch * per_image_bytes
    teacher = 2.0 * frozen + micro_batch * frozen_transient_bytes
    total = weights + grads + optim + buckets + acts + teacher
    snapshot = (2.0 * trainable + 12.0 * trainable / world_size) if async_save else 0.0
    return MemoryEstimate(
        weights / GB,
        grads / GB,
        optim / GB,
        buckets / GB,
        acts / GB,
        teacher / GB,
        total / GB,
        per_image_bytes / 1e6,
        host_snapshot_gb=snapshot / GB,
    )
