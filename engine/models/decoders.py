"""All DeepMIM decoders as one module, driven by the tap list.

Each decoder is independent (own input projection, mask token, blocks, norm and head; only the
fixed sin-cos position embedding is shared), but their parameters are stored stacked along a
leading decoder axis T. That gives two exact views of the same weights:

* ``fused=True``: one batched pass for all T decoders. Linear layers are batched GEMMs
  (``baddbmm`` over T), the un-shuffle is one gather, and attention folds T into the batch of a
  single SDPA call. Few, large kernels instead of T times as many small ones.
* ``fused=False``: the reference path, a plain Python loop that runs decoder t alone with
  ``F.linear``/``F.layer_norm`` on slice t of each stacked weight, like the research code.

Both read the same parameters, so checkpoints are interchangeable without any conversion.
Shapes follow the legend in ``engine.models.mim``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6


class StackedLinear(nn.Module):
    """T independent linear layers: weight [T, out, in] (nn.Linear layout per slice), bias [T, out].

    ``gemm`` picks how the stacked forward multiplies: ``bmm`` is one batched GEMM over T;
    ``loop`` is T GEMMs with the bias fused in cuBLASLt's epilogue, stacked afterwards. Same
    weights and results either way; which is faster depends on the GPU and the sizes (see the
    README's performance section).
    """

    gemm = "bmm"  # class default; DecoderStack sets it per instance

    def __init__(self, num: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(num, d_out))
        for t in range(num):  # xavier per decoder: the fan is that of one [out, in] matrix
            nn.init.xavier_uniform_(self.weight.data[t])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, ..., in] -> [T, ..., out] with one batched GEMM."""
        num, d_in = x.shape[0], x.shape[-1]
        if self.gemm == "loop":
            return torch.stack([F.linear(x[t], self.weight[t], self.bias[t]) for t in range(num)])
        flat = x.reshape(num, -1, d_in)
        out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.weight.shape[1])

    def one(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder t alone: x: [..., in] -> [..., out]."""
        return F.linear(x, self.weight[t], self.bias[t])


class StackedLayerNorm(nn.Module):
    """T independent LayerNorms: weight and bias [T, E]."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num, dim))
        self.bias = nn.Parameter(torch.zeros(num, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, ..., E] -> [T, ..., E]."""
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        y = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
        return torch.addcmul(self.bias.view(view), y, self.weight.view(view))

    def one(self, t: int, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight[t], self.bias[t], LN_EPS)


ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math", "flex")
QKV_LAYOUTS = ("packed", "split")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """q, k, v: [B, heads, S, hd] (any strides with a contiguous last dim) -> [B, heads, S, hd].

    ``auto`` lets SDPA choose; ``flash``/``efficient``/``cudnn``/``math`` pin one SDPA kernel (the
    decoders' head dim of 32 is one that some kernels handle better than others); ``flex`` is
    FlexAttention (fast only when compiled). Same math in every case.
    """
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    with sdpa_kernel([kernel]):
        return F.scaled_dot_product_attention(q, k, v)


class StackedBlock(nn.Module):
    """T independent pre-norm transformer blocks (attention + GELU MLP, ratio 4).

    ``qkv_layout`` picks how q, k, v leave the projection (same weights, same math):
    ``packed`` is one GEMM to [.., S, 3E] whose q/k/v are strided views after a permute (the
    research code's layout; its backward materializes the gradient through copies); ``split``
    runs three GEMMs on the three row blocks of the same weight, so each of q, k, v is [.., S, E]
    and its [B, heads, S, hd] view is what SDPA's kernels read and write without a copy.
    """

    attention_backend = "auto"  # class defaults; DecoderStack sets them per instance
    qkv_layout = "packed"

    def __init__(self, num: int, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        hidden = int(dim * mlp_ratio)
        self.norm1 = StackedLayerNorm(num, dim)
        self.qkv = StackedLinear(num, dim, 3 * dim)
        self.proj = StackedLinear(num, dim, dim)
        self.norm2 = StackedLayerNorm(num, dim)
        self.fc1 = StackedLinear(num, dim, hidden)
        self.fc2 = StackedLinear(num, hidden, dim)

    def _qkv(self, y: torch.Tensor, t: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """y: [T, N, S, E] (t None) or [N, S, E] (decoder t) -> q, k, v: [B, heads, S, hd], B = T*N or N."""
        *lead, s, e = y.shape
        b, hd = math.prod(lead), e // self.heads
        if self.qkv_layout == "split":
            w, bias = (self.qkv.weight, self.qkv.bias) if t is None else (self.qkv.weight[t], self.qkv.bias[t])
            outs = []
            for i in range(3):
                wi, bi = w[..., i * e : (i + 1) * e, :], bias[..., i * e : (i + 1) * e]
                if t is None:  # [T, N*S, E] x [T, E, E]: one batched GEMM per projection
                    o = torch.baddbmm(bi.unsqueeze(1), y.reshape(y.shape[0], -1, e), wi.transpose(1, 2))
                else:
                    o = F.linear(y, wi, bi)
                outs.append(o.reshape(b, s, self.heads, hd).transpose(1, 2))
            return outs[0], outs[1], outs[2]
        qkv = (self.qkv(y) if t is None else self.qkv.one(t, y)).reshape(b, s, 3, self.heads, hd)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, N, S, E] -> [T, N, S, E]; attention for all decoders in one SDPA call."""
        num, n, s, e = x.shape
        q, k, v = self._qkv(self.norm1(x), None)
        att = attention(q, k, v, self.attention_backend)  # [T*N, heads, S, hd]
        x = x + self.proj(att.transpose(1, 2).reshape(num, n, s, e))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def one(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder t alone: x: [N, S, E] -> [N, S, E]."""
        n, s, e = x.shape
        q, k, v = self._qkv(self.norm1.one(t, x), t)
        att = attention(q, k, v, self.attention_backend)
        x = x + self.proj.one(t, att.transpose(1, 2).reshape(n, s, e))
        return x + self.fc2.one(t, F.gelu(self.fc1.one(t, self.norm2.one(t, x))))


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Put mask tokens at the masked places and restore patch order.

    x: [*lead, N, 1+K, E] (cls first), mask_token: [*lead, E], ids_restore: [N, L]
    -> [*lead, N, 1+L, E]. lead is (T,) on the fused path and () for one decoder: one gather
    serves however many decoders lead.
    """
    *lead, n, k1, e = x.shape
    length = ids_restore.shape[1]
    tokens = mask_token.to(x.dtype).reshape(*lead, 1, 1, e)
    tokens = tokens.expand(*lead, n, length + 1 - k1, e)
    body = torch.cat([x[..., 1:, :], tokens], dim=-2)  # [..., N, L, E] in shuffled order
    index = ids_restore.unsqueeze(-1).expand(*lead, n, length, e)
    body = torch.gather(body, -2, index)
    return torch.cat([x[..., :1, :], body], dim=-2)


class DecoderStack(nn.Module):
    """T independent MAE-style decoders, stored stacked; see the module docstring."""

    def __init__(
        self,
        num: int,
        enc_dim: int,
        dim: int,
        depth: int,
        heads: int,
        pred_dim: int,
        pos_embed: torch.Tensor,
        fused: bool = True,
        act_ckpt_every: int = 0,
        gemm: str = "bmm",
        attention_backend: str = "auto",
        qkv_layout: str = "packed",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.num = num
        self.fused = fused
        self.act_ckpt_every = act_ckpt_every
        self.embed = StackedLinear(num, enc_dim, dim)
        self.mask_token = nn.Parameter(torch.empty(num, dim).normal_(std=0.02))
        # Shared and fixed: one sin-cos table [1, S, E] for every decoder.
        self.pos_embed = nn.Parameter(pos_embed[None].clone(), requires_grad=False)
        self.blocks = nn.ModuleList([StackedBlock(num, dim, heads) for _ in range(depth)])
        self.norm = StackedLayerNorm(num, dim)
        self.pred = StackedLinear(num, dim, pred_dim)
        self.set_gemm(gemm)
        self.set_attention(attention_backend, qkv_layout)

    def set_attention(self, backend: str, qkv_layout: str) -> None:
        if backend not in ATTENTION_BACKENDS or qkv_layout not in QKV_LAYOUTS:
            raise ValueError(
                f"decoder attention {backend!r} / qkv layout {qkv_layout!r}: allowed values are "
                f"{list(ATTENTION_BACKENDS)} / {list(QKV_LAYOUTS)}"
            )
        for blk in self.blocks:
            blk.attention_backend, blk.qkv_layout = backend, qkv_layout

    def set_gemm(self, gemm: str) -> None:
        if gemm not in ("bmm", "loop"):
            raise ValueError(f"decoder gemm {gemm!r}: allowed values are ['bmm', 'loop']")
        for m in self.modules():
            if isinstance(m, StackedLinear):
                m.gemm = gemm

    def _ckpt(self, i: int) -> bool:
        return bool(self.act_ckpt_every) and self.training and torch.is_grad_enabled() and i % self.act_ckpt_every == 0

    def forward(self, feats: list[torch.Tensor], ids_restore: torch.Tensor) -> torch.Tensor:
        """feats: T tensors [N, 1+K, D_enc], ids_restore: [N, L] -> predictions [T, N, L, P]."""
        if len(feats) != self.num:
            raise ValueError(f"expected {self.num} tap outputs, got {len(feats)}")
        if self.fused:
            return self._forward_fused(feats, ids_restore)
        return torch.stack([self._forward_one(t, f, ids_restore) for t, f in enumerate(feats)])

    def _forward_fused(self, feats: list[torch.Tensor], ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(torch.stack(feats))  # [T, N, 1+K, E]
        x = unshuffle(x, self.mask_token, ids_restore) + self.pos_embed
        for i, blk in enumerate(self.blocks):
            x = checkpoint(blk, x, use_reentrant=False) if self._ckpt(i) else blk(x)
        return self.pred(self.norm(x))[:, :, 1:]

    def _forward_one(self, t: int, feat: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The reference path for decoder t: [N, 1+K, D_enc] -> [N, L, P]."""
        x = self.embed.one(t, feat)
        x = unshuffle(x, self.mask_token[t], ids_restore) + self.pos_embed
        for i, blk in enumerate(self.blocks):
            x = checkpoint(blk.one, t, x, use_reentrant=False) if self._ckpt(i) else blk.one(t, x)
        return self.pred.one(t, self.norm.one(t, x))[:, 1:]
