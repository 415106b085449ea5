"""The DeepSpeed config of a run: the JSON holds DeepSpeed knobs only; batch sizes come from ours.

``train_batch_size = micro_batch * grad_accum * world_size`` is filled in here from the run plan;
a JSON that sets any of the three to something else is refused rather than silently overriding
the run's batch size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.config import Config, RunPlan
from engine.errors import ConfigError

log = logging.getLogger(__name__)

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"engine.ds_config={str(path)!r}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.ds_config={str(path)!r}: invalid JSON ({err})") from None


def resolve_ds_config(cfg: Config, plan: RunPlan) -> dict:
    """The DeepSpeed dict for this run: the JSON plus batch sizes, cross-checked."""
    ds = load_ds_config(cfg.engine.ds_config)
    apply_ds_overrides(ds, cfg.engine.ds_overrides)
    want = {
        "train_batch_size": cfg.data.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
    }
    for key, value in want.items():
        given = ds.get(key, "auto")
        if given not in ("auto", value):
            raise ConfigError(
                f"{cfg.engine.ds_config}: {key}={given} disagrees with the run's batch settings ({key}={value} "
                f"from data.global_batch={cfg.data.global_batch}, micro-batch {plan.micro_batch}, "
                f"world size {plan.world_size}); remove it from the JSON (batch sizes are set in the config)"
            )
        ds[key] = value
    if not ds.get("bf16", {}).get("enabled", False):
        log.warning("%s: bf16 is not enabled; training runs in fp32", cfg.engine.ds_config)
    zero = ds.get("zero_optimization", {})
    if ds.get("gradient_clipping", 0.0) > 0 and not zero.get("compute_grad_norm", True):
        raise ConfigError(
            f"{cfg.engine.ds_config}: gradient_clipping > 0 needs zero_optimization.compute_grad_norm=true "
            "(the recipe, like MAE's, does not clip: the norm is then not computed, which saves a pass and a sync)"
        )
    ds.setdefault("steps_per_print", 10**9)
    return ds


def apply_ds_overrides(ds: dict, overrides: list[str]) -> None:
    """``a.b.c=value`` strings (values parsed as JSON, else kept as strings) set into the DeepSpeed dict."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"engine.ds_overrides: {item!r} is not key.path=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = ds
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"engine.ds_overrides: {path!r}: {key} is not a section of the DeepSpeed config")
        if leaf in BATCH_KEYS:
            raise ConfigError(f"engine.ds_overrides: {leaf} comes from data.global_batch and data.micro_batch")
        node[leaf] = value
