"""torch.compile for the model part of the step, with a clean off switch and an eager fallback.

Regional compilation: every transformer block (encoder ``Block``, decoder ``StackedBlock``,
teacher blocks) is compiled in place with ``nn.Module.compile``. Blocks of one class share their
compiled code, so compile time is that of one or two blocks, not of the whole model, and state
dict keys are unchanged (checkpoints do not care whether compile was on). Inside a block the
compiler fuses LayerNorm, GELU, residual adds and bias adds into few kernels, which is where the
unfused elementwise traffic of the eager step goes.

Failures surface at the first call, so ``probe`` runs one forward and backward on a batch of
the real shape before training, with gradients taken only with respect to the input: parameter
gradient hooks (ZeRO-2's reduce-scatter) do not fire. On any error the blocks are restored to
eager and the reason is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


def block_modules(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks inside ``module`` (timm ``Block`` and our ``StackedBlock``)."""
    from timm.models.vision_transformer import Block

    from engine.models.decoders import StackedBlock

    return [m for m in module.modules() if isinstance(m, (Block, StackedBlock))]


def compile_blocks(modules: list[nn.Module], backend: str, mode: str) -> int:
    """Compile every block of the given modules in place; returns how many were compiled."""
    blocks = [b for m in modules for b in block_modules(m)]
    kwargs = {"backend": backend}
    if mode != "default":
        kwargs["mode"] = mode
    for b in blocks:
        b.compile(**kwargs)
        if hasattr(b, "one"):  # the per-decoder reference path of a StackedBlock (t is a guard: T variants)
            b.one = torch.compile(b.one, **kwargs)
    for m in modules:  # the fused loss over all taps: one generated kernel chain instead of ~8 passes
        for sub in m.modules():
            if hasattr(sub, "loss_fn") and not hasattr(sub.loss_fn, "_torchdynamo_orig_callable"):
                sub.loss_fn = torch.compile(sub.loss_fn, **kwargs)
    return len(blocks)


def uncompile_blocks(modules: list[nn.Module]) -> None:
    for m in modules:
        for b in block_modules(m):
            b._compiled_call_impl = None
            if "one" in vars(b):  # drop the compiled instance attribute; the class method remains
                del b.one
        for sub in m.modules():
            orig = getattr(getattr(sub, "loss_fn", None), "_torchdynamo_orig_callable", None)
            if orig is not None:
                sub.loss_fn = orig
    torch._dynamo.reset()


def probe(step: Callable[[], torch.Tensor], inputs: torch.Tensor) -> None:
    """Run ``step()`` (a forward returning a scalar) and a backward w.r.t. ``inputs`` only."""
    loss = step()
    torch.autograd.grad(loss, [inputs], allow_unused=True)


def try_compile(
    modules: list[nn.Module], backend: str, mode: str, step: Callable[[], torch.Tensor], inputs: torch.Tensor
) -> tuple[bool, str]:
    """Compile, probe, and fall back to eager on any failure. Returns (compiled, reason)."""
    try:
        n = compile_blocks(modules, backend, mode)
        probe(step, inputs)
    except Exception as err:  # compilers fail in many ways; training must go on eager
        uncompile_blocks(modules)
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        log.warning("torch.compile failed, running eager instead (%s)", reason[:500])
        return False, reason
    log.info("torch.compile: %d blocks compiled (backend %s, mode %s)", n, backend, mode)
    return True, ""
