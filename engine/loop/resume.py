"""Which checkpoint a run continues from, decided before anything heavy is built.

``--resume auto`` takes the newest complete checkpoint whose files verify against its marker
(damaged ones are renamed ``broken-*`` and the next older one is tried). A folder that held
checkpoints never trains from step 0 again by itself: when none verifies, every start refuses with
one line listing them and how to go on. ``--resume PATH`` names a checkpoint; one that does not
verify, or whose marker is missing or damaged, is forced (a warning names what is wrong, and the
marker's contents are read from the checkpoint's model-states file). ``never`` and ``fresh`` start
over. The saved config is compared with the current one before any weights are read
(``engine.config.resume_policy``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.config import Config, compare_for_resume, from_dict
from engine.errors import CheckpointError, TransientError
from engine.loop import to_universal
from engine.loop.dist import DistInfo, all_gather_objects, barrier
from engine.run_folder import checkpoints as ckpt
from engine.weights.safe_load import safe_load

log = logging.getLogger(__name__)


def find_resume(mode: str, ckpt_dir: Path, dist: DistInfo) -> Path | None:
    """The checkpoint folder to resume from, or None to start from scratch (its files verified)."""
    return choose_resume(mode, ckpt_dir, dist, background=False)[0]


def choose_resume(
    mode: str, ckpt_dir: Path, dist: DistInfo, background: bool = True
) -> tuple[Path | None, ckpt.Verification | None]:
    """The checkpoint to resume from and, with ``background``, the verification of its files still
    running (``Trainer.resume`` collects it before loading, and falls back when it fails); without,
    the files are verified here and a damaged checkpoint is set aside for the next older one."""
    if mode in ("never", "fresh"):
        return None, None

    def gather(obj: object) -> list:
        return all_gather_objects(obj, dist.world_size)

    if mode == "auto" and background:
        newest = ckpt.newest_complete(ckpt_dir)
        if newest is not None:
            try:
                return newest, ckpt.Verification(newest, dist.rank, dist.world_size)
            except CheckpointError:
                pass  # its marker is damaged: the synchronous choice below sets it aside
    return _choose_now(mode, ckpt_dir, dist, gather), None


def _choose_now(mode: str, ckpt_dir: Path, dist: DistInfo, gather) -> Path | None:
    if mode == "auto":
        newest = ckpt.newest_complete(ckpt_dir)
        found = ckpt.newest_verified(ckpt_dir, dist.rank, dist.world_size, gather, barrier)
        if found is None:
            broken = ckpt.broken_checkpoints(ckpt_dir)
            if broken:  # this folder held checkpoints: never a silent start from step 0
                raise ckpt.no_checkpoint_verifies(ckpt_dir, broken)
            return None
        if newest is not None and found != newest:
            log.warning(
                "resuming from %s instead of the newest checkpoint %s, which is damaged (now %s)",
                found,
                newest.name,
                newest.with_name(f"broken-{newest.name}"),
            )
        return found
    path = Path(mode)
    if not (path / ckpt.MARKER).is_file() and ckpt.states_file(path) is None:
        raise CheckpointError(f"checkpoint.resume={mode!r}: not a checkpoint (no {ckpt.MARKER}, no model states)")
    problems = ckpt.verify(path, dist.rank, dist.world_size, gather) if (path / ckpt.MARKER).is_file() else []
    if problems or not (path / ckpt.MARKER).is_file():
        why = "; ".join(problems[:3]) or f"no {ckpt.MARKER}"
        log.warning("--resume %s: forced, as asked, though it does not verify (%s)", path, why)
    return path


def resume_marker(path: Path) -> dict:
    """The marker of the checkpoint being resumed, or (forced) what its model-states file says."""
    try:
        return ckpt.read_marker(path)
    except CheckpointError:
        return marker_from_states(path)


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


def marker_from_states(path: Path) -> dict:
    """What the marker would say, read from the checkpoint's own model-states file: for a checkpoint
    forced with ``--resume PATH`` whose ``complete.json`` is missing or damaged. Its tensors are mapped,
    not read; nothing vouches for the files, so the result lists none to verify."""
    file = ckpt.states_file(path)
    if file is None:
        raise CheckpointError(
            f"{path}: neither {ckpt.MARKER} nor a model-states file ({' or '.join(ckpt.MODEL_STATES)})"
        )
    try:
        state = safe_load(file, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    client = state.get("client_state", state)  # the local engine nests it; DeepSpeed stores it at the top
    try:
        train, ranks = client["train"], client["ranks"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{file}: not a checkpoint written by this stack (no train state)") from None
    module = state.get("module", {})
    half = any(getattr(t, "dtype", None) is not None and "bfloat16" in str(t.dtype) for t in module.values())
    info = {k: v for k, v in client.items() if k not in ("train", "ranks", "format_version")}
    return {
        **info,
        "step": train["step"],
        "epoch": train["epoch"],
        "precision": client.get("precision", "bf16" if half else "fp32"),
        "data": ranks[0]["loader"].get("data"),
        "forced": True,
    }


def settle_verification(
    check: ckpt.Verification, marker: dict, ckpt_dir: Path, dist: DistInfo
) -> tuple[Path, dict] | None:
    """Before loading: every rank's share of the checkpoint's files verified (collective). None when
    they verify; else the checkpoint is set aside and the newest one that verifies is returned with its
    marker, when the run as built can load it (same world size and precision). Otherwise this start
    ends with exit code 75 and the same command resumes from that one."""
    problems = check.problems(lambda obj: all_gather_objects(obj, dist.world_size))
    if not problems:
        return None
    damaged = check.path
    if dist.is_main:
        ckpt.set_aside(damaged, problems)
    barrier()
    found = find_resume("auto", ckpt_dir, dist)
    if found is None:
        raise ckpt.no_checkpoint_verifies(ckpt_dir, ckpt.broken_checkpoints(ckpt_dir))
    older = resume_marker(found)
    if any(older.get(k) != marker.get(k) for k in ("world_size", "precision")):  # what the engine was built for
        raise TransientError(
            f"checkpoint {damaged.name} is damaged ({'; '.join(problems[:2])}) and was set aside; the next one, "
            f"{found.name}, was written with other settings than this start was built for: the same command "
            "resumes from it"
        )
    log.warning("resuming from %s instead of the newest checkpoint %s, which is damaged", found, damaged.name)
    return found, older


def load_resumed(engine, path: Path, marker: dict, ckpt_dir: Path, dist: DistInfo) -> dict:
    """Load ``path`` into the engine (through DeepSpeed's universal format when it was written by
    another number of ranks); returns the checkpoint's client state."""
    load_path = path
    if marker["world_size"] != dist.world_size:
        if dist.is_main:
            log.warning(
                "elastic resume: %s was written by %d ranks, this run has %d; converting it to a universal checkpoint",
                path,
                marker["world_size"],
                dist.world_size,
            )
            to_universal.convert(path, ckpt_dir / "universal")
        barrier()
        load_path = ckpt_dir / "universal" / path.name
    _, client = engine.load_checkpoint(str(load_path.parent), tag=load_path.name, load_lr_scheduler_states=False)
    if client is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
    return client
