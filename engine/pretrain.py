"""Entry point for pretraining, run under the ``deepspeed`` launcher:

    deepspeed [--num_gpus N] --module engine.pretrain --preset NAME --run-dir DIR [--set key=value ...]

On a machine without a GPU, set ``DS_ACCELERATOR=cpu`` and use ``--num_gpus`` for the number
of CPU processes. ``--print-config`` shows the resolved config and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.config import ConfigError, apply_overrides, resolved, validate
from engine.presets import get_preset, list_presets

log = logging.getLogger("engine.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="DeepMIM pretraining (DeepSpeed ZeRO-2, bf16).")
    ap.add_argument("--preset", required=True, help=f"one of: {', '.join(list_presets())}")
    ap.add_argument("--run-dir", help="run folder (checkpoints, config.json, metrics.jsonl)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. --set optim.base_lr=1e-4 (repeatable)",
    )
    ap.add_argument("--resume", help="auto (default), never, or a checkpoint folder")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


def resolve_config(args: argparse.Namespace):
    cfg = get_preset(args.preset)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.resume:
        cfg.checkpoint.resume = args.resume
    apply_overrides(cfg, args.overrides)
    validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(resolved(cfg), indent=2))
        return 0

    from engine.loop.dist import release_shared_memory, setup_distributed, setup_logging

    dist = setup_distributed()
    setup_logging(dist.rank, cfg.log.level)
    try:
        return _train(cfg, dist)
    finally:
        release_shared_memory()


def _train(cfg, dist) -> int:
    from data_pipeline.loader import DataError
    from engine.loop.checkpoint import CheckpointError
    from engine.loop.trainer import NonFiniteError, Trainer
    from engine.targets.teachers import TeacherError
    from engine.tasks.pretrain import PretrainTask

    try:
        result = Trainer(cfg, dist, PretrainTask()).train()
    except (ConfigError, TeacherError, DataError, CheckpointError) as err:
        # Start-up and resume problems: one clear line instead of a traceback per rank.
        log.error("%s: %s", type(err).__name__, err)
        return 2
    except NonFiniteError as err:
        log.error("NonFiniteError: %s", err)
        return 3
    log.info("done: %s", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
