"""Benchmark (c): the real trainer end to end (deepspeed launcher, DALI, ZeRO-2), over a short run.

    python -m bench.end_to_end [--preset deepmim_tiny_pixel] [--steps 60] [--nprocs 2] --json OUT

Reports images/s and the share of wall time spent waiting for data, in forward+backward, in the
optimizer and in the teacher, from the trainer's own telemetry (``metrics.jsonl``). The first
logged interval (start-up, compile) is left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import header, write_json

log = logging.getLogger("bench.end_to_end")
ROOT = Path(__file__).resolve().parents[1]


def ensure_demo_shards(path: Path) -> Path:
    if (path / "dataset.json").is_file():
        return path
    from data_pipeline.demo_data import build
    from data_pipeline.make_shards import main as make_shards

    src = path.parent / (path.name + "_src")
    build(src)
    make_shards([str(src), str(path), "--shard-size-mb", "0.25", "--workers", "1", "--no-progress"])
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="deepmim_tiny_pixel")
    ap.add_argument("--shards", default="data/demo_shards")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    shards = ensure_demo_shards(Path(args.shards))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        ds = Path(sys.executable).parent / "deepspeed"
        cmd = [str(ds) if ds.exists() else "deepspeed", "--num_gpus", str(args.nprocs), "--master_port", "29561",
               "--module", "engine.pretrain", "--preset", args.preset, "--run-dir", str(run),
               "--set", f"data.shards={shards}", "--set", f"schedule.max_steps={args.steps}",
               "--set", "log.interval=10", "--set", f"checkpoint.interval={10**9}",
               "--set", "log.reconstructions=false",
               *[x for o in args.overrides for x in ("--set", o)]]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            log.error("training failed:\n%s", proc.stdout[-3000:] + proc.stderr[-3000:])
            return 1
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    keys = sorted({k for r in rows for k in r if k.startswith("share_")})
    out = header("end_to_end", preset=args.preset, nprocs=args.nprocs, steps=args.steps, overrides=args.overrides)
    out["img_per_s"] = statistics.median(r["img_per_s"] for r in rows)
    out["shares"] = {k[len("share_") :]: statistics.median(r[k] for r in rows) for k in keys}
    out["mfu"] = statistics.median(r["mfu"] for r in rows) if rows and rows[0].get("mfu") is not None else None
    out["final_loss"] = rows[-1]["loss"] if rows else None
    write_json(args.json, out)
    log.info("%.1f img/s; time shares %s", out["img_per_s"], {k: round(v, 3) for k, v in out["shares"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
