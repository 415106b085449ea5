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


PRECISIONS = ("bf16", "fp32")


def native_cpu_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); torch emulates them
    otherwise, about 10-30x slower than fp32 (measured on an AVX2-only AMD EPYC)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str, device_type: str, trained_in: str | None, cpu_bf16: bool) -> tuple[str, str]:
    """(precision, why) for ``engine.precision``: ``bf16`` and ``fp32`` as given; ``auto`` keeps the
    precision a resumed checkpoint was trained in, else bf16 on CUDA or a CPU with native bf16, else fp32.
    ``why`` is empty when nothing needs saying."""
    if setting in PRECISIONS:
        if trained_in in PRECISIONS and trained_in != setting:
            return setting, f"engine.precision={setting}: resuming a run trained in {trained_in}"
        return setting, ""
    if trained_in in PRECISIONS:
        return trained_in, ""
    if device_type == "cuda" or cpu_bf16:
        return "bf16", ""
    return "fp32", (
        "engine.precision=auto: this CPU has no native bf16 arithmetic (no AVX512-BF16 or AMX), where bf16 "
        "matmuls run about 10x slower; training in fp32 (engine.precision=bf16 forces bf16)"
    )


def resolve_ds_config(cfg: Config, plan: RunPlan, precision: str = "bf16") -> dict:
    """The DeepSpeed dict for this run: the JSON plus batch sizes, cross-checked, in ``precision``
    (the resolved ``engine.precision``: bf16 or fp32)."""
    ds = load_ds_config(cfg.engine.ds_config)
    apply_ds_overrides(ds, cfg.engine.ds_overrides)
    said = ds.get("bf16", {}).get("enabled")
    if said is False and precision == "bf16" and cfg.engine.precision == "bf16":
        raise ConfigError(
            f"{cfg.engine.ds_config} (with engine.ds_overrides) disables bf16 while engine.precision=bf16: set "
            "engine.precision=fp32 instead (the precision is chosen there)"
        )
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
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
