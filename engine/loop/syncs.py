"""Counting the host-device syncs of the training thread (``log.sync_debug``): the goal is none on the
steps that do not log, the whole step counted (``next(loader)``, the step, its bookkeeping).

* On CUDA, torch's own sync debug mode reports every synchronizing call (``.item()``, a copy from
  pageable memory, ``nonzero``, ...) as a warning; the counter catches them.
* On a CPU nothing waits for a device, so ``SyncSpy`` counts what *would* wait on a GPU: a tensor read
  by the host (``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``bool``/``int``/``float`` of a
  tensor) and explicit synchronizations, made from the training thread, on tensors that are not host
  buffers by design (``host``: the guard's ring of flags). The unit tier runs it in-process.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Iterator

import torch


class SyncCounter:
    def __init__(self) -> None:
        self.count = 0
        self.sites: list[str] = []  # where the first few were made (file:line)

    def _note(self, site: str) -> None:
        self.count += 1
        if len(self.sites) < 5:
            self.sites.append(site)

    @contextlib.contextmanager
    def window(self, enabled: bool = True) -> Iterator[None]:
        yield


class CudaSyncCounter(SyncCounter):
    """torch's sync debug mode for the window: synchronizing calls are counted, not fatal."""

    @contextlib.contextmanager
    def window(self, enabled: bool = True) -> Iterator[None]:
        if not enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message).lower():
                self._note(f"{w.filename}:{w.lineno}")


class SyncSpy(SyncCounter):
    """The calls that wait for the device on a GPU, counted on a CPU (see the module's docstring)."""

    READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__")

    def __init__(self) -> None:
        super().__init__()
        self.host: set[int] = set()  # ids of host buffers by design (alive for the run): reading them is free
        self._thread = threading.get_ident()

    def _wrap(self, original, name: str):
        spy = self

        def counted(t, *args, **kwargs):
            if threading.get_ident() == spy._thread and id(t) not in spy.host:
                frame = sys._getframe(1)
                spy._note(f"{frame.f_code.co_filename}:{frame.f_lineno} ({name})")
            return original(t, *args, **kwargs)

        return counted

    @contextlib.contextmanager
    def window(self, enabled: bool = True) -> Iterator[None]:
        if not enabled:
            yield
            return
        saved = {name: getattr(torch.Tensor, name) for name in self.READS}
        sync = torch.cuda.synchronize
        for name, original in saved.items():
            setattr(torch.Tensor, name, self._wrap(original, name))
        torch.cuda.synchronize = lambda *a, **k: self._note("torch.cuda.synchronize")
        try:
            yield
        finally:
            for name, original in saved.items():
                setattr(torch.Tensor, name, original)
            torch.cuda.synchronize = sync


def sync_counter(device: torch.device, enabled: bool) -> SyncCounter:
    if not enabled:
        return SyncCounter()
    return CudaSyncCounter() if device.type == "cuda" else SyncSpy()
