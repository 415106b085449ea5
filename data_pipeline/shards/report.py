"""What the offline tools print about samples they skipped, and the refusal when nothing is usable.

Every skip stays listed in the output's ``skipped.json``; the console gets a count and the three
commonest reasons (reasons are grouped by their text before the first ``(``, which holds the
sample's own detail), never one warning per file.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

from engine.errors import DataError

_DETAIL = re.compile(r"\s*[(:].*$")


class NothingUsable(DataError):
    """A tool's result holds no usable sample: it exits non-zero instead of reporting success."""


def reason_kind(reason: str) -> str:
    return _DETAIL.sub("", reason).strip() or reason


def commonest(skipped: list[dict], top: int = 3) -> list[tuple[str, int]]:
    return Counter(reason_kind(str(s.get("reason", ""))) for s in skipped).most_common(top)


def log_skipped(log: logging.Logger, skipped: list[dict], where: str) -> None:
    """One line: the count, the three commonest reasons, and where the full list is."""
    if not skipped:
        return
    reasons = ", ".join(f"{r} ({n})" for r, n in commonest(skipped))
    log.warning("%d sample(s) skipped, listed in %s; commonest reasons: %s", len(skipped), where, reasons)


def refuse_empty(what: str, skipped: list[dict], hint: str) -> None:
    """Raise when a result has no usable sample, with the likely cause and the flag that fixes it."""
    why = "; ".join(f"{r} ({n})" for r, n in commonest(skipped)) or "nothing to read"
    raise NothingUsable(f"{what}: no usable sample ({len(skipped)} skipped: {why}); {hint}")
