"""What decides an epoch's order, recorded in every checkpoint: a resume onto other data or another
seed mid-epoch is refused (the rest of the epoch would repeat or skip samples) or, when asked,
starts the next epoch with the new data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import DataError

if TYPE_CHECKING:
    from data_pipeline.dataset.table import SampleTable


def data_identity(table: SampleTable, seed: int, order: str = "global", window: int = 4) -> dict:
    """What decides an epoch's order: the seed, the manifest's rows and the order kind."""
    kind = "global" if order == "global" else f"block/{window}"
    return {"seed": seed, "rows": len(table), "manifest": table.fingerprint(), "order": kind}


def identity_changes(saved: dict, now: dict) -> list[str]:
    names = {"seed": "seed", "rows": "samples in the manifest", "manifest": "manifest", "order": "data order"}
    return [f"{names[k]} {saved.get(k)} -> {now.get(k)}" for k in names if saved.get(k) != now.get(k)]


def check_data_change(marker: dict, now: dict, on_change: str) -> str | None:
    """Before anything is built: a resume onto other data or another seed is refused mid-epoch (the
    rest of the epoch would repeat or skip samples), unless told to start the next epoch with the new
    data. Returns a note for the log, or None when nothing changed."""
    saved = marker.get("data")
    if not saved or "identity" not in saved:
        return None  # a checkpoint from before the data was recorded: nothing to compare
    changes = identity_changes(saved["identity"], now)
    if not changes:
        return None
    epoch, into = saved["epoch"], saved["samples_into_epoch"]
    if saved.get("at_boundary"):
        return f"the data changed ({'; '.join(changes)}) at the end of epoch {epoch}: the next epoch uses it"
    if on_change == "next_epoch":
        return (
            f"the data changed ({'; '.join(changes)}) {into} samples per rank into epoch {epoch}: data.on_change="
            f"next_epoch: the rest of epoch {epoch} is not read; epoch {epoch + 1} starts with the new data"
        )
    raise DataError(
        f"cannot resume: the checkpoint is {into} samples per rank into epoch {epoch} of other data "
        f"({'; '.join(changes)}); the rest of that epoch would repeat or skip samples. Resume with the data and "
        f"seed it was written with (and change them at an epoch end), or set data.on_change=next_epoch to start "
        f"epoch {epoch + 1} with the new data, or use a new run folder"
    )
