"""Export a run for use elsewhere: a ZeRO-2 checkpoint -> timm safetensors + export.json.

    python -m engine.tools.export RUN_DIR OUT_DIR [--step N]

A pretraining run gives ``encoder.safetensors``: the encoder only (decoders are pretraining heads;
teachers are never in a checkpoint), loadable into ``timm.create_model(name, num_classes=0)``.
A fine-tuning or linear-probing run gives ``model.safetensors``: the whole classifier (a linear
probe's BatchNorm folded into its head), loadable into ``timm.create_model(name, **kwargs)``.
Weights are the float32 master weights consolidated from every rank's ZeRO-2 partition by
DeepSpeed's ``zero_to_fp32``, not the bf16 copies the model trained with. ``export.json`` records
the timm name and keyword arguments, the input normalization and evaluation transform, the source
checkpoint and step, the config, what was dropped and the file's SHA-256:

    import json, timm, safetensors.torch
    meta = json.load(open("OUT_DIR/export.json"))
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file(f"OUT_DIR/{meta['weights']}"), strict=True)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("engine.tools.export")

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # data_pipeline.loader's, without importing the data stack
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_target(arch: str, img_size: int) -> tuple[str, dict]:
    from engine.models.registry import get_variant

    spec = get_variant(arch)
    kwargs = dict(spec.timm_kwargs)
    if img_size != spec.img_size:
        kwargs["img_size"] = img_size
    return spec.timm_name, kwargs


def split_encoder(state: dict) -> tuple[dict, list[str]]:
    """Full pretraining-model state dict -> (encoder weights under timm's names, the keys dropped)."""
    import torch

    encoder, dropped = {}, []
    for k, v in state.items():
        if k.startswith("encoder."):
            encoder[k[len("encoder.") :]] = v.detach().to(torch.float32).contiguous()
        else:
            dropped.append(k)
    return encoder, dropped


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> dict:
    from safetensors.torch import save_file

    from engine.config import from_dict, plan_run, to_dict
    from engine.loop import checkpoint as ckpt
    from engine.targets.teachers import file_sha256
    from engine.weights import consolidated_state, find_checkpoint

    out_dir = Path(out_dir)
    path = find_checkpoint(Path(run_dir), step)
    marker = ckpt.read_marker(path)
    cfg = from_dict(marker["config"])
    state = consolidated_state(path)
    plan = plan_run(cfg)
    img = plan.img_size
    if cfg.task == "pretrain":
        weights, dropped = split_encoder(state)
        name, kwargs = timm_target(cfg.model.arch, img)
        kwargs["num_classes"] = 0
        kind, file, note = "encoder", "encoder.safetensors", "decoders are pretraining heads; teachers are never saved"
    else:
        weights, name, kwargs = _classifier(cfg, plan, marker, state)
        dropped, kind, file = [], "classifier", "model.safetensors"
        note = "a linear probe's BatchNorm is folded into its head"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / file), metadata={"timm_model": name, "source_step": str(marker["step"])})
    crop = cfg.finetune.eval_crop if cfg.task != "pretrain" else 0.875
    meta = {
        "kind": kind,
        "weights": file,
        "timm_model": name,
        "timm_kwargs": kwargs,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "eval_transform": {"resize_short_side": round(img / crop), "center_crop": img, "interpolation": "bicubic"},
        "source": str(path.resolve()),
        "source_step": marker["step"],
        "task": cfg.task,
        "config": to_dict(cfg),
        "tensors": len(weights),
        "dropped_keys": sorted(dropped),
        "dropped_note": note,
        "sha256": {file: file_sha256(out_dir / file)},
    }
    (out_dir / "export.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "exported %d %s tensors (step %d) to %s%s; load with timm.create_model(%r, pretrained=False%s)",
        len(weights),
        kind,
        marker["step"],
        out_dir / file,
        f"; dropped {len(dropped)} decoder tensors" if dropped else "",
        name,
        "".join(f", {k}={v!r}" for k, v in kwargs.items()),
    )
    return meta


def _classifier(cfg, plan, marker: dict, state: dict) -> tuple[dict, str, dict]:
    from engine.errors import CheckpointError
    from engine.models.classifier import build_classifier, export_state

    ref = marker.get("classifier")
    if ref is None:
        raise CheckpointError(f"{marker.get('step')}: a {cfg.task} checkpoint without its classifier record")
    model = build_classifier(cfg, plan, ref["num_classes"])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return export_state(model.eval()), ref["timm_model"], dict(ref["timm_kwargs"])


def load_exported(out_dir: str | Path):
    """The exported model as a timm model (strict load), as a user would load it."""
    import timm
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "export.json").read_text())
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(out_dir / meta.get("weights", "encoder.safetensors"))), strict=True)
    return model.eval()


load_timm_encoder = load_exported  # the name the encoder-only export used


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m engine.tools.export",
        description="Export a pretraining run's encoder, or a fine-tuning run's classifier, as timm safetensors "
        "with export.json (timm name, kwargs, normalization, evaluation transform, provenance).",
    )
    ap.add_argument("run_dir", help="a run folder (pretraining, fine-tuning or linear probing)")
    ap.add_argument("out_dir", help="where encoder.safetensors or model.safetensors and export.json go")
    ap.add_argument("--step", type=int, help="export this step's checkpoint (default: the newest complete one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from engine.errors import StackError
    from engine.serialization import load_guard

    try:
        with load_guard():
            export(args.run_dir, args.out_dir, args.step)
    except StackError as err:
        print(f"export: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
