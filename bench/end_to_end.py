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

from bench import answer_help_early


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.end_to_end",
        description="The real trainer end to end over a short run (deepspeed launcher, DALI, ZeRO-2): images/s, MFU "
        "and the shares of wall time in data wait, forward+backward, optimizer and teacher.",
    )
    ap.add_argument("--preset", default="deepmim_tiny_pixel", help="training preset (default deepmim_tiny_pixel)")
    ap.add_argument(
        "--shards", default="data/demo_shards", help="shard folder (built from the bundled photos if missing)"
    )
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    ap.add_argument("--nprocs", type=int, default=2, help="processes (GPUs, or CPU processes without one; default 2)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to the trainer (repeatable)",
    )
    ap.add_argument("--log-interval", type=int, default=10, help="steps between the trainer's metric lines")
    ap.add_argument(
        "--imagenet-like",
        action="store_true",
        help="build missing --shards from 500 x 375 JPEGs of ~110 KB instead of the small demo photos",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also run with these overrides (repeatable) and compare speed and the loss curve step by "
        "step (e.g. engine.fp8=true against bf16)",
    )
    ap.add_argument("--json", help="write the results here")
    return ap


if __name__ == "__main__":
    answer_help_early(build_parser)

from bench.common import header, write_json
from engine.loop.dist import free_port

log = logging.getLogger("bench.end_to_end")
ROOT = Path(__file__).resolve().parents[1]


def ensure_demo_shards(path: Path, imagenet_like: bool = False) -> Path:
    if (path / "dataset.json").is_file():
        return path
    from bench.data_pipeline import make_bench_shards
    from data_pipeline.shards.demo_data import build
    from data_pipeline.shards.make_shards import main as make_shards

    if imagenet_like:  # 500 x 375 JPEGs of ~110 KB, 9 x 128 of them
        built = make_bench_shards(path.parent / (path.name + "_work"), 128, 0, imagenet_like=True)
        built.rename(path)
        return path
    src = path.parent / (path.name + "_src")
    build(src)
    make_shards([str(src), str(path), "--shard-size-mb", "0.25", "--workers", "1", "--no-progress"])
    return path


def train(args, shards: Path, env: dict, overrides: list[str], tmp: Path) -> list[dict] | None:
    """One short run of the real trainer; its metrics.jsonl lines (the first, start-up, left out)."""
    run = tmp / f"run{len(list(tmp.iterdir()))}"
    # the runner as a module: on the lent GPU machine DeepSpeed is a --target install without its script
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(args.nprocs),
        "--master_port",
        str(free_port()),
        "--log_level",
        "warning",
        "--module",
        "engine.pretrain",
        "--preset",
        args.preset,
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={args.steps}",
        "--set",
        f"log.interval={args.log_interval}",
        "--set",
        f"checkpoint.interval={10**9}",
        "--set",
        "log.reconstructions=false",
        "--set",
        "log.progress=off",
        *[x for o in overrides for x in ("--set", o)],
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log.error("training failed:\n%s", proc.stdout[-3000:] + proc.stderr[-3000:])
        return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    if rows and (run / "goodput.json").is_file():  # the run's own account (start-up, warm-up, productive...)
        rows[-1]["goodput"] = json.loads((run / "goodput.json").read_text())["summary"]
    return rows


def summarize(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r if k.startswith("share_")})
    return {
        "img_per_s": statistics.median(r["img_per_s"] for r in rows),
        "shares": {k[len("share_") :]: statistics.median(r[k] for r in rows) for k in keys},
        "mfu": statistics.median(r["mfu"] for r in rows) if rows and rows[0].get("mfu") is not None else None,
        "losses": [r["loss"] for r in rows],
        "final_loss": rows[-1]["loss"] if rows else None,
        "goodput": rows[-1].get("goodput") if rows else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    shards = ensure_demo_shards(Path(args.shards), args.imagenet_like)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    out = header("end_to_end", preset=args.preset, nprocs=args.nprocs, steps=args.steps, overrides=args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        rows = train(args, shards, env, args.overrides, Path(tmp))
        if rows is None:
            return 1
        out.update(summarize(rows))
        if args.variant:
            vrows = train(args, shards, env, [*args.overrides, *args.variant], Path(tmp))
            if vrows is None:
                return 1
            v = summarize(vrows)
            # the same data, masks and seed: the variant's loss curve against the baseline's, logged step by step
            rel = [abs(a - b) / abs(b) for a, b in zip(v["losses"], out["losses"])]
            out["variant"] = {
                "overrides": args.variant,
                **v,
                "loss_max_rel_diff": max(rel) if rel else None,
                "loss_mean_rel_diff": statistics.mean(rel) if rel else None,
                "speedup": v["img_per_s"] / out["img_per_s"],
            }
    write_json(args.json, out)
    log.info("%.1f img/s; time shares %s", out["img_per_s"], {k: round(x, 3) for k, x in out["shares"].items()})
    if "variant" in out:
        log.info(
            "variant %s: %.1f img/s (x%.2f); loss curve within %.2f%% (max), %.2f%% (mean) of the baseline",
            args.variant,
            out["variant"]["img_per_s"],
            out["variant"]["speedup"],
            100 * out["variant"]["loss_max_rel_diff"],
            100 * out["variant"]["loss_mean_rel_diff"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
