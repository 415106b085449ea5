"""Benchmark: shard-writing images/s per writer process, and decode+augment throughput of the
written shards (DALI, and the fallback loader), as JSON.

    python -m bench.shard_writer [--per-class 64] [--size 400] [--workers 1,2] --json OUT

Source images are random crops of the bundled photos re-encoded as JPEG at about ImageNet's size.
Pass-through JPEGs are checked by a reduced-scale decode; the rate is bounded by that check and
by file I/O.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import answer_help_early


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.shard_writer",
        description="Shard-writing images/s per writer process, and decode+augment throughput of the written "
        "shards, on random crops of the bundled photos at about ImageNet's JPEG size.",
    )
    ap.add_argument("--per-class", type=int, default=64, help="source images per class (9 classes; default 64)")
    ap.add_argument("--size", type=int, default=400, help="short side of the source images in pixels (default 400)")
    ap.add_argument("--workers", default="1,2", help="writer process counts to try, comma-separated")
    ap.add_argument("--batches", type=int, default=10, help="batches read back per loader (default 10)")
    ap.add_argument("--json", help="write the results here")
    return ap


if __name__ == "__main__":
    answer_help_early(build_parser)

from bench.common import header, write_json
from bench.data_pipeline import measure
from data_pipeline.shards.demo_data import build
from data_pipeline.shards.make_shards import main as make_shards

log = logging.getLogger("bench.shard_writer")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        build(src, per_class=args.per_class, size=args.size, seed=0, quality=90)
        files = sum(1 for _ in src.rglob("*.jpg"))
        mb = sum(p.stat().st_size for p in src.rglob("*.jpg")) / 2**20
        out = header("shard_writer", images=files, source_mb=round(mb, 1), results=[])
        shards = None
        for w in [int(x) for x in args.workers.split(",")]:
            dst = Path(tmp) / f"shards_{w}"
            t0 = time.perf_counter()
            make_shards([str(src), str(dst), "--shard-size-mb", "4", "--workers", str(w), "--no-progress"])
            sec = time.perf_counter() - t0
            rec = {
                "stage": "write",
                "workers": w,
                "img_per_s": files / sec,
                "img_per_s_per_process": files / sec / w,
                "mb_per_s": mb / sec,
            }
            log.info("%s", rec)
            out["results"].append(rec)
            if shards is None:
                shards = dst
            else:
                shutil.rmtree(dst)
        for kind in ("dali", "torch"):
            rec = {"stage": "decode+augment", **measure(kind, shards, 1, 32, args.batches, 224)}
            log.info("%s", rec)
            out["results"].append(rec)
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
