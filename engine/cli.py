"""The command line shared by the training entry points (``engine.pretrain``, ``engine.finetune``).

Everything that can be wrong before training is checked here, before the heavy imports and the
process group: the preset, every ``--set``, the paths the run reads, and the run plan for the
world size (``engine.config.plan``). A problem is one line on stderr (from rank 0 only) and exit
code 2. Exit codes of a run: 0 done or preempted (saved), 2 a user error (config, data,
checkpoint, weights, world size, file system), 3 non-finite training that rollbacks could not
fix, 4 a stalled rank (engine.loop.watchdog), 75 a condition of the moment (object storage
throttling or unreachable, a full cache disk) outlasted data.fetch_patience_s: what was trained is
saved, and the same command continues later. Every one of them is an ``engine.errors`` type.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from data_pipeline.dataset.locations import is_remote
from engine.config import Config, apply_overrides, plan_run, resolved, validate
from engine.config.paths import resolve_repo_path
from engine.errors import ConfigError, StackError, TransientError
from engine.presets import get_preset, list_presets

log = logging.getLogger("engine")

EXIT_OK = 0


def parse_args(stage: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    names = [p for p in list_presets() if _stage_of(p) == stage]
    ap = argparse.ArgumentParser(
        prog=f"python -m engine.{stage}",
        description=description,
        epilog=f"Run under the deepspeed launcher (deepspeed --num_gpus N --module engine.{stage} ...) or "
        "launchers/pretrain.sh; without a GPU set DS_ACCELERATOR=cpu. Exit codes: 0 done or preempted, "
        "2 a user error (config, data, checkpoint, weights, world size), 3 non-finite training, 4 a stalled rank, "
        "75 storage unavailable for longer than data.fetch_patience_s (saved; run the same command later).",
    )
    ap.add_argument(
        "--preset", required=True, metavar="NAME", help=f"the recipe to start from; one of: {', '.join(names)}"
    )
    ap.add_argument(
        "--run-dir",
        help="run folder: checkpoints/, config.json, metrics.jsonl, tensorboard/ (default: the preset's run_dir); "
        "relative paths are relative to the current directory",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one config field by dotted path, e.g. --set optim.base_lr=1e-4 (repeatable; --print-config "
        "lists the fields)",
    )
    ap.add_argument(
        "--resume",
        metavar="MODE",
        help="auto (default: the newest complete checkpoint of the run folder), never (start over; refused on a "
        "folder that holds a run), fresh (move that run aside to RUN_DIR.previous-<time>, then start over; use it "
        "once, not in a requeued job script), or a checkpoint folder",
    )
    ap.add_argument(
        "--print-config",
        action="store_true",
        help="print the config as set and the run plan derived from it (image size, taps, lr, accumulation, steps, "
        "FLOPs, memory per GPU), then exit",
    )
    ap.add_argument(
        "--world-size",
        type=int,
        default=0,
        metavar="N",
        help="with --print-config or --check: plan for N ranks (default: the launcher's WORLD_SIZE, else 1)",
    )
    ap.add_argument(
        "--num-samples",
        type=int,
        default=0,
        metavar="N",
        help="with --print-config or --check: plan for N usable samples (default: read from data.shards)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="check the config, the paths it names and the run plan, then exit (what launchers/pretrain.sh does "
        "before it starts the launcher)",
    )
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


def _stage_of(preset: str) -> str:
    return "finetune" if preset.startswith(("finetune", "linprobe")) else "pretrain"


def resolve_config(args: argparse.Namespace, stage: str) -> Config:
    cfg = get_preset(args.preset)
    if _stage_of(args.preset) != stage:
        raise ConfigError(
            f"--preset {args.preset!r} is a {_stage_of(args.preset)} preset; run it with "
            f"python -m engine.{_stage_of(args.preset)}"
        )
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.resume:
        cfg.checkpoint.resume = args.resume
    apply_overrides(cfg, args.overrides)
    validate(cfg)
    return cfg


def check_paths(cfg: Config) -> None:
    """Every file or folder the run will read exists, named by its absolute path when it does not."""

    def need(ok: bool, field: str, value: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{field}={value!r} ({Path(value).resolve()}): {what}")

    if cfg.task == "pretrain" and cfg.target.kind in ("clip", "features") and not cfg.target.teacher:
        raise ConfigError(
            f"target.teacher: a weights file or timm hub folder is required for target.kind={cfg.target.kind}"
        )
    if cfg.task == "pretrain" and cfg.target.kind == "mixed" and not cfg.target.generator:
        raise ConfigError("target.generator: an MAE checkpoint is required for target.kind=mixed")
    d = cfg.data
    if is_remote(d.shards):  # the node-local shard cache: a folder this user can write
        from data_pipeline.dataset.locations import default_cache_dir

        root = Path(d.cache_dir or default_cache_dir())
        if root.exists() and not root.is_dir():
            raise ConfigError(f"data.cache_dir={str(root)!r}: a file, not a folder (shards are cached there)")
        from engine.disk import check_writable

        check_writable(root, "data.cache_dir", "choose a writable node-local folder (data.cache_dir)")
    for field, shards in (("data.shards", d.shards), ("data.val_shards", d.val_shards)):
        if (field == "data.val_shards" and not shards) or is_remote(shards):
            continue  # object storage: read (and its cache checked) by check_inputs
        p = Path(shards)
        need(p.is_dir(), field, shards, "no such folder; create shards with python -m data_pipeline.make_shards")
        need(
            (p / "dataset.json").is_file() and (p / "manifest.parquet").is_file(),
            field,
            shards,
            "not a finished shard folder (dataset.json and manifest.parquet are missing)",
        )
    if d.decode_device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("data.decode_device='gpu': no CUDA device is visible here; use auto or cpu")
    need(resolve_repo_path(cfg.engine.ds_config).is_file(), "engine.ds_config", cfg.engine.ds_config, "file not found")
    t = cfg.target
    if cfg.task == "pretrain" and t.kind in ("clip", "features"):
        need(Path(t.teacher).exists(), "target.teacher", t.teacher, "not found (a weights file or a timm hub folder)")
    if cfg.task == "pretrain" and t.kind == "mixed":
        need(
            Path(t.generator).exists(),
            "target.generator",
            t.generator,
            "not found (a pretraining run folder, a checkpoint folder or an MAE .pth file)",
        )
    if cfg.task != "pretrain" and cfg.init.pretrained:
        need(
            Path(cfg.init.pretrained).exists(),
            "init.pretrained",
            cfg.init.pretrained,
            "not found (a pretraining run folder, a checkpoint folder or an engine.tools.export folder)",
        )
    mode = cfg.checkpoint.resume
    if mode not in ("auto", "never", "fresh"):
        need(Path(mode).is_dir(), "checkpoint.resume", mode, "no such checkpoint folder")
    if mode == "auto":  # a folder whose checkpoints were all set aside as damaged: refused before launch
        from engine.run_folder import checkpoints as ckpt

        root = Path(cfg.run_dir) / "checkpoints"
        broken = ckpt.broken_checkpoints(root)
        if broken and not ckpt.list_checkpoints(root):
            raise ckpt.no_checkpoint_verifies(root, broken)
    if mode == "never":
        from engine.run_folder.checkpoints import holds_run

        held = holds_run(cfg.run_dir)
        if held:
            raise ConfigError(
                f"--resume never: {Path(cfg.run_dir).resolve()} holds a run ({held}); --resume auto continues it, "
                "--resume fresh moves it aside and starts over, or choose another --run-dir"
            )
    from engine.disk import check_writable

    check_writable(cfg.run_dir)


def check_inputs(cfg: Config, plan) -> None:
    """What the run reads fits it, before anything is launched: weight files (their architecture
    read from the file, shapes only, against the preset's) and fine-tuning's validation labels."""
    t = cfg.target
    if plan.micro_batch is not None and plan.grad_accum is not None:
        from engine.loop.ds_setup import check_ds_config

        check_ds_config(cfg, plan)
    check_resume_target(cfg)
    if is_remote(cfg.data.shards):
        from data_pipeline.dataset.locations import remote_spec
        from data_pipeline.remote.checks import check_cache

        spec = remote_spec(cfg.data)  # before launch, throttling is waited out for two minutes at most (then 75)
        check_cache(
            cfg.data.shards, dataclasses.replace(spec, patience_s=min(spec.patience_s, 120.0)), cfg.data.block_window
        )
    if cfg.task != "pretrain" and cfg.data.val_shards:
        from data_pipeline.dataset.labels import classifier_labels
        from data_pipeline.dataset.locations import remote_spec
        from data_pipeline.dataset.table import read_table
        from data_pipeline.loaders.source import open_table

        d = cfg.data
        train, val = open_table(d.shards, remote_spec(d)), read_table(d.val_shards)
        classifier_labels(train, val, cfg.finetune.num_classes, d.shards, d.val_shards)  # refuses what cannot score
        if not is_remote(d.shards):  # validation that is (partly) the training set, said once before launch
            from data_pipeline.dataset.table import overlap_warning

            warning = overlap_warning(d.shards, d.val_shards)
            if warning:
                print(f"warning: {warning}; the accuracies would measure memorization", file=sys.stderr)
    if cfg.task != "pretrain" and cfg.init.pretrained:
        from engine.weights.sources import check_finite_source

        check_init_shape(cfg, plan)
        check_finite_source(cfg.init.pretrained)
    if cfg.task == "pretrain" and t.kind == "mixed":
        from engine.targets.teachers import inspect_generator

        inspect_generator(t.generator, plan.img_size, plan.patch_size)
    if cfg.task == "pretrain" and t.kind in ("clip", "features"):
        from engine.targets.kinds import feature_target

        feature_target(cfg, plan)  # read and built as the ranks will: refused here, printed once


def check_resume_target(cfg: Config) -> None:
    """Before launch: the checkpoint this run would continue from was written with a compatible config
    (a CLIP run resumed onto a pixel checkpoint, say, is refused now, not by every rank) and, for a CLIP
    target, with the same teacher file. Damaged markers are left to the ranks (they fall back)."""
    from engine.loop.resume import check_config
    from engine.run_folder import checkpoints as ckpt

    mode = cfg.checkpoint.resume
    if mode in ("never", "fresh"):
        return
    if mode != "auto":
        refuse_universal(Path(mode))
    path = Path(mode) if mode != "auto" else ckpt.newest_complete(Path(cfg.run_dir) / "checkpoints")
    try:
        marker = ckpt.read_marker(path) if path is not None else None
    except StackError:
        return
    if not marker or "config" not in marker:
        return
    check_config(marker["config"], cfg)
    saved = marker.get("target") or {}
    kind = cfg.target.kind
    if cfg.task == "pretrain" and kind in ("clip", "features") and saved.get("kind") == kind and saved.get("sha256"):
        from data_pipeline.dataset.hashing import sha256_file
        from engine.targets.timm_teachers import read_teacher_source

        weights = read_teacher_source(cfg.target.teacher, cfg.target.teacher_arch).weights
        if sha256_file(weights) != saved["sha256"]:
            raise ConfigError(
                f"target.teacher={cfg.target.teacher!r}: not the teacher {path} was trained with ({saved.get('path')}, "
                f"sha256 {saved['sha256'][:12]}); resume with that file, or start a new run folder"
            )


def check_init_shape(cfg: Config, plan) -> None:
    """``init.pretrained`` of another model is refused by --print-config as by the launch."""
    if cfg.task == "pretrain" or not cfg.init.pretrained or not Path(cfg.init.pretrained).exists():
        return
    from engine.models.classifier import check_encoder_fits
    from engine.weights.sources import inspect_source

    info = inspect_source(cfg.init.pretrained)
    if info.shape is None:
        raise ConfigError(f"init.pretrained={cfg.init.pretrained!r}: {info.describe()}, not a ViT encoder")
    check_encoder_fits(info.shape, plan, f"init.pretrained={cfg.init.pretrained!r}")


def teacher_read(cfg: Config):
    """A feature teacher's shape read from its weights when they are here (the plan then counts its
    real FLOPs and memory); None: the plan assumes one and says so."""
    t = cfg.target
    if cfg.task != "pretrain" or t.kind not in ("clip", "features") or not t.teacher or not Path(t.teacher).exists():
        return None
    from engine.config import plan_run
    from engine.targets.kinds import feature_target

    return feature_target(cfg, plan_run(cfg))[2]


def refuse_universal(path: Path) -> None:
    """A folder written by DeepSpeed's ds_to_universal holds the weights and optimizer state without the
    run's own state (data order, schedule, guard, RNGs) or its marker: resuming from it would not be
    exact. The checkpoint it was made from resumes, on any number of ranks (the run converts to the
    universal format itself when the world size changed)."""
    from engine.run_folder import checkpoints as ckpt

    if (path / ckpt.MARKER).is_file() or not (path / "zero").is_dir():
        return
    source = path.name if ckpt.step_of(path.name) is not None else "step_N"
    raise ConfigError(
        f"--resume {path}: a DeepSpeed universal checkpoint (ds_to_universal output), which lacks the run's data "
        f"order and state; resume from the checkpoint it was converted from (--resume RUN/checkpoints/{source}), "
        "on any number of ranks: the run converts it itself"
    )


def finished(cfg: Config, plan) -> str:
    """'run already complete: ...' when the run folder's newest complete checkpoint is at or past where
    this run stops (answered from the markers, in a second, instead of after a launch); else ''."""
    if cfg.checkpoint.resume != "auto" or plan.stop_step is None:
        return ""
    from engine.run_folder.checkpoints import newest_complete, read_marker

    newest = newest_complete(Path(cfg.run_dir) / "checkpoints")
    if newest is None:
        return ""
    try:
        step = int(read_marker(newest)["step"])
    except (StackError, KeyError, TypeError, ValueError):
        return ""  # the run itself will say what is wrong with it
    if step < plan.stop_step:
        return ""
    return f"run already complete: step {step} of {plan.stop_step} in {Path(cfg.run_dir).resolve()}; nothing to do"


def dataset_size(cfg: Config) -> int | None:
    """The shard folder's sample count from dataset.json (None when it cannot be read; for shards in
    object storage, the check before launch reports why)."""
    shards = cfg.data.shards
    try:
        if is_remote(shards):
            from data_pipeline.dataset.locations import remote_spec
            from data_pipeline.remote.checks import remote_meta

            spec = remote_spec(cfg.data)  # (the check before launch waits for the storage; this only counts)
            quick = dataclasses.replace(spec, patience_s=min(spec.patience_s, 10.0))
            return int(remote_meta(shards, quick)["num_samples"])
        return int(json.loads((Path(shards) / "dataset.json").read_text())["num_samples"])
    except (OSError, ValueError, KeyError, TypeError, StackError):
        return None


# How long a rank other than 0 that found a config error before the process group exists waits
# before exiting: rank 0 does the same checks and prints within milliseconds.
QUIET_EXIT_DELAY_S = 5.0

# How long a rank that found the same error as rank 0 waits for rank 0 to have printed it. Only an
# error path pays it, and only in full when rank 0 never gets there (a run folder not shared by nodes).
PRINTER_WAIT_S = 15.0


def main(stage: str, description: str, make_task: Callable[[], object], argv: list[str] | None = None) -> int:
    from engine.loop.dist import env_rank, env_world_size
    from engine.observe.goodput import STARTUP, process_start

    STARTUP.mark("launcher and pre-launch check", at=max(STARTUP.origin, process_start() or STARTUP.origin))
    STARTUP.mark("python and imports")
    args = parse_args(stage, description, argv)
    quiet = env_rank() != 0  # one message per job, not one per rank
    try:
        cfg = resolve_config(args, stage)
        world = args.world_size or env_world_size()
        samples = args.num_samples or dataset_size(cfg)
        if args.print_config:
            from engine.config.checks import ineffective
            from engine.config.pricing import price

            plan = plan_run(cfg, world, samples, teacher=teacher_read(cfg))
            check_init_shape(cfg, plan)
            doc = {**resolved(cfg, plan), "price": price(cfg, plan)}
            moot = ineffective(cfg, args.overrides)
            if moot:
                doc["warnings"] = moot
            print(json.dumps(doc, indent=2))
            return EXIT_OK
        check_paths(cfg)
        plan = plan_run(cfg, world, samples)  # a world size or a dataset the recipe cannot run on: refused now
        if args.check:
            check_inputs(cfg, plan)  # the launcher's check: files read for their shapes, before any process
    except StackError as err:
        if not quiet:
            what = "storage unavailable" if isinstance(err, TransientError) else "config error"
            print(f"{what}: {err}", file=sys.stderr)
        else:
            # Every rank found it, rank 0 prints it; the launcher kills all ranks once one exits, so the
            # others leave a little later (or are ended by rank 0's exit) rather than cut its line off.
            import time

            time.sleep(QUIET_EXIT_DELAY_S)
        return err.exit_code
    if args.check:
        from engine.config.checks import ineffective

        for line in ineffective(cfg, args.overrides):
            print(f"warning: {line}", file=sys.stderr)
        done = finished(cfg, plan)
        if done:
            print(done)  # launchers/pretrain.sh then launches nothing
            return EXIT_OK
        print(f"config and paths OK: preset {cfg.preset}, run folder {Path(cfg.run_dir).resolve()}, {world} rank(s)")
        return EXIT_OK
    cfg.engine.ds_config = str(resolve_repo_path(cfg.engine.ds_config))
    from engine.loop.signals import StopRequest, StopSignals

    # Stop handlers first, before the slow start-up (imports, process group, build, resume, compile):
    # a preemption that comes now is a clean one (PREEMPTED, exit 0), not a death.
    stop = StopRequest()
    signals = StopSignals(stop) if cfg.checkpoint.on_signal else None
    try:
        return _run(cfg, make_task, stop)
    finally:
        if signals is not None:
            signals.restore()


def _run(cfg: Config, make_task: Callable[[], object], stop) -> int:
    import time

    from engine.loop.dist import (
        env_local_rank,
        quiet_known_noise,
        release_shared_memory,
        setup_distributed,
        setup_logging,
    )
    from engine.loop.ops import shm_op_built, use_environment_cache
    from engine.observe.goodput import STARTUP
    from engine.weights.safe_load import load_guard

    ops = use_environment_cache()  # the same op build whatever the shell or launcher (engine.loop.ops)
    if env_local_rank() == 0 and os.environ.get("DS_ACCELERATOR") == "cpu":
        from engine.loop.dist import reclaim_stale_shared_memory

        stale = reclaim_stale_shared_memory()
        if stale:
            print(f"removed {len(stale)} shared-memory buffer(s) left in /dev/shm by killed runs", file=sys.stderr)
    building = os.environ.get("DS_ACCELERATOR") == "cpu" and not shm_op_built(ops) and env_local_rank() == 0
    if building:
        print(
            f"building DeepSpeed's CPU communication op into {ops} (once per environment; about a minute on "
            "2 cores; make setup does it ahead)",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    quiet_known_noise()
    dist = setup_distributed()
    setup_logging(dist.rank, cfg.log.level)
    STARTUP.mark("config and process group")
    if building:
        log.info("DeepSpeed's CPU communication op built in %.0f s", time.perf_counter() - t0)
    try:
        with load_guard():  # no torch.load in this process runs code from a file (engine.weights.safe_load)
            return _train(cfg, dist, make_task, stop)
    finally:
        release_shared_memory()


def _train(cfg: Config, dist, make_task: Callable[[], object], stop) -> int:
    import time

    from engine.loop.trainer import Trainer
    from engine.observe.goodput import STARTUP

    notes = Path(cfg.run_dir) / "heartbeat"
    started = time.time()
    with contextlib.suppress(OSError):
        (notes / f"stopped_rank{dist.rank}.json").unlink()
    try:
        result = Trainer(cfg, dist, make_task(), stop=stop, clock=STARTUP).train()
    except StackError as err:
        # One line instead of a traceback per rank; errors every rank sees alike are printed by rank 0.
        if dist.rank == 0 or err.rank_local:
            log.error("%s", err.one_line())
        else:
            log.debug("%s", err.one_line())
        if dist.world_size > 1:  # for the peers whose next collective fails because this rank leaves
            with contextlib.suppress(OSError):
                notes.mkdir(parents=True, exist_ok=True)
                (notes / f"stopped_rank{dist.rank}.json").write_text(json.dumps({"code": err.exit_code}))
            # The launcher kills every rank as soon as one exits: leaving before rank 0 has printed the
            # line would lose it (seen in CI: exit 2 and no message). Rank 0 silent all along (stuck
            # elsewhere): this rank says it.
            shared = dist.rank != 0 and not err.rank_local
            if shared and not wait_for_notes(notes, started, ranks={0}, wait_s=PRINTER_WAIT_S):
                log.error("%s", err.one_line())
        return err.exit_code
    except Exception as err:
        if dist.world_size == 1 or not peer_gone(err):
            raise
        return _after_peer_stopped(notes, started, dist.rank, err)
    log.info("done: %s", result)
    if result.get("transient"):
        from engine.errors import TransientError

        return TransientError.exit_code
    return EXIT_OK


# What the collective libraries say when the process at the other end went away.
PEER_GONE = ("closed by peer", "reset by peer", "broken pipe", "remote worker", "remote process", "NCCL communicator")


def peer_gone(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(p.lower() in text for p in PEER_GONE)


def stop_notes(notes: Path, started: float) -> dict[int, int]:
    """The exit codes (rank -> code) of the ranks that left this run on purpose: the notes written
    since ``started`` (older ones belong to an earlier attempt in the same folder)."""
    found: dict[int, int] = {}
    for note in notes.glob("stopped_rank*.json") if notes.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if note.stat().st_mtime >= started:
                found[int(note.stem.removeprefix("stopped_rank"))] = int(json.loads(note.read_text())["code"])
    return found


def wait_for_notes(notes: Path, started: float, ranks: set[int] | None, wait_s: float) -> dict[int, int]:
    """Wait at most ``wait_s`` for a stop note from one of ``ranks`` (any rank when None); returns
    the notes found, which may be none."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        found = {r: c for r, c in stop_notes(notes, started).items() if ranks is None or r in ranks}
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _after_peer_stopped(notes: Path, started: float, rank: int, err: BaseException) -> int:
    """A collective failed because another rank left. When it left on purpose, it said why in one line
    and left a note: this rank ends quietly with its exit code. Otherwise (killed, out of memory) this
    rank says what it saw, in one line."""
    found = wait_for_notes(notes, started, ranks=None, wait_s=2.0)
    if found:
        code = next(iter(found.values()))
        log.debug("rank %d: another rank stopped (exit code %d); so does this one", rank, code)
        return code
    first = str(err).strip().splitlines()[0][:200]
    log.error(
        "rank %d: another rank ended without a word (communication with it failed: %s); see its output above, or "
        "the system log (out of memory?)",
        rank,
        first,
    )
    return 1


def exit_now(code: int, join_timeout_s: float = 10.0) -> None:
    """End a training process without the interpreter's teardown, which spends 2-3 s per process
    on CPU tearing down torch, DeepSpeed and DALI module state (every launch and every rank pays
    it). By the time ``main`` returns, checkpoints are written and metrics, TensorBoard and the
    run lock are closed; what is left is shut down or joined here first: torch.compile's worker
    pool (inductor keeps compile threads and processes that would otherwise hold the process
    forever), other non-daemon threads (for at most ``join_timeout_s`` together: a thread that does
    not end is named and left behind, so a run always exits), the ``atexit`` handlers (logging's
    flush among them) and the standard streams."""
    import time

    inductor = sys.modules.get("torch._inductor.async_compile")
    if inductor is not None:
        with contextlib.suppress(Exception):  # best effort: exiting matters more
            inductor.shutdown_compile_workers()  # its worker processes
            if inductor.AsyncCompile.pool.cache_info().currsize:  # and its thread pool, when it made one
                inductor.AsyncCompile.pool().shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + join_timeout_s
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                print(f"exiting with thread {thread.name!r} still running", file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to save
            stream.flush()
    os._exit(code)
