"""Do a validation set's labels mean what the training set's mean? Checked before any training.

Two shard folders agree when their ``classes.json`` files (class name -> label) are the same. When
they name the same classes under other numbers (two folders sharded without ``--classes``), the
validation labels are mapped by name, and the caller says so; a validation class the training set
does not have, or a label outside the classifier's head, is an error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.errors import DataError


def read_classes(root: str | Path) -> dict[str, int] | None:
    path = Path(root) / "classes.json"
    if not path.is_file():
        return None
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a class name -> label mapping ({err})") from None


def validation_label_map(
    train_root: str | Path, val_root: str | Path, val_labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray | None, str]:
    """(a lookup table val label -> train label, or None when they agree; a note for the log).
    Raises DataError when the validation labels cannot be scored by a head of ``num_classes``."""
    train, val = read_classes(train_root) or None, read_classes(val_root) or None  # {} (unlabeled): none
    mapping = None
    note = ""
    if train is not None and val is not None and train != val:
        unknown = sorted(set(val) - set(train))
        if unknown:
            raise DataError(
                f"data.val_shards={str(val_root)!r}: classes {unknown[:5]} are not in the training shards' "
                f"classes.json ({len(train)} classes); shard the validation set with --classes "
                f"{Path(train_root) / 'classes.json'}"
            )
        mapping = np.full(max(val.values()) + 1, -1, dtype=np.int64)
        for name, label in val.items():
            mapping[label] = train[name]
        note = (
            f"the validation shards number the classes differently from the training shards; their labels are "
            f"mapped by class name ({sum(val[n] != train[n] for n in val)} of {len(val)} classes renumbered)"
        )
    labels = val_labels if mapping is None else mapping[np.clip(val_labels, 0, len(mapping) - 1)]
    bad = (labels < 0) | (labels >= num_classes)
    if mapping is not None:
        bad |= (val_labels < 0) | (val_labels >= len(mapping))
    if bad.any():
        shown = sorted({int(v) for v in val_labels[bad]})[:5]
        raise DataError(
            f"data.val_shards={str(val_root)!r}: {int(bad.sum())} validation samples have labels {shown} outside "
            f"the classifier's {num_classes} classes (0..{num_classes - 1}); fix the labels or set "
            f"finetune.num_classes"
        )
    return mapping, note
