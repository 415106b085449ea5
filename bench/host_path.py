"""Benchmark: CPU time the training thread spends on input, per sample, the old path against today's.

    python -m bench.host_path [--per-class 150] [--micro 64,256] [--repeats 3] --json OUT

ImageNet-like shards (500 x 375 JPEGs at quality 95); for each loader (DALI's CPU pipeline, the PyTorch
fallback with two workers) and micro-batch, the CPU time of the thread that calls ``next(loader)``
(``time.thread_time``: DALI's decoding threads and the DataLoader's workers are not counted, the calls
made on the training thread are), over a few batches after the first, median of ``--repeats``:

* ``before``: batches prepared on the training thread, crops from a generator per sample (version 1),
  sample keys and labels built for every batch (what the loaders did before);
* ``after``: batches prepared in the loader's producer thread, crops for a batch in one call (version 2),
  keys only when logged, labels only when the task reads them (pretraining: none).

On a GPU the copy out of DALI's pipeline is a device copy; on this CPU it is a memcpy of the batch, made
in whichever thread prepares the batch: counted in ``before``, not in ``after``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import answer_help_early

PATHS = {
    "before": {"threaded": False, "crop_version": 1, "keys": True, "labels": True},
    "after": {"threaded": True, "crop_version": 2, "keys": False, "labels": False},
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.host_path", description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=150, help="images per class (9 classes; default 150)")
    ap.add_argument("--micro", default="64,256", help="micro-batches, comma-separated")
    ap.add_argument("--loaders", default="dali,torch", help="loaders to measure, comma-separated (dali, torch)")
    ap.add_argument("--batches", type=int, default=4, help="batches measured after the first (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per case; the median is reported (default 3)")
    ap.add_argument("--img-size", type=int, default=224, help="crop size in pixels (default 224)")
    ap.add_argument("--json", help="write the results here")
    return ap


def measure(kind: str, shards: str, micro: int, path: str, a: argparse.Namespace) -> tuple[float, float]:
    """(training-thread CPU us per sample, wall us per sample) over ``a.batches`` batches after the first."""
    from data_pipeline.loaders.base import LoaderSpec
    from data_pipeline.loaders.factory import make_loader

    spec = LoaderSpec(shards, 0, 1, micro, micro, img_size=a.img_size, seed=0, num_threads=2, **PATHS[path])
    loader = make_loader(kind, spec)
    try:
        batches = iter(loader)
        next(batches)  # pipelines, workers and the first decode start
        n, cpu0, wall0 = 0, time.thread_time(), time.perf_counter()
        for _ in range(a.batches):
            n += len(next(batches).rows)
        return 1e6 * (time.thread_time() - cpu0) / n, 1e6 * (time.perf_counter() - wall0) / n
    finally:
        loader.close()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from bench.common import header, write_json
    from bench.data_pipeline import make_bench_shards

    micros = [int(m) for m in a.micro.split(",")]
    results, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = str(make_bench_shards(Path(tmp), a.per_class, 320, imagenet_like=True, shard_size_mb=16))
        for kind in a.loaders.split(","):
            for micro in micros:
                got = {}
                for path in PATHS:
                    runs = [measure(kind, shards, micro, path, a) for _ in range(a.repeats)]
                    cpu = statistics.median(r[0] for r in runs)
                    wall = statistics.median(r[1] for r in runs)
                    got[path] = cpu
                    results.append(
                        {"loader": kind, "micro_batch": micro, "path": path, "us_per_sample": round(cpu, 2),
                         "wall_us_per_sample": round(wall, 1), "repeats": [round(r[0], 2) for r in runs]}
                    )  # fmt: skip
                    print(
                        f"{kind:5s} micro {micro:3d} {path:6s}: {cpu:6.1f} us/sample on the training thread", flush=True
                    )
                ratios[f"{kind}_micro{micro}_before_over_after"] = round(got["before"] / max(got["after"], 1e-9), 1)
    write_json(a.json, {**header("host_path", batches=a.batches, img_size=a.img_size), "results": results,
                        "ratios": ratios})  # fmt: skip
    return 0


if __name__ == "__main__":
    answer_help_early(build_parser)
    raise SystemExit(main())
