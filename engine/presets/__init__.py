"""Named presets: plain functions returning a ``Config``, one module per stage.

``get_preset(name)`` and ``list_presets()`` see every stage's presets; importing this package
registers them.
"""

from engine.presets import finetune_recipes, pretrain_recipes  # noqa: F401  (register their presets)
from engine.presets.registry import get_preset, list_presets, preset

__all__ = ["get_preset", "list_presets", "preset"]
