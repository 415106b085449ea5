"""Which checkpoint a run continues from, decided before anything heavy is built.

``--resume auto`` takes the newest complete checkpoint whose files verify against its marker
(damaged ones are renamed ``broken-*`` and the next older one is tried); an explicit checkpoint
folder must be complete and verify; ``never`` starts over. The saved config is compared with the
current one before any weights are read (``engine.config.resume_policy``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.config import Config, compare_for_resume, from_dict
from engine.errors import CheckpointError
from engine.loop.dist import DistInfo, all_gather_objects, barrier
from engine.run_folder import checkpoints as ckpt

log = logging.getLogger(__name__)


def find_resume(mode: str, ckpt_dir: Path, dist: DistInfo) -> Path | None:
    """The checkpoint folder to resume from, or None to start from scratch."""
    if mode in ("never", "fresh"):
        return None

    def gather(obj: object) -> list:
        return all_gather_objects(obj, dist.world_size)

    if mode == "auto":
        newest = ckpt.newest_complete(ckpt_dir)
        found = ckpt.newest_verified(ckpt_dir, dist.rank, dist.world_size, gather, barrier)
        if newest is not None and found is None:
            raise CheckpointError(
                f"every complete checkpoint in {ckpt_dir} is damaged (renamed broken-*); not starting over in this "
                "run folder"
            )
        if newest is not None and found != newest:
            log.warning(
                "resuming from %s instead of the newest checkpoint %s, which is damaged (now %s)",
                found,
                newest.name,
                newest.with_name(f"broken-{newest.name}"),
            )
        return found
    path = Path(mode)
    if not (path / ckpt.MARKER).is_file():
        raise CheckpointError(f"checkpoint.resume={mode!r}: not a complete checkpoint (no {ckpt.MARKER})")
    problems = ckpt.verify(path, dist.rank, dist.world_size, gather)
    if problems:
        raise CheckpointError(f"checkpoint.resume={mode!r} is damaged: {'; '.join(problems[:3])}")
    return path


def check_config(saved: dict, now: Config) -> None:
    """Refuse an incompatible config change; log the others."""
    errors, changes, harmless = compare_for_resume(from_dict(saved), now)
    if errors:
        raise CheckpointError(
            "cannot resume: incompatible config change(s): " + "; ".join(errors) + " (or start a new run folder)"
        )
    for line in changes:
        log.warning("resuming with a changed setting that alters training: %s", line)
    for line in harmless:
        log.info("resuming with a changed setting: %s", line)
