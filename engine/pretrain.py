"""Pretraining (DeepMIM, or MAE with one tap), run under the ``deepspeed`` launcher:

    deepspeed [--num_gpus N] --module engine.pretrain --preset NAME --run-dir DIR [--set key=value ...]

On a machine without a GPU, set ``DS_ACCELERATOR=cpu`` and use ``--num_gpus`` for the number
of CPU processes. ``--print-config`` shows the config and what follows from it, and exits.
"""

from __future__ import annotations

from engine.cli import exit_now
from engine.cli import main as cli_main


def make_task():
    from engine.tasks.masked_modeling import PretrainTask

    return PretrainTask()


def main(argv: list[str] | None = None) -> int:
    return cli_main("pretrain", "DeepMIM / MAE pretraining on tar shards (DeepSpeed ZeRO-2, bf16).", make_task, argv)


if __name__ == "__main__":
    exit_now(main())
