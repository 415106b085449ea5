"""What the loop needs from an engine, and the two engines that provide it.

The loop calls an engine's forward (``engine(*inputs)``), ``backward``, ``step``,
``is_gradient_accumulation_boundary``, ``train``/``eval``, ``save_checkpoint`` and
``load_checkpoint``, and reaches its optimizer through ``engine.loop.zero_adapter``.

* ``deepspeed_engine``: DeepSpeed ZeRO-2 in bf16, what every run uses.
* ``local_engine``: a single-process engine in plain PyTorch with the same calls and the same
  accumulation rule. It is what the in-process test tier builds the real ``Trainer`` on (save
  cadence, rollback, preemption and resume decisions without launching processes), and a way to
  step through the loop in a debugger. It trains in float32 and refuses more than one rank.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from engine.errors import CheckpointError, ConfigError
from engine.loop.checkpoint_writer import CheckpointWriter

log = logging.getLogger(__name__)

EngineFactory = Callable[[nn.Module, torch.optim.Optimizer, dict], tuple[Any, torch.dtype]]


def model_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def deepspeed_engine(module: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> tuple[Any, torch.dtype]:
    import deepspeed
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    # The client state DeepSpeed's ds_to_universal asks for ("Verify that client creates this state"):
    # with it, the converter works on our checkpoints without --inject_missing_state.
    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine, model_dtype(ds_config)


def fp32_snapshot(module: nn.Module, ds_config: dict) -> dict[str, torch.Tensor] | None:
    """The trainable parameters as they are before a bf16/fp16 engine converts the module (the file's
    values for weights loaded from one, the exact initialization for the rest); None in fp32."""
    if model_dtype(ds_config) == torch.float32:
        return None
    return {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}


def set_fp32_masters(engine: Any, snapshot: dict[str, torch.Tensor]) -> tuple[int, int]:
    """DeepSpeed builds its fp32 master weights from the already-rounded bf16 module, so a run would
    start from the bf16 rounding of the weights it was given. Each master is set back to ``snapshot``
    with DeepSpeed's own setter (each rank writes its partition's fragment). Returns (set, trainable)."""
    from deepspeed.utils import safe_set_full_fp32_param

    done = 0
    for name, p in engine.module.named_parameters():
        if name in snapshot and (hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")):
            safe_set_full_fp32_param(p, snapshot[name].to(p.device))
            done += 1
    return done, len(snapshot)


def build_engine(
    factory: EngineFactory, module: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict
) -> tuple[Any, torch.dtype]:
    """The engine, its fp32 master weights equal to the module's weights as they were given."""
    exact = fp32_snapshot(module, ds_config)
    engine, dtype = factory(module, optimizer, ds_config)
    if exact is not None and not isinstance(engine, LocalEngine):
        done, total = set_fp32_masters(engine, exact)
        log.info("fp32 master weights: %d trainable tensors set as given (not their bf16 rounding)", done)
        if done < total:
            log.warning("%d trainable tensors have no fp32 master DeepSpeed exposes: they start rounded", total - done)
    return engine, dtype


class LocalEngine:
    """DeepSpeed's engine calls on one process: forward, backward scaled by the accumulation,
    an optimizer step every ``gradient_accumulation_steps`` micro-steps, and checkpoints as one
    ``local_states.pt`` per tag (module, optimizer, client state)."""

    FILE = "local_states.pt"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("the local engine runs one process; use DeepSpeed for more ranks")
        self.module, self.optimizer = module, optimizer
        self.grad_accum = int(ds_config.get("gradient_accumulation_steps", 1))
        self.micro_steps = 0
        self.global_steps = 0
        # files go through a checkpoint engine as DeepSpeed's do (the trainer installs its writer)
        self.checkpoint_engine = CheckpointWriter(0, 1, False, torch.device("cpu"))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False) -> None:
        path = Path(save_dir) / tag
        info = SimpleNamespace(tag=tag, save_dir=save_dir, save_latest=save_latest)
        self.checkpoint_engine.create(info)
        self.checkpoint_engine.makedirs(path, exist_ok=True)
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_steps": self.global_steps,
            "micro_steps": self.micro_steps,
            "client_state": client_state,
        }
        self.checkpoint_engine.save(state, str(path / self.FILE))
        self.checkpoint_engine.commit(info)
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str, dict]:
        path = Path(load_dir) / tag / self.FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: not a local-engine checkpoint")
        state = self.checkpoint_engine.load(str(path), map_location="cpu")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_steps, self.micro_steps = state["global_steps"], state["micro_steps"]
        return str(path.parent), state["client_state"]

    def __repr__(self) -> str:
        return json.dumps({"engine": "local", "grad_accum": self.grad_accum, "global_steps": self.global_steps})


def local_engine(module: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> tuple[Any, torch.dtype]:
    return LocalEngine(module, optimizer, ds_config), torch.float32


def align_step_counts(engine: Any, global_steps: int, micro_steps: int) -> None:
    """After a resume: DeepSpeed restores its optimizer-step count but not its micro-step count, which
    decides its accumulation boundaries; both are set from the run's step and the loader's position
    (saves happen at boundaries, so the position is a multiple of the accumulation)."""
    engine.global_steps = global_steps
    engine.micro_steps = micro_steps
