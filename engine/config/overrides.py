"""Config <-> plain dicts, and ``--set section.field=value`` overrides parsed by field type."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from engine.config.schema import Config
from engine.errors import ConfigError


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output; unknown keys are an error (typos must not pass)."""
    return _build(Config, data, "")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix or 'config'}: unknown field(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` strings in order; values are parsed by the field's type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        path, raw = item.split("=", 1)
        set_field(cfg, path.strip(), raw.strip())
    return cfg


def set_field(cfg: Config, path: str, raw: str) -> None:
    parts = path.split(".")
    obj: Any = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:depth])} is not a section; cannot set {path}")
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            where = ".".join(parts[:depth]) or "config"
            raise ConfigError(f"{path}: {where} has no field {name!r}; fields: {names}")
        if depth == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[name]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{path} is a section; set one of its fields")
            setattr(obj, name, parse_value(raw, tp, path))
        else:
            obj = getattr(obj, name)


def list_items(raw: str) -> list[Any]:
    """A list from the command line, written any of the ways users write one: ``a,b``, ``[a,b]``,
    ``[1, 2]`` or JSON (``["a", "b"]``); items are stripped, empty ones dropped."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            items = json.loads(text)
            if isinstance(items, list):
                return items
        except json.JSONDecodeError:
            pass  # [a,b] without quotes: the brackets are only the user's way of saying "a list"
        text = text[1:-1]
    return [s.strip().strip("'\"") for s in text.split(",") if s.strip()]


def parse_value(raw: str, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            return [parse_value(str(v), item_tp, path) for v in list_items(raw)]
        if origin in (typing.Union, types.UnionType):
            raise ValueError("union fields are not settable from the command line")
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot parse {raw!r} as {tp}: {err}") from None
    raise ConfigError(f"{path}: unsupported field type {tp}")
