"""DeepSpeed's ``ds_to_universal`` with every ``torch.load`` made safe (engine.weights.safe_load).

    python -m engine.loop.to_universal --input_folder CKPT --output_folder OUT [DeepSpeed's flags]

``convert`` runs it for an elastic resume (a checkpoint written by another number of ranks).

The converter unpickles every checkpoint file with ``weights_only=False``; here it runs with the
load guard in place, and its worker processes are forked so they inherit it.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

from engine.errors import CheckpointError
from engine.run_folder.checkpoints import MARKER
from engine.weights.safe_load import load_guard


def convert(tag_dir: Path, out_root: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (per-parameter fp32 weights and
    Adam moments), which loads on any number of ranks. Idempotent; the result carries the
    original's completeness marker."""
    target = out_root / tag_dir.name
    if (target / MARKER).is_file():
        return target
    tmp = out_root / (tag_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "engine.loop.to_universal",
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(tmp),
        "--inject_missing_state",
        "--num_extract_workers",
        "2",
        "--num_merge_workers",
        "2",
    ]
    root = str(Path(__file__).resolve().parents[2])  # the converter wrapper lives in this repository
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise CheckpointError(f"converting {tag_dir} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
    shutil.copy2(tag_dir / MARKER, tmp / MARKER)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    multiprocessing.set_start_method("fork", force=True)  # workers inherit the guard
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    with load_guard():
        ds_to_universal.main(ds_to_universal.parse_arguments())
    return 0


if __name__ == "__main__":
    sys.exit(main())
