"""Step telemetry without per-step host-device syncs.

Losses are summed on the device and read only at log steps. Phase times are host timers on CPU
(where work is synchronous) and CUDA events on GPU, whose elapsed times are read only at log
steps, so steps that do not log never wait for the device.
"""

from __future__ import annotations

import time

import torch


class PhaseTimer:
    """Accumulates per-phase times: host clock on CPU, CUDA events (read lazily) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._host: dict[str, float] = {}
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        self._open: dict[str, object] = {}

    def start(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open[name] = ev
        else:
            self._open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        begin = self._open.pop(name)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.setdefault(name, []).append((begin, end))
        else:
            self._host[name] = self._host.get(name, 0.0) + time.perf_counter() - begin

    def add_host(self, name: str, seconds: float) -> None:
        self._host[name] = self._host.get(name, 0.0) + seconds

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect; synchronizes once on GPU."""
        out = dict(self._host)
        if self._events:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                out[name] = out.get(name, 0.0) + sum(b.elapsed_time(e) for b, e in pairs) / 1000.0
        self._host.clear()
        self._events.clear()
        return out


class MetricMeter:
    """Sums of the loss and the task's metric vector on the device; one read per log interval."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.parts: torch.Tensor | None = None
        self.count = 0

    def add(self, total: torch.Tensor, parts: torch.Tensor) -> None:
        total, parts = total.detach().float(), parts.detach().float().reshape(-1)
        self.total = total if self.total is None else self.total + total
        self.parts = parts if self.parts is None else self.parts + parts
        self.count += 1

    def mean_across_ranks(self) -> tuple[float, list[float]]:
        """Average over steps and ranks (one all-reduce and one device read)."""
        if self.total is None:
            return float("nan"), []
        vec = torch.cat([self.total.reshape(1), self.parts]) / self.count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vec)
            vec /= torch.distributed.get_world_size()
        values = vec.tolist()
        self.total, self.parts, self.count = None, None, 0
        return values[0], values[1:]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    except (ImportError, OSError):
        return float("nan")
