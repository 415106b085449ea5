"""The configured training loader, by name: DALI (the default) or the PyTorch fallback."""

from __future__ import annotations

from data_pipeline.loaders.base import EpochLoader, LoaderSpec
from engine.errors import DataError


def make_loader(kind: str, spec: LoaderSpec, state: dict | None = None) -> EpochLoader:
    """Build the configured loader ("dali" or "torch"), optionally restored from ``state``."""
    if kind == "dali":
        from data_pipeline.loaders.dali_loader import DaliLoader

        return DaliLoader(spec, state)
    if kind == "torch":
        from data_pipeline.loaders.torch_loader import TorchLoader

        return TorchLoader(spec, state)
    raise DataError(f"data.loader={kind!r}: allowed values are ['dali', 'torch']")
