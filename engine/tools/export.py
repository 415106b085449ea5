"""Export a run for use elsewhere: a ZeRO-2 checkpoint -> a folder timm, Hugging Face and MAE read.

    python -m engine.tools.export RUN_DIR OUT_DIR [--step N] [--format timm|mae]

``OUT_DIR`` gets, for every run:

* ``model.safetensors``: float32 weights in timm's ``VisionTransformer`` names. A pretraining run
  gives its encoder (decoders are pretraining heads; teachers are never in a checkpoint), loadable
  with ``num_classes=0``; a fine-tuning or linear-probing run gives the whole classifier (a linear
  probe's BatchNorm folded into its head). They are the master weights consolidated from every
  rank's ZeRO-2 partition by DeepSpeed's ``zero_to_fp32``, not the bf16 copies the model trained with.
* ``config.json``: what timm and the Hugging Face hub read (``architecture``, ``model_args``,
  ``pretrained_cfg`` with mean, std, input size, crop and interpolation, ``num_classes``), written by
  timm's own ``save_config_for_hf``: ``timm.create_model("local-dir:OUT_DIR", pretrained=True)``
  builds and loads the model, and ``timm.data.resolve_data_config({}, model=model)`` returns the
  statistics the model was trained with, so timm's ``train.py``/``validate.py`` normalize correctly.
* ``export.json``: our record (timm name and keyword arguments, a description of the architecture,
  normalization, evaluation transform, source checkpoint and step, config, dropped keys, SHA-256).

``--format mae`` also writes ``mae_checkpoint.pth`` = ``{'model': state_dict}``, what the official
MAE and DeepMIM ``main_finetune.py --finetune`` and ``main_linprobe.py`` read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("engine.tools.export")

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # data_pipeline.loaders.base's, without importing the data stack
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = "model.safetensors"
MAE_FILE = "mae_checkpoint.pth"


def timm_target(arch: str, img_size: int) -> tuple[str, dict]:
    from engine.models.registry import get_variant

    spec = get_variant(arch)
    kwargs = dict(spec.timm_kwargs)
    if img_size != spec.img_size:
        kwargs["img_size"] = img_size
    return spec.timm_name, kwargs


def describe_arch(arch: str, img_size: int) -> str:
    """What the exported model is, whatever timm name it is built from."""
    from engine.models.registry import get_variant

    s = get_variant(arch)
    return f"ViT patch {s.patch_size}, width {s.dim}, depth {s.depth}, {s.heads} heads, {img_size} px ({s.name})"


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


def _readable(path: Path) -> None:
    """Files of an export are as readable as the rest of the run folder (the umask decides)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, fmt: str = "timm") -> dict:
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    from data_pipeline.dataset.hashing import sha256_file
    from engine.config import from_dict, plan_run, to_dict
    from engine.run_folder import checkpoints as ckpt
    from engine.weights.sources import consolidated_state, find_checkpoint

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
        kind, note = "encoder", "decoders are pretraining heads; teachers are never saved"
        crop = 0.875
    else:
        weights, name, kwargs = _classifier(cfg, plan, marker, state)
        dropped, kind = [], "classifier"
        note = "a linear probe's BatchNorm is folded into its head"
        crop = cfg.finetune.eval_crop
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(weights, strict=True)  # what a user's strict load will see
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / WEIGHTS), metadata={"timm_model": name, "source_step": str(marker["step"])})
    data = {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "input_size": (3, img, img),
        "crop_pct": crop,
        "interpolation": "bicubic",
        "crop_mode": "center",
    }
    save_config_for_hf(model, str(out_dir / "config.json"), model_args=kwargs, data_config=data)
    names = (marker.get("classifier") or {}).get("label_names") if kind == "classifier" else None
    describe_export(out_dir / "config.json", cfg, marker["step"], kind, names)
    files = [WEIGHTS, "config.json"]
    if fmt == "mae":
        torch.save({"model": weights}, out_dir / MAE_FILE)
        files.append(MAE_FILE)
    meta = {
        "kind": kind,
        "weights": WEIGHTS,
        "timm_model": name,
        "timm_kwargs": kwargs,
        "architecture": describe_arch(cfg.model.arch, img),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "eval_transform": {"resize_short_side": round(img / crop), "center_crop": img, "interpolation": "bicubic"},
        "source": str(path.resolve()),
        "source_step": marker["step"],
        "task": cfg.task,
        "config": to_dict(cfg),
        "tensors": len(weights),
        **({"label_names": names} if names else {}),
        "dropped_keys": sorted(dropped),
        "dropped_note": note,
        "sha256": {f: sha256_file(out_dir / f) for f in files},
    }
    (out_dir / "export.json").write_text(json.dumps(meta, indent=2))
    for f in [*files, "export.json"]:
        _readable(out_dir / f)
    log.info(
        "exported %d %s tensors (step %d) to %s%s; load with timm.create_model('local-dir:%s', pretrained=True)",
        len(weights),
        kind,
        marker["step"],
        out_dir / WEIGHTS,
        f"; dropped {len(dropped)} decoder tensors" if dropped else "",
        out_dir,
    )
    return meta


# timm fills pretrained_cfg from the default tag of the architecture it builds: provenance of another
# model (its tag, license, hub id, paper). Those keys go; ours say what this file is.
FOREIGN_KEYS = ("tag", "license", "hf_hub_id", "url", "origin_url", "paper_ids", "paper_name", "notes", "file")


def describe_export(path: Path, cfg, step: int, kind: str, label_names: list[str] | None) -> None:
    conf = json.loads(path.read_text())
    pcfg = {k: v for k, v in conf.get("pretrained_cfg", {}).items() if k not in FOREIGN_KEYS}
    what = "pretrained encoder" if kind == "encoder" else f"{cfg.task} classifier"
    pcfg["description"] = f"DeepMIM {what} ({cfg.model.arch}, preset {cfg.preset or 'none'}), step {step}"
    if label_names:
        pcfg["label_names"] = list(label_names)
    conf["pretrained_cfg"] = pcfg
    path.write_text(json.dumps(conf, indent=2))


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
    model.load_state_dict(load_file(str(out_dir / meta.get("weights", WEIGHTS))), strict=True)
    return model.eval()


load_timm_encoder = load_exported  # the name the encoder-only export used


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m engine.tools.export",
        description="Export a pretraining run's encoder, or a fine-tuning run's classifier, as a folder timm and "
        "Hugging Face read (model.safetensors, config.json) with export.json (provenance).",
    )
    ap.add_argument("run_dir", help="a run folder (pretraining, fine-tuning or linear probing)")
    ap.add_argument("out_dir", help="where model.safetensors, config.json and export.json go")
    ap.add_argument("--step", type=int, help="export this step's checkpoint (default: the newest complete one)")
    ap.add_argument(
        "--format",
        choices=("timm", "mae"),
        default="timm",
        help="timm (default): the files above; "
        "mae: also mae_checkpoint.pth ({'model': state_dict}) for MAE's and DeepMIM's main_finetune.py",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from engine.errors import StackError
    from engine.weights.safe_load import load_guard

    try:
        with load_guard():
            export(args.run_dir, args.out_dir, args.step, args.format)
    except StackError as err:
        print(f"export: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
