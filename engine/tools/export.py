"""Export a pretrained encoder for fine-tuning: a ZeRO-2 checkpoint -> timm ``vit_*`` safetensors.

    python -m engine.tools.export RUN_DIR OUT_DIR [--step N]

The weights are the float32 master weights, consolidated from every rank's ZeRO-2 partition by
DeepSpeed's ``zero_to_fp32`` (not the bf16 copies the model trained with). Only the encoder is
kept; the decoders (and any teacher, which checkpoints never hold) are dropped on purpose and
listed in ``export.json``, together with the config, the timm model name and keyword arguments,
the source step and checksums. Then, in the fine-tuning code:

    import timm, safetensors.torch
    model = timm.create_model("vit_base_patch16_224", num_classes=0)   # name from export.json
    model.load_state_dict(safetensors.torch.load_file("OUT_DIR/encoder.safetensors"), strict=True)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from engine.config import from_dict, to_dict
from engine.loop import checkpoint as ckpt
from engine.models.registry import get_variant
from engine.targets.teachers import file_sha256

log = logging.getLogger("engine.tools.export")


class ExportError(RuntimeError):
    """The run folder has no usable checkpoint to export."""


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    root = run_dir / "checkpoints"
    if step is None:
        path = ckpt.newest_complete(root)
        if path is None:
            raise ExportError(f"{root}: no complete checkpoint to export")
        return path
    path = root / ckpt.tag_for(step)
    if not (path / ckpt.MARKER).is_file():
        have = [ckpt.step_of(p.name) for p in ckpt.list_checkpoints(root)]
        raise ExportError(f"{path}: no complete checkpoint at step {step}; complete ones: {have}")
    return path


def split_encoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full-model state dict -> (encoder weights under timm's names, the keys dropped)."""
    encoder, dropped = {}, []
    for k, v in state.items():
        if k.startswith("encoder."):
            encoder[k[len("encoder.") :]] = v.detach().to(torch.float32).contiguous()
        else:
            dropped.append(k)
    return encoder, dropped


def timm_target(arch: str, img_size: int) -> tuple[str, dict]:
    spec = get_variant(arch)
    kwargs = dict(spec.timm_kwargs)
    if img_size != spec.img_size:
        kwargs["img_size"] = img_size
    return spec.timm_name, kwargs


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    path = find_checkpoint(run_dir, step)
    marker = ckpt.read_marker(path)
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    encoder, dropped = split_encoder(state)
    cfg = from_dict(marker["config"]) if "config" in marker else _config_from_model_states(path)
    img_size = cfg.model.img_size or get_variant(cfg.model.arch).img_size
    name, kwargs = timm_target(cfg.model.arch, img_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "encoder.safetensors"
    save_file(encoder, str(weights), metadata={"timm_model": name, "source_step": str(marker["step"])})
    meta = {
        "timm_model": name,
        "timm_kwargs": {**kwargs, "num_classes": 0},
        "source": str(path.resolve()),
        "source_step": marker["step"],
        "config": to_dict(cfg),
        "encoder_keys": len(encoder),
        "dropped_keys": sorted(dropped),
        "dropped_note": "decoders are pretraining heads only; teachers are never part of checkpoints",
        "sha256": {"encoder.safetensors": file_sha256(weights)},
    }
    (out_dir / "export.json").write_text(json.dumps(meta, indent=2))
    log.info("exported %d encoder tensors (step %d) to %s; dropped %d decoder tensors; load with "
             "timm.create_model(%r, num_classes=0%s)", len(encoder), marker["step"], weights, len(dropped), name,
             "".join(f", {k}={v!r}" for k, v in kwargs.items()))  # fmt: skip
    return meta


def _config_from_model_states(path: Path):
    state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return from_dict(state["config"])


def load_timm_encoder(out_dir: str | Path):
    """The exported encoder as a timm model (strict load), for evaluation and tests."""
    import timm
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "export.json").read_text())
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(out_dir / "encoder.safetensors")), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--step", type=int, help="export this step's checkpoint (default: the newest complete one)")
    args = ap.parse_args(argv)
    try:
        export(args.run_dir, args.out_dir, args.step)
    except (ExportError, ckpt.CheckpointError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
