"""Which output of a classifier head a stored label is, for training and validation shards alike.
Decided before any training (the checks before launch and the task call the same functions).

* Training labels (``head_labels``): the head has ``finetune.num_classes`` outputs when it is set
  (every label must be below it); otherwise one per class of the training shards' ``classes.json``,
  or one per label when they are numbered 0..K-1. Labels that are not (integer labels indexed from
  existing tars, say {0, 7}) are mapped to 0..K-1 in sorted order, and the caller says so; the head's
  class names record which output is which.
* Validation labels (``validation_label_map``): two shard folders agree when their ``classes.json``
  files (class name -> label) are the same. When they name the same classes under other numbers (two
  folders sharded without ``--classes``), the validation labels are mapped by name. A validation class
  the training set does not have, or a label outside the head, is an error that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import DataError

if TYPE_CHECKING:
    from data_pipeline.dataset.table import SampleTable


def read_classes(root: str | Path) -> dict[str, int] | None:
    path = Path(root) / "classes.json"
    if not path.is_file():
        return None
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a class name -> label mapping ({err})") from None


@dataclass(frozen=True)
class HeadLabels:
    """How stored training labels become head outputs."""

    num_classes: int
    lookup: tuple[int, ...] | None  # stored label -> head output; None when they are the same
    names: tuple[str, ...]  # head output -> class name
    note: str = ""  # what was mapped, for the log

    def apply(self, labels: np.ndarray) -> np.ndarray:
        return labels if self.lookup is None else np.asarray(self.lookup, dtype=np.int64)[labels]


def head_labels(labels: np.ndarray, classes: dict[str, int] | None, num_classes: int, where: str) -> HeadLabels:
    """The head a classifier needs for these training labels (``num_classes``: finetune.num_classes, 0 =
    from the data). Raises DataError for unlabeled samples and for labels the head cannot score."""
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: unlabeled samples (label -1); fine-tuning and probing need labels")
    present = np.unique(labels)
    if present.size == 0:
        raise DataError(f"{where}: no labeled samples")
    name_of = {v: k for k, v in (classes or {}).items()}
    if num_classes:
        outside = present[present >= num_classes]
        if outside.size:
            raise DataError(
                f"{where}: labels {[int(v) for v in outside[:5]]} are outside finetune.num_classes={num_classes} "
                f"(0..{num_classes - 1}); raise it to at least {int(present.max()) + 1}, or set 0 to size the head "
                "from the data"
            )
        return HeadLabels(num_classes, None, tuple(name_of.get(i, str(i)) for i in range(num_classes)))
    top = int(present.max())
    declared = len(classes) if classes else 0
    if top < max(declared, present.size):  # numbered 0..K-1 (classes without training samples included)
        k = max(declared, present.size)
        return HeadLabels(k, None, tuple(name_of.get(i, str(i)) for i in range(k)))
    lookup = np.full(top + 1, -1, dtype=np.int64)
    lookup[present] = np.arange(present.size)
    shown = ", ".join(str(int(v)) for v in present[:6]) + (", ..." if present.size > 6 else "")
    note = (
        f"{where}: the labels ({shown}) are not numbered 0..{present.size - 1}; the head has {present.size} outputs, "
        f"label {int(present[-1])} is output {present.size - 1} (sorted order; the export records each output's "
        f"class); finetune.num_classes={top + 1} keeps the stored numbers instead"
    )
    names = tuple(name_of.get(int(v), str(int(v))) for v in present)
    return HeadLabels(int(present.size), tuple(int(v) for v in lookup), names, note)


def validation_label_map(
    train_root: str | Path, val_root: str | Path, val_labels: np.ndarray, head: HeadLabels | int
) -> tuple[np.ndarray | None, str]:
    """(a lookup table val label -> head output, or None when they are the same; a note for the log).
    Raises DataError when the validation labels cannot be scored by the head (``head``: the training
    labels' ``HeadLabels``, or a number of classes whose outputs are the stored labels)."""
    if isinstance(head, int):
        head = HeadLabels(head, None, ())
    num_classes = head.num_classes
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
    labels = val_labels if mapping is None else _look(mapping, val_labels)
    if head.lookup is not None:  # training labels mapped to a dense head: validation follows them
        to_head = np.asarray(head.lookup, dtype=np.int64)
        labels = _look(to_head, labels)
        mapping = to_head if mapping is None else _look(to_head, mapping)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        shown = sorted({int(v) for v in val_labels[bad]})[:5]
        how = ", the training labels mapped as the log says" if head.lookup else ""
        raise DataError(
            f"data.val_shards={str(val_root)!r}: {int(bad.sum())} validation samples have labels {shown} outside "
            f"the classifier's {num_classes} classes (0..{num_classes - 1}{how}); fix the labels or set "
            "finetune.num_classes"
        )
    return mapping, note


def _look(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``table[values]``, -1 where a value is -1 or outside the table."""
    values = np.asarray(values, dtype=np.int64)
    out = np.full(values.shape, -1, dtype=np.int64)
    ok = (values >= 0) & (values < len(table))
    out[ok] = table[values[ok]]
    return out


def classifier_labels(
    train: SampleTable, val: SampleTable, num_classes: int, train_where: str, val_where: str
) -> tuple[HeadLabels, np.ndarray | None, list[str]]:
    """The head for the training shards, the validation lookup onto it, and what to log: what a
    fine-tuning run and the check before its launch both decide."""
    head = head_labels(train.distinct_labels(), read_classes(train.root), num_classes, f"data.shards={train_where!r}")
    val_map, note = validation_label_map(train.root, val.root, val.label, head)
    return head, val_map, [n for n in (head.note, note) if n]
