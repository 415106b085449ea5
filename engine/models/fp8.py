"""Opt-in FP8 training of the encoder's linear layers (torchao's float8 training).

The encoder's transformer blocks (qkv, proj, fc1, fc2) become ``Float8Linear``: inputs, weights and
output gradients are cast to FP8 with dynamic per-tensor scales around each GEMM, while the
weights stay in the engine's dtype (so checkpoints and exports are unchanged). Hopper GPUs run the
FP8 GEMMs natively; elsewhere torchao emulates them (``emulate=True``: the same rounding, in
higher precision), which is how the CPU tests check the wrapper. The decoders' stacked layers and
the heads stay in bf16. Not recommended until a GPU run shows a loss curve within 1% of bf16 over a
few hundred steps (issue 10; the README's speed section says where that stands).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _encoder_linear(module: nn.Module, fqn: str) -> bool:
    """Big linears of the encoder's blocks whose sizes FP8 GEMMs accept (multiples of 16)."""
    if not isinstance(module, nn.Linear) or ".blocks." not in f".{fqn}" or "decoders" in fqn:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_encoder_to_fp8(model: nn.Module, emulate: bool | None = None) -> int:
    """Swap the encoder blocks' ``nn.Linear`` for ``Float8Linear`` in place; returns how many."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise RuntimeError("engine.fp8=true needs torchao (pip install torchao)") from err
    if emulate is None:
        emulate = not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9))
    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig(emulate=emulate), module_filter_fn=_encoder_linear)
    from torchao.float8.float8_linear import Float8Linear

    converted = sum(isinstance(m, Float8Linear) for m in model.modules())
    log.info(
        "fp8: %d of %d linear layers of the encoder's blocks train in FP8%s",
        converted,
        before,
        " (emulated: no FP8 GEMMs on this device)" if emulate else "",
    )
    return converted
