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

from bench import answer_help_early


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.data_pipeline",
        description="Training input throughput: DALI vs the PyTorch fallback loader at equal thread counts "
        "(decode, random-resized crop, flip, normalize).",
    )
    ap.add_argument("--shards", help="a shard folder (default: built from the bundled photos in a temporary folder)")
    ap.add_argument("--threads", default="1,2", help="DALI threads / DataLoader workers to try, comma-separated")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch (default 32)")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per loader (default 20)")
    ap.add_argument("--img-size", type=int, default=224, help="output size (default 224)")
    ap.add_argument("--per-class", type=int, default=40, help="without --shards: images per class to build")
    ap.add_argument("--imagenet-like", action="store_true", help="without --shards: 500 x 375 JPEGs of ~110 KB")
    ap.add_argument("--loaders", default="dali,torch", help="loaders to measure, comma-separated")
    ap.add_argument(
        "--decode",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where DALI decodes (auto: GPU when there is one)",
    )
    ap.add_argument(
        "--hw-decoder-loads",
        default="0.65",
        help="DALI mixed decode: shares of images for the hardware JPEG decoder to try, comma-separated (GPU only)",
    )
    ap.add_argument("--json", help="write the results here")
    return ap


if __name__ == "__main__":
    answer_help_early(build_parser)

from bench.common import header, write_json
from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.loaders.source import read_dataset

log = logging.getLogger("bench.data_pipeline")


def make_bench_shards(
    root: Path, per_class: int, size: int, imagenet_like: bool = False, shard_size_mb: float = 4.0
) -> Path:
    """Shards of random crops of the bundled photos; ``imagenet_like``: 500 x 375 JPEGs at quality 95
    (about ImageNet's typical size and 110 KB), else crops with a short side of ``size``."""
    from data_pipeline.shards.demo_data import build
    from data_pipeline.shards.make_shards import main as make_shards

    if imagenet_like:
        _imagenet_like(root / "src", per_class)
    else:
        build(root / "src", per_class=per_class, size=size, seed=0, quality=90)
    out = root / "shards"
    make_shards([str(root / "src"), str(out), "--shard-size-mb", str(shard_size_mb), "--workers", "1", "--no-progress"])
    return out


def _imagenet_like(out: Path, per_class: int) -> None:
    import io

    import numpy as np
    from PIL import Image

    from data_pipeline.shards.demo_data import PHOTOS

    rng = np.random.default_rng(0)
    for name, load in PHOTOS.items():
        photo = load()
        h, w = photo.shape[:2]
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ch, cw = int(rng.uniform(0.5, 1.0) * h), int(rng.uniform(0.5, 1.0) * w)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            img = Image.fromarray(photo[y : y + ch, x : x + cw]).convert("RGB").resize((500, 375), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            (out / name / f"{name}_{i:04d}.jpg").write_bytes(buf.getvalue())


def measure(
    kind: str,
    shards: Path,
    threads: int,
    batch: int,
    batches: int,
    img_size: int,
    decode: str = "auto",
    hw_decoder_load: float = 0.65,
) -> dict:
    info = read_dataset(shards)
    gpu = _cuda() and decode != "cpu"
    spec = LoaderSpec(
        str(shards),
        0,
        1,
        batch,
        batch,
        img_size,
        seed=0,
        num_threads=threads,
        decode_device="gpu" if gpu else "cpu",
        device_id=0 if _cuda() else None,
        hw_decoder_load=hw_decoder_load,
    )
    del info
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
    it.close()
    loader.close()
    return {
        "loader": kind,
        "threads": threads,
        "batch": batch,
        "images": n,
        "img_per_s": n / seconds,
        "decode": spec.decode_device,
        "hw_decoder_load": hw_decoder_load if kind == "dali" and gpu else None,
    }


def _stream(loader):
    while True:
        yield from loader


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        shards = (
            Path(args.shards) if args.shards else make_bench_shards(Path(tmp), args.per_class, 320, args.imagenet_like)
        )
        out = header("data_pipeline", shards=str(shards), img_size=args.img_size, results=[], ratios={})
        loads = [float(x) for x in args.hw_decoder_loads.split(",")]
        for threads in [int(t) for t in args.threads.split(",")]:
            rates = {}
            for kind in [k for k in args.loaders.split(",") if k]:
                for load in loads if kind == "dali" else [0.0]:
                    rec = measure(kind, shards, threads, args.batch, args.batches, args.img_size, args.decode, load)
                    log.info("%s", rec)
                    out["results"].append(rec)
                    rates.setdefault(kind, rec["img_per_s"])
            if "dali" in rates and "torch" in rates:
                out["ratios"][f"dali/torch at {threads} threads"] = rates["dali"] / rates["torch"]
        write_json(args.json, out)
    for k, v in out["ratios"].items():
        log.info("ratio %s: %.2f", k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
