"""Paths a config names: user paths resolve against the caller's directory; the shipped DeepSpeed
JSON (``ds_configs/``) is also found relative to the repository."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def resolve_repo_path(value: str) -> Path:
    """A path as given, or else relative to the repository (the shipped ds_configs/)."""
    p = Path(value)
    return p if p.exists() or p.is_absolute() else REPO / p
