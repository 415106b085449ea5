"""Benchmark: training input from local shards vs an S3-compatible server, cold and warm cache.

    python -m bench.data_remote [--per-class 120] [--step-ms 120] --json OUT

Builds ImageNet-like shards (500 x 375 JPEGs at quality 95, from the bundled photos), starts a local
S3-compatible server (moto's server mode, loopback, random port), uploads the shards with
``data_pipeline.upload`` and reads one epoch per setting with the DALI loader in the block order:

* ``local``: the shard folder on disk;
* ``s3-cold``: the bucket through an empty node cache (every shard fetched while training);
* ``s3-warm``: the bucket again, every shard already in the cache.

Each setting runs twice: without compute (the loader's own rate, img/s) and with a training step
emulated by ``--step-ms`` of sleep per batch, where the share of time spent waiting for data is what
a trainer would see (``share_data_wait`` in its step log).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import answer_help_early


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.data_remote", description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=120, help="images per class (9 classes; default 120)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--step-ms", type=float, default=120.0, help="emulated training step per batch (ms)")
    ap.add_argument("--shard-size-mb", type=float, default=4.0)
    ap.add_argument("--json", help="write the results here")
    return ap


if __name__ == "__main__":
    answer_help_early(build_parser)

from bench.common import header, write_json

log = logging.getLogger("bench.data_remote")


@contextlib.contextmanager
def local_s3(home: Path):
    """moto's S3 server on a random loopback port, with credentials for it only."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_epoch(shards: str, a: argparse.Namespace, cache: Path | None, step_s: float) -> dict:
    from data_pipeline.dataset.locations import RemoteSpec
    from data_pipeline.loaders.base import LoaderSpec
    from data_pipeline.loaders.factory import make_loader

    remote = RemoteSpec(cache_dir=str(cache), cache_gb=50) if cache is not None else None
    spec = LoaderSpec(
        shards, 0, 1, a.batch, a.batch, a.img_size, seed=0, num_threads=a.threads, order="block", remote=remote
    )
    t0 = time.perf_counter()
    loader = make_loader("dali", spec)
    it = iter(loader)
    images, wait = 0, 0.0
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t
        images += len(b.keys)
        if step_s:
            time.sleep(step_s)
    total = time.perf_counter() - start
    fetched = loader.table.source.fetched_bytes if loader.table.remote else 0
    loader.close()
    return {
        "images": images,
        "seconds": round(total, 2),
        "img_per_s": images / total,
        "share_data_wait": wait / total,
        "startup_s": round(start - t0, 2),
        "fetched_mb": round(fetched / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from bench.data_pipeline import make_bench_shards
    from data_pipeline.shards.upload import upload

    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    results, rate = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = make_bench_shards(tmp, a.per_class, 320, imagenet_like=True, shard_size_mb=a.shard_size_mb)
        tar_mb = sum(p.stat().st_size for p in local.glob("*.tar")) / 1e6
        with local_s3(tmp / "aws"):
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            upload(local, "s3://bench/imagenet-like", workers=4)
            for step_ms in (0.0, a.step_ms):
                cache = tmp / f"cache-{step_ms:g}"
                for setting, shards, cache_dir in (
                    ("local", str(local), None),
                    ("s3-cold", "s3://bench/imagenet-like", cache),
                    ("s3-warm", "s3://bench/imagenet-like", cache),
                ):
                    r = {"setting": setting, "step_ms": step_ms, **read_epoch(shards, a, cache_dir, step_ms / 1e3)}
                    results.append(r)
                    rate[(setting, step_ms)] = r["img_per_s"]
                    log.info(
                        "%-8s step %5.0f ms: %6.1f img/s, data wait %4.1f%%, fetched %.1f MB",
                        setting,
                        step_ms,
                        r["img_per_s"],
                        100 * r["share_data_wait"],
                        r["fetched_mb"],
                    )
    ratios = {
        f"{s} / local img/s (step {m:g} ms)": rate[(s, m)] / rate[("local", m)]
        for s in ("s3-cold", "s3-warm")
        for m in (0.0, a.step_ms)
    }
    out = header(
        "data_remote",
        endpoint="moto server (loopback)",
        images_per_epoch=results[0]["images"],
        shard_mb=round(tar_mb, 1),
        mean_image_kb=round(tar_mb * 1e3 / max(1, results[0]["images"]), 1),
        batch=a.batch,
        threads=a.threads,
        results=results,
        ratios=ratios,
    )
    write_json(a.json, out)
    for k, v in ratios.items():
        log.info("ratio %s: %.2f", k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
