"""The installed commands (``pip install -e .``, which ``make setup`` runs): one family, usable from
any folder, relative paths resolving against that folder.

    deepmim-pretrain   [--gpus N | --hostfile FILE ...] -- --preset NAME --run-dir DIR [--set k=v ...]
    deepmim-finetune   the same, for fine-tuning and linear-probing presets
    deepmim-make-shards, deepmim-index-shards, deepmim-verify, deepmim-stats
    deepmim-export, deepmim-evaluate, deepmim-goodput

The two training commands are ``launchers/pretrain.sh`` (the checks before launch, the free port,
the signal handling) run with this environment's Python and ``deepspeed``; the others are the
modules' own ``main``. ``python -m ...`` works as before.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _launch(extra: list[str]) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHON": sys.executable, "DEEPSPEED": str(bin_dir / "deepspeed")}
    script = str(REPO / "launchers" / "pretrain.sh")
    os.execvpe("bash", ["bash", script, *extra, *sys.argv[1:]], env)


def pretrain() -> None:
    _launch([])


def finetune() -> None:
    _launch(["--module", "engine.finetune"])
