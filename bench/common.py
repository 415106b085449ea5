"""Shared pieces of the benchmarks: environment record, timing, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("deepspeed", "timm", "nvidia.dali", "webdataset", "torchvision"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            out[name.replace("nvidia.", "")] = getattr(mod, "__version__", "?")
        except Exception:  # not installed here (e.g. DALI on the lent GPU machine)
            out[name.replace("nvidia.", "")] = "absent"
    return out


def device_info() -> dict:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "device": torch.cuda.get_device_name(0),
            "memory_gb": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}


def header(name: str, **extra) -> dict:
    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device_info(),
        "versions": versions(),
        **extra,
    }


def write_json(path: str | Path | None, obj: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], warmup: int, iters: int) -> dict:
    """Median and spread of per-step wall time (device-synchronized around each step)."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": iters}


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory() -> None:
    """Release memory and compiled graphs between configurations (a fresh dynamo cache per
    configuration: no cache-size limit is hit across many model instances; inductor's on-disk
    cache still makes repeated compiles of identical blocks cheap)."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Budget:
    """Wall-clock budget for a whole benchmark run: later configurations are skipped, not cut."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds if seconds > 0 else float("inf")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() <= 0
