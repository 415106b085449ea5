"""What a resume may change: settings that make a checkpoint meaningless are refused, settings that
change the training are warned about, bookkeeping changes pass. ``fingerprint`` hashes what
shapes the training."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from engine.config.overrides import to_dict
from engine.config.schema import Config

INCOMPATIBLE = (
    "task",
    "model.arch",
    "model.img_size",
    "model.taps",
    "model.decoder_dim",
    "model.decoder_depth",
    "model.decoder_heads",
    "target.kind",
    "target.feature_dim",
    "data.global_batch",
)
# Why, where it is not obvious.
REASONS = {
    "data.global_batch": "the step count, the accumulation boundaries and the lr schedule are defined by it; resume "
    "with the old value, or start a new run folder from this checkpoint's weights (init.pretrained or an export)",
}
# These only change bookkeeping, speed or logging: a resume with them changed is the same run.
HARMLESS_PREFIXES = (
    "log.",
    "checkpoint.",
    "engine.",
    "debug.",
    "preset",
    "run_dir",
    "data.num_threads",
    "data.decode_device",
    "data.micro_batch",
    "data.max_micro_batch",
    "data.loader",
    "model.fused_decoders",
    "model.decoder_attention",
    "model.qkv_layout",
    "fault.",
    "data.eval_batch",
    "schedule.max_steps",  # where this run stops, not the schedule's shape
    "data.on_change",
    "data.fetch_",  # how object storage is reached and waited for
    "data.cache_",
    "data.prefetch_shards",
    "data.s3_endpoint",
)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_for_resume(saved: Config, now: Config) -> tuple[list[str], list[str], list[str]]:
    """(incompatible, training-changing, harmless) differences, each as 'field: old -> new'."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(now))
    errors, changes, harmless = [], [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        if key in INCOMPATIBLE:
            errors.append(f"{line} ({REASONS[key]})" if key in REASONS else line)
        elif key.startswith(HARMLESS_PREFIXES):
            harmless.append(line)
        else:
            changes.append(line)
    return errors, changes, harmless


def fingerprint(cfg: Config) -> str:
    """Hash of every field that shapes the training (all but the harmless ones)."""

    flat = {k: v for k, v in _flatten(to_dict(cfg)).items() if not k.startswith(HARMLESS_PREFIXES)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]
