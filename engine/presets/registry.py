"""The preset table: named functions that return a whole ``Config``."""

from __future__ import annotations

from collections.abc import Callable

from engine.config import Config
from engine.errors import ConfigError

_PRESETS: dict[str, Callable[[], Config]] = {}


def preset(name: str):
    def wrap(fn: Callable[[], Config]) -> Callable[[], Config]:
        _PRESETS[name] = fn
        return fn

    return wrap


def get_preset(name: str) -> Config:
    if name not in _PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown preset; available: {sorted(_PRESETS)}")
    cfg = _PRESETS[name]()
    cfg.preset = name
    return cfg


def list_presets() -> list[str]:
    return sorted(_PRESETS)
