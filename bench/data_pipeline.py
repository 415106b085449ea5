"""Benchmark (b): DALI vs the PyTorch fallback loader, images/s at equal thread counts.

    python -m bench.data_pipeline [--shards DIR] [--threads 1,2] [--batch 32] [--batches 20] --json OUT

Without ``--shards`` it builds shards from the bundled real photos (random crops of 256-384 px,
the size range of ImageNet JPEGs after the usual resizing) in a temporary folder. Both loaders
decode, random-resized-crop to 224, flip and normalize; DALI decodes on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from bench.common import header, write_json
from data_pipeline.loader import LoaderSpec, make_loader, read_dataset

log = logging.getLogger("bench.data_pipeline")


def make_bench_shards(root: Path, per_class: int, size: int) -> Path:
    from data_pipeline.demo_data import build
    from data_pipeline.make_shards import main as make_shards

    build(root / "src", per_class=per_class, size=size, seed=0, quality=90)
    out = root / "shards"
    make_shards([str(root / "src"), str(out), "--shard-size-mb", "4", "--workers", "1", "--no-progress"])
    return out


def measure(kind: str, shards: Path, threads: int, batch: int, batches: int, img_size: int) -> dict:
    info = read_dataset(shards)
    steps = info.num_samples // batch
    spec = LoaderSpec(str(shards), 0, 1, batch, steps, img_size, seed=0, num_threads=threads,
                      decode_device="gpu" if _cuda() else "cpu", device_id=0 if _cuda() else None)  # fmt: skip
    loader = make_loader(kind, spec)
    it = _stream(loader)
    next(it)  # warm-up: worker start, pipeline build, first decode
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b.img.shape[0]
    _ = float(b.img.sum())  # wait for the last batch (GPU outputs are asynchronous)
    seconds = time.perf_counter() - t0
    return {"loader": kind, "threads": threads, "batch": batch, "images": n, "img_per_s": n / seconds}


def _stream(loader):
    while True:
        yield from loader


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards) if args.shards else make_bench_shards(Path(tmp), args.per_class, 320)
        out = header("data_pipeline", shards=str(shards), img_size=args.img_size, results=[])
        for threads in [int(t) for t in args.threads.split(",")]:
            for kind in ("dali", "torch"):
                rec = measure(kind, shards, threads, args.batch, args.batches, args.img_size)
                log.info("%s", rec)
                out["results"].append(rec)
            d, t = out["results"][-2]["img_per_s"], out["results"][-1]["img_per_s"]
            out.setdefault("ratios", {})[f"dali/torch at {threads} threads"] = d / t
        write_json(args.json, out)
    for k, v in out["ratios"].items():
        log.info("ratio %s: %.2f", k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
