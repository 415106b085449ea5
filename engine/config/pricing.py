"""What a planned run costs: checkpoint size and count on disk, and time and GPU-hours from the GPU
measurements committed in ``bench/results/`` (named with the GPU and date they were measured on).

The checkpoint size follows ZeRO-2's files: the module's weights in bf16 (2 bytes per parameter the
module holds) and, over all ranks' optimizer partitions, the fp32 master weights and Adam's two
moments (12 bytes per trainable parameter); frozen teachers are never saved. Measured on CPU for
ViT-B DeepMIM (bench/results/checkpoint_cpu.json): 1.95 GB, this estimate 1.92 GB.

Time uses the model-step rate measured for the same model and target kind on one GPU (the default
compiled path), times the GPU count: perfect scaling and a data pipeline that keeps up, which the
output says. Another model or target kind: "no measurement", never a guess.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.config.paths import resolve_repo_path
from engine.config.plan import RunPlan
from engine.config.schema import Config

RESULTS = "bench/results"
DEFAULT_PATH_CONFIG = "fused-compile"  # bench.model_step's name for the default training path


def checkpoint_bytes(cfg: Config, plan: RunPlan) -> int:
    module = plan.trainable_params + (plan.frozen_params if cfg.task != "pretrain" else 0)
    return 2 * module + 12 * plan.trainable_params


def measured_rate(arch: str, target: str, root: Path | None = None) -> dict | None:
    """The best committed default-path measurement for (arch, target), or None."""
    root = root or resolve_repo_path(RESULTS)
    best = None
    for f in sorted(root.glob("model_step_*.json")):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for r in doc.get("results", []):
            ok = r.get("status") == "ok" and r.get("config") == DEFAULT_PATH_CONFIG and r.get("img_per_s")
            same = r.get("arch") == arch and r.get("target") == target
            if ok and same and (best is None or r["img_per_s"] > best["img_per_s"]):
                best = {
                    "img_per_s": float(r["img_per_s"]),
                    "batch": r.get("batch"),
                    "device": doc.get("device", "unknown GPU"),
                    "date": str(doc.get("date", ""))[:10],
                    "file": f"{RESULTS}/{f.name}",
                }
    return best


def price(cfg: Config, plan: RunPlan) -> dict[str, Any]:
    """The price section of ``--print-config``."""
    size = checkpoint_bytes(cfg, plan)
    out: dict[str, Any] = {"checkpoint_gb": round(size / 1e9, 2)}
    if plan.stop_step is not None:
        interval = max(cfg.checkpoint.interval, 1)
        saves = plan.stop_step // interval + (1 if plan.stop_step % interval else 0)
        kept = min(saves, cfg.checkpoint.keep_last) if cfg.checkpoint.keep_last > 0 else saves
        out.update(checkpoints_saved=saves, checkpoints_kept=kept, checkpoint_disk_gb=round(kept * size / 1e9, 1))
        if cfg.checkpoint.keep_every_epochs:
            out["note_disk"] = "plus one checkpoint kept every checkpoint.keep_every_epochs epochs"
    kind = cfg.target.kind if cfg.task == "pretrain" else cfg.task
    rate = measured_rate(plan.arch, kind) if cfg.task == "pretrain" else None
    if rate is None:
        out["time"] = f"no measurement for {plan.arch} with target {kind} in {RESULTS}/"
        return out
    out["measured"] = (
        f"{rate['img_per_s']:.0f} img/s per GPU on {rate['device']} ({rate['date']}, micro-batch {rate['batch']}, "
        f"{rate['file']}; the model step alone: assumes the data keeps up and perfect scaling)"
    )
    if plan.stop_step is not None and plan.world_size:
        images = plan.stop_step * cfg.data.global_batch
        hours = images / (rate["img_per_s"] * plan.world_size) / 3600
        out.update(hours=round(hours, 1), gpu_hours=round(hours * plan.world_size))
    return out
