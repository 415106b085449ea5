"""Where pretrained encoder weights come from: a run folder, a checkpoint folder, or an export.

    encoder_weights("runs/b16")                          # the run's newest complete checkpoint
    encoder_weights("runs/b16/checkpoints/step_00250000") # that checkpoint
    encoder_weights("exports/b16")                        # an engine.tools.export folder

Checkpoints are consolidated from every rank's ZeRO-2 partition to float32 master weights with
DeepSpeed's ``zero_to_fp32`` (never the bf16 copies the model trained with), under the load guard
(engine.serialization). Every source gives the encoder in timm's ``VisionTransformer`` layout,
the pretraining config it came from, and a description for logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import Config, from_dict
from engine.errors import WeightsError
from engine.loop import checkpoint as ckpt
from engine.serialization import load_guard

log = logging.getLogger(__name__)

__all__ = ["EncoderWeights", "WeightsError", "consolidated_state", "encoder_weights", "find_checkpoint", "resolve"]


@dataclass
class EncoderWeights:
    state: dict[str, torch.Tensor]  # timm VisionTransformer names (cls_token, pos_embed, blocks.*, norm.*), fp32
    config: Config  # the pretraining run's config
    origin: dict  # kind (run | checkpoint | export), path, step


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The newest complete checkpoint of a run folder, or the one at ``step``."""
    root = run_dir / "checkpoints"
    if step is None:
        path = ckpt.newest_complete(root)
        if path is None:
            raise WeightsError(f"{root.resolve()}: no complete checkpoint")
        return path
    path = root / ckpt.tag_for(step)
    if not (path / ckpt.MARKER).is_file():
        have = [ckpt.step_of(p.name) for p in ckpt.list_checkpoints(root)]
        raise WeightsError(f"{path.resolve()}: no complete checkpoint at step {step}; complete ones: {have}")
    return path


def resolve(source: str | Path, step: int | None = None) -> tuple[str, Path]:
    """('export', folder) or ('checkpoint', checkpoint folder) for a path of any of the three kinds."""
    p = Path(source)
    if (p / "export.json").is_file():
        return "export", p
    if (p / ckpt.MARKER).is_file():
        return "checkpoint", p
    if (p / "checkpoints").is_dir():
        return "checkpoint", find_checkpoint(p, step)
    raise WeightsError(
        f"{p.resolve()}: not a pretraining run folder (checkpoints/), a complete checkpoint folder ({ckpt.MARKER}) "
        "or an export folder (export.json)"
    )


def consolidated_state(path: Path) -> dict[str, torch.Tensor]:
    """The float32 master weights of a ZeRO checkpoint, gathered from every rank's partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    problems = ckpt.verify(path)
    if problems:
        raise WeightsError(f"{path.resolve()} is damaged: {'; '.join(problems[:3])}")
    # zero_to_fp32 prints its progress (and a progress bar) on every rank: kept unless it fails.
    chatter = io.StringIO()
    try:  # DeepSpeed's consolidation unpickles every file: under the guard, plain data only
        with load_guard(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except Exception:
        sys.stderr.write(chatter.getvalue())
        raise


def encoder_weights(source: str | Path, step: int | None = None) -> EncoderWeights:
    kind, path = resolve(source, step)
    if kind == "export":
        from safetensors.torch import load_file

        meta = json.loads((path / "export.json").read_text())
        if meta.get("kind", "encoder") != "encoder":
            raise WeightsError(f"{path.resolve()} holds a fine-tuned {meta.get('kind')}, not a pretrained encoder")
        state = load_file(str(path / "encoder.safetensors"))
        return EncoderWeights(
            state,
            from_dict(meta["config"]),
            {"kind": "export", "path": str(path.resolve()), "step": meta.get("source_step")},
        )
    marker = ckpt.read_marker(path)
    cfg = from_dict(marker["config"])
    if cfg.task != "pretrain":
        raise WeightsError(f"{path.resolve()} is a {cfg.task} checkpoint; init.pretrained wants a pretraining run")
    full = consolidated_state(path)
    state = {k[len("encoder.") :]: v.float() for k, v in full.items() if k.startswith("encoder.")}
    return EncoderWeights(state, cfg, {"kind": "checkpoint", "path": str(path.resolve()), "step": marker["step"]})
