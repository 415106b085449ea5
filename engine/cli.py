"""The command line shared by the training entry points (``engine.pretrain``, ``engine.finetune``).

Everything that can be wrong before training is checked here, before the heavy imports and the
process group: the preset, every ``--set``, the paths the run reads. A problem is one line on
stderr (from rank 0 only) and exit code 2. Exit codes of a run: 0 done or preempted (saved),
2 bad config, data, checkpoint or weights file, 3 non-finite training that rollbacks could not fix,
4 a stalled rank (engine.loop.watchdog).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from engine.config import Config, ConfigError, apply_overrides, resolved, validate
from engine.presets import get_preset, list_presets

log = logging.getLogger("engine")

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE = 0, 2, 3
REPO = Path(__file__).resolve().parents[1]


def parse_args(stage: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    names = [p for p in list_presets() if _stage_of(p) == stage]
    ap = argparse.ArgumentParser(
        prog=f"python -m engine.{stage}",
        description=description,
        epilog=f"Run under the deepspeed launcher (deepspeed --num_gpus N --module engine.{stage} ...) or "
        "launchers/pretrain.sh; without a GPU set DS_ACCELERATOR=cpu. Exit codes: 0 done or preempted, "
        "2 bad config/data/checkpoint, 3 non-finite training, 4 a stalled rank.",
    )
    ap.add_argument(
        "--preset", required=True, metavar="NAME", help=f"the recipe to start from; one of: {', '.join(names)}"
    )
    ap.add_argument("--run-dir", help="run folder: checkpoints/, config.json, metrics.jsonl, tensorboard/ (default: "
                    "the preset's run_dir); relative paths are relative to the current directory")  # fmt: skip
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change one config field by dotted path, e.g. --set optim.base_lr=1e-4 (repeatable; "
                    "--print-config lists the fields)")  # fmt: skip
    ap.add_argument("--resume", metavar="MODE", help="auto (default: the newest complete checkpoint of the run "
                    "folder), never (start over), or a checkpoint folder")  # fmt: skip
    ap.add_argument("--print-config", action="store_true",
                    help="print the config as set and the values derived from it (image size, taps, lr, "
                    "accumulation, steps), then exit")  # fmt: skip
    ap.add_argument("--world-size", type=int, default=0, metavar="N",
                    help="with --print-config: derive batch arithmetic and steps for N ranks (default: the "
                    "launcher's WORLD_SIZE, else 1)")  # fmt: skip
    ap.add_argument("--check", action="store_true", help="check the config and the paths it names, then exit "
                    "(what launchers/pretrain.sh does before it starts the launcher)")  # fmt: skip
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


def _stage_of(preset: str) -> str:
    return "finetune" if preset.startswith(("finetune", "linprobe")) else "pretrain"


def resolve_config(args: argparse.Namespace, stage: str) -> Config:
    cfg = get_preset(args.preset)
    if _stage_of(args.preset) != stage:
        raise ConfigError(f"--preset {args.preset!r} is a {_stage_of(args.preset)} preset; run it with "
                          f"python -m engine.{_stage_of(args.preset)}")  # fmt: skip
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

    d = cfg.data
    for field, shards in (("data.shards", d.shards), ("data.val_shards", d.val_shards)):
        if field == "data.val_shards" and not shards:
            continue
        p = Path(shards)
        need(p.is_dir(), field, shards, "no such folder; create shards with python -m data_pipeline.make_shards")
        need((p / "dataset.json").is_file() and (p / "manifest.parquet").is_file(), field, shards,
             "not a finished shard folder (dataset.json and manifest.parquet are missing)")  # fmt: skip
    if d.decode_device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("data.decode_device='gpu': no CUDA device is visible here; use auto or cpu")
    ds = resolve_repo_path(cfg.engine.ds_config)
    need(ds.is_file(), "engine.ds_config", cfg.engine.ds_config, "file not found")
    t = cfg.target
    if cfg.task == "pretrain" and t.kind == "clip":
        need(Path(t.teacher).is_file(), "target.teacher", t.teacher, "file not found (CLIP weights are local files)")
    if cfg.task == "pretrain" and t.kind == "mixed":
        need(Path(t.generator).exists(), "target.generator", t.generator,
             "not found (a pretraining run folder, a checkpoint folder or an MAE .pth file)")  # fmt: skip
    if cfg.task != "pretrain" and cfg.init.pretrained:
        need(Path(cfg.init.pretrained).exists(), "init.pretrained", cfg.init.pretrained,
             "not found (a pretraining run folder, a checkpoint folder or an engine.tools.export folder)")  # fmt: skip
    mode = cfg.checkpoint.resume
    if mode not in ("auto", "never"):
        need(Path(mode).is_dir(), "checkpoint.resume", mode, "no such checkpoint folder")


def resolve_repo_path(value: str) -> Path:
    """A path as given, or else relative to the repository (the shipped ds_configs/)."""
    p = Path(value)
    return p if p.exists() or p.is_absolute() else REPO / p


def describe(cfg: Config, world_size: int) -> dict:
    """resolved(cfg) plus the batch arithmetic for ``world_size`` when the shards can be read."""
    from engine.config import derive

    try:
        import pyarrow.parquet as pq

        n = pq.ParquetFile(Path(cfg.data.shards) / "manifest.parquet").metadata.num_rows
        return resolved(cfg, derive(cfg, world_size, n), n)
    except (OSError, ConfigError, ImportError) as err:
        out = resolved(cfg)
        out["derived"]["note"] = f"steps and accumulation need the shards and the world size ({err})"
        return out


def main(stage: str, description: str, make_task: Callable[[], object], argv: list[str] | None = None) -> int:
    from engine.loop.dist import env_rank, env_world_size

    args = parse_args(stage, description, argv)
    quiet = env_rank() != 0  # one message per job, not one per rank
    try:
        cfg = resolve_config(args, stage)
        if args.print_config:
            print(json.dumps(describe(cfg, args.world_size or env_world_size()), indent=2))
            return EXIT_OK
        check_paths(cfg)
    except ConfigError as err:
        if not quiet:
            print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"config and paths OK: preset {cfg.preset}, run folder {Path(cfg.run_dir).resolve()}")
        return EXIT_OK
    cfg.engine.ds_config = str(resolve_repo_path(cfg.engine.ds_config))
    return _run(cfg, make_task)


def _run(cfg: Config, make_task: Callable[[], object]) -> int:
    from engine.loop.dist import quiet_known_noise, release_shared_memory, setup_distributed, setup_logging

    quiet_known_noise()
    dist = setup_distributed()
    setup_logging(dist.rank, cfg.log.level)
    try:
        return _train(cfg, dist, make_task)
    finally:
        release_shared_memory()


def _train(cfg: Config, dist, make_task: Callable[[], object]) -> int:
    from data_pipeline.loader import DataError
    from engine.loop.checkpoint import CheckpointError
    from engine.loop.runlock import RunFolderBusy
    from engine.loop.trainer import NonFiniteError, Trainer
    from engine.serialization import UnsafeFileError
    from engine.targets.teachers import TeacherError

    try:
        result = Trainer(cfg, dist, make_task()).train()
    except (ConfigError, TeacherError, DataError, CheckpointError, RunFolderBusy, UnsafeFileError) as err:
        # Start-up and resume problems: one clear line instead of a traceback per rank.
        log.error("%s: %s", type(err).__name__, err)
        return EXIT_CONFIG
    except NonFiniteError as err:
        log.error("NonFiniteError: %s", err)
        return EXIT_NONFINITE
    log.info("done: %s", result)
    return EXIT_OK


def exit_now(code: int) -> None:
    """End a training process without the interpreter's teardown, which spends 2-3 s per process
    on CPU tearing down torch, DeepSpeed and DALI module state (every launch and every rank pays
    it). By the time ``main`` returns, checkpoints are written and metrics, TensorBoard and the
    run lock are closed; what is left is joined or run here first: non-daemon threads, the
    ``atexit`` handlers (logging's flush among them) and the standard streams."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to save
            stream.flush()
    os._exit(code)
