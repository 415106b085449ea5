"""Fine-tuning and linear probing of a pretrained encoder, run under the ``deepspeed`` launcher:

    deepspeed [--num_gpus N] --module engine.finetune --preset NAME --run-dir DIR \
        --set init.pretrained=PATH [--set key=value ...]

PATH is a pretraining run folder (its newest complete checkpoint), a checkpoint folder, or an
``engine.tools.export`` folder. The same loop as pretraining: checkpoints, exact resume, the fault
guard, signals; top-1/top-5 on ``data.val_shards`` at every epoch end and at the end.
"""

from __future__ import annotations

from engine.cli import exit_now
from engine.cli import main as cli_main


def make_task():
    from engine.tasks.classification import FinetuneTask

    return FinetuneTask()


def main(argv: list[str] | None = None) -> int:
    return cli_main(
        "finetune", "Fine-tune or linearly probe a pretrained encoder (DeepSpeed ZeRO-2, bf16).", make_task, argv
    )


if __name__ == "__main__":
    exit_now(main())
