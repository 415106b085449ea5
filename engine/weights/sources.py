"""Where pretrained encoder weights come from, for fine-tuning, probing and evaluation.

    encoder_weights("runs/b16")                            # a run: its newest complete checkpoint
    encoder_weights("runs/b16/checkpoints/step_00250000")  # one checkpoint
    encoder_weights("exports/b16")                         # an engine.tools.export folder
    encoder_weights("mae_pretrain_vit_base.pth")           # official MAE/DeepMIM, or a timm file
    encoder_weights("models/vit_base_patch16_224.mae")     # a timm / Hugging Face model folder

Our checkpoints are consolidated from every rank's ZeRO-2 partition to float32 master weights with
DeepSpeed's ``zero_to_fp32`` (never the bf16 copies the model trained with), under the load guard
(engine.weights.safe_load). Files from elsewhere are read by ``engine.weights.formats`` without running
anything from them. Every source gives the encoder in timm's ``VisionTransformer`` layout, the
encoder's shape, and a description for logs and checkpoints; ``inspect_source`` gives the shape
alone, cheaply, for the checks before launch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import Config, from_dict, plan_run
from engine.errors import WeightsError
from engine.run_folder import checkpoints as ckpt
from engine.weights.formats import EncoderShape, FileInfo, encoder_state, inspect_file, require_finite
from engine.weights.safe_load import load_guard

log = logging.getLogger(__name__)

__all__ = [
    "EncoderWeights",
    "WeightsError",
    "check_finite_source",
    "consolidated_state",
    "encoder_weights",
    "find_checkpoint",
    "inspect_source",
    "resolve",
]


@dataclass
class EncoderWeights:
    state: dict[str, torch.Tensor]  # timm VisionTransformer names (cls_token, pos_embed, blocks.*, norm.*), fp32
    shape: EncoderShape
    origin: dict  # kind, path, step, what (a sentence)
    config: Config | None = None  # the pretraining run's config, for our own runs and exports
    dropped: list[str] = field(default_factory=list)  # keys of the source that are not the encoder's


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
    """(kind, path): ``export`` (our export folder), ``checkpoint`` (a checkpoint folder, also the
    newest of a run folder) or ``file`` (a weights file or a timm/Hugging Face model folder)."""
    p = Path(source)
    if (p / "export.json").is_file():
        return "export", p
    if (p / ckpt.MARKER).is_file():
        return "checkpoint", p
    if (p / "checkpoints").is_dir():
        return "checkpoint", find_checkpoint(p, step)
    if p.is_file() or (p.is_dir() and any((p / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))):
        return "file", p
    raise WeightsError(
        f"{p.resolve()}: not a pretraining run folder (checkpoints/), a checkpoint folder ({ckpt.MARKER}), an "
        "export folder (export.json), a weights file (.pth, .safetensors, .bin) or a timm model folder (config.json "
        "with model.safetensors)"
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


def _shape_of_config(cfg: Config) -> EncoderShape:
    from engine.models.registry import get_variant

    plan = plan_run(cfg)
    spec = get_variant(plan.arch)
    return EncoderShape(spec.dim, spec.depth, spec.patch_size, plan.img_size)


def _export_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "export.json").read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path / 'export.json'}: unreadable ({err})") from None
    if meta.get("kind", "encoder") != "encoder":
        raise WeightsError(
            f"{path.resolve()} holds a fine-tuned {meta.get('kind')} (export.json kind), not a pretrained encoder"
        )
    if not isinstance(meta.get("config"), dict):
        raise WeightsError(f"{path / 'export.json'}: no 'config' (not written by engine.tools.export?)")
    name = str(meta.get("timm_model", ""))
    if not name.startswith("vit_"):
        raise WeightsError(f"{path / 'export.json'}: names timm model {name!r}, not one of this project's ViT encoders")
    return meta


def inspect_source(source: str | Path) -> FileInfo:
    """What a source holds, from metadata and shapes only (no weights read, nothing consolidated)."""
    kind, path = resolve(source)
    if kind == "file":
        return inspect_file(path)
    if kind == "export":
        meta = _export_meta(path)
        shape = _shape_of_config(from_dict(meta["config"]))
        weights = path / meta.get("weights", "encoder.safetensors")
        info = inspect_file(weights)  # the header must agree with what export.json says
        if info.shape != shape:
            raise WeightsError(
                f"{weights}: holds {info.shape.describe() if info.shape else 'no encoder'}, but its export.json "
                f"says {shape.describe()}"
            )
        return FileInfo(path, "export", shape)
    marker = ckpt.read_marker(path)
    cfg = from_dict(marker["config"])
    if cfg.task != "pretrain":
        raise WeightsError(f"{path.resolve()} is a {cfg.task} checkpoint, not a pretraining run")
    return FileInfo(path, "ours", _shape_of_config(cfg))


def encoder_weights(source: str | Path, step: int | None = None) -> EncoderWeights:
    kind, path = resolve(source, step)
    where = str(path.resolve())
    if kind == "export":
        meta = _export_meta(path)
        state, info, dropped = encoder_state(path / meta.get("weights", "encoder.safetensors"))
        cfg = from_dict(meta["config"])
        origin = {"kind": "export", "path": where, "step": meta.get("source_step"), "what": "an export of our run"}
        return EncoderWeights(state, info.shape, origin, cfg, dropped)
    if kind == "file":
        state, info, dropped = encoder_state(path)
        origin = {"kind": info.kind, "path": where, "step": None, "what": info.describe()}
        return EncoderWeights(state, info.shape, origin, None, dropped)
    marker = ckpt.read_marker(path)
    cfg = from_dict(marker["config"])
    if cfg.task != "pretrain":
        raise WeightsError(f"{path.resolve()} is a {cfg.task} checkpoint; init.pretrained wants a pretraining run")
    full = consolidated_state(path)
    state = {k[len("encoder.") :]: v.float() for k, v in full.items() if k.startswith("encoder.")}
    require_finite(state, f"{path.resolve()} (its fp32 master weights)")
    dropped = sorted(k for k in full if not k.startswith("encoder."))
    origin = {"kind": "checkpoint", "path": where, "step": marker["step"], "what": "a checkpoint of our run"}
    return EncoderWeights(state, _shape_of_config(cfg), origin, cfg, dropped)


def check_finite_source(source: str | Path) -> None:
    """Before launch: the encoder weights a source holds are finite (files and exports are read; of a
    checkpoint, the model states, whose bf16 copy shows a NaN of the master weights, are mapped)."""
    from engine.weights.safe_load import safe_load

    kind, path = resolve(source)
    if kind == "export":
        encoder_state(path / _export_meta(path).get("weights", "encoder.safetensors"))
    elif kind == "file":
        encoder_state(path)
    else:
        file = ckpt.states_file(path)
        if file is not None:
            module = safe_load(file, mmap=True).get("module", {})
            require_finite({k: v for k, v in module.items() if k.startswith("encoder.")}, file)
