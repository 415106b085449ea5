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
    from engine.config.paths import resolve_repo_path

    path = resolve_repo_path(path)  # the repository's ds_configs/ wherever the command runs from
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


def _decide_precision(setting: str, device_type: str, trained_in: str | None, cpu_bf16: bool) -> tuple[str, str, str]:
    """(precision, reason for the log, warning or "") for ``engine.precision``: one decision, which
    ``resolve_precision`` and ``precision_reason`` both read."""
    if setting in PRECISIONS:
        warn = ""
        if trained_in in PRECISIONS and trained_in != setting:
            warn = f"engine.precision={setting}: resuming a run trained in {trained_in}"
        return setting, f"engine.precision={setting}", warn
    if trained_in in PRECISIONS:
        return trained_in, f"engine.precision=auto: the checkpoint it resumes was trained in {trained_in}", ""
    if device_type == "cuda":
        return "bf16", "engine.precision=auto: a CUDA device", ""
    if cpu_bf16:
        return "bf16", "engine.precision=auto: this CPU has native bf16 arithmetic (AVX512-BF16 or AMX)", ""
    return (
        "fp32",
        "engine.precision=auto: this CPU has no native bf16 arithmetic",
        (
            "engine.precision=auto: this CPU has no native bf16 arithmetic (no AVX512-BF16 or AMX), where bf16 "
            "matmuls run about 10x slower; training in fp32 (engine.precision=bf16 forces bf16)"
        ),
    )


def resolve_precision(setting: str, device_type: str, trained_in: str | None, cpu_bf16: bool) -> tuple[str, str]:
    """(precision, why) for ``engine.precision``: ``bf16`` and ``fp32`` as given; ``auto`` keeps the
    precision a resumed checkpoint was trained in, else bf16 on CUDA or a CPU with native bf16, else fp32.
    ``why`` is empty when nothing needs saying."""
    precision, _, warn = _decide_precision(setting, device_type, trained_in, cpu_bf16)
    return precision, warn


def precision_reason(setting: str, device_type: str, trained_in: str | None, cpu_bf16: bool) -> str:
    """Why the run trains in the precision ``resolve_precision`` chose, for the first lines of its log."""
    return _decide_precision(setting, device_type, trained_in, cpu_bf16)[1]


def resolve_ds_config(cfg: Config, plan: RunPlan, precision: str = "bf16") -> dict:
    """The DeepSpeed dict for this run: the JSON plus batch sizes, cross-checked, in ``precision``
    (the resolved ``engine.precision``: bf16 or fp32)."""
    ds = load_ds_config(cfg.engine.ds_config)
    apply_ds_overrides(ds, cfg.engine.ds_overrides)
    said = ds.get("bf16", {}).get("enabled")
    if said is not None and not isinstance(said, bool):
        raise ConfigError(f"bf16.enabled={said!r}: true or false; the precision is set with engine.precision")
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
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        raise ConfigError(f"gradient_clipping={clip!r} (engine.ds_config / engine.ds_overrides): a number, 0 = off")
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization={zero!r} (engine.ds_config / engine.ds_overrides): a section")
    if zero.get("stage", 0) not in (1, 2):
        raise ConfigError(
            f"zero_optimization.stage={zero.get('stage', 0)!r}: this stack runs ZeRO stages 1 and 2 (the non-finite "
            "guard reads their gradient partitions; ZeRO-3 saves nothing for models of these sizes)"
        )
    if clip > 0 and not zero.get("compute_grad_norm", True):
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


# DeepSpeed sections that its constants modules do not all name; the constants add the rest. A key
# close to one of these but not one of them is a typo (DeepSpeed itself ignores unknown keys).
KNOWN_SECTIONS = (
    "zero_optimization", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb",
    "csv_monitor", "compile", "aio", "elasticity", "autotuning", "amp", "sparse_gradients", "pipeline",
    "data_efficiency", "curriculum_learning", "gradient_clipping", "bf16", "fp16", "checkpoint",
)  # fmt: skip


def check_ds_config(cfg: Config, plan: RunPlan) -> None:
    """Before launch: the DeepSpeed config this run would build passes our rules and DeepSpeed's own
    validation (built with a world of one, whose batch arithmetic agrees), and no override names a key
    that is a typo of a known one. Raises ConfigError naming the field."""
    import difflib

    precision = "fp32" if cfg.engine.precision == "fp32" else "bf16"
    ds = resolve_ds_config(cfg, plan, precision)
    known = _known_keys()
    for item in cfg.engine.ds_overrides:
        top = item.partition("=")[0].split(".")[0]
        close = difflib.get_close_matches(top, known, n=1, cutoff=0.8)
        if top not in known and close:
            raise ConfigError(f"engine.ds_overrides: {top!r} is not a DeepSpeed setting; did you mean {close[0]!r}?")
    probe = {**ds, "train_batch_size": plan.micro_batch * plan.grad_accum}
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(probe)
    except Exception as err:  # pydantic's ValidationError, DeepSpeed's asserts and ValueErrors
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
        raise ConfigError(
            f"{cfg.engine.ds_config} with engine.ds_overrides={cfg.engine.ds_overrides}: DeepSpeed refuses it: "
            + " | ".join(lines[:3])[:400]
        ) from None


def _known_keys() -> set[str]:
    import deepspeed.runtime.constants as constants

    keys = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    return keys | set(KNOWN_SECTIONS)
