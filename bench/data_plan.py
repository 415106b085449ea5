"""Benchmark: what one rank's epoch plan costs, global order vs block order, up to billions of samples.

    python -m bench.data_plan [--sizes 1280000,100000000,2000000000] [--ranks 64] --json OUT

A synthetic manifest (shards of ``--shard-size`` samples; only the shard boundaries, no images), an
epoch resumed on a new world after half of it: phase 1 on ``--ranks`` ranks, phase 2 on three quarters
of them with ``--exclusions`` newly excluded rows. Each case runs in a fresh process so its peak
memory is its own: the time to compute one rank's stream and its first micro-batch, the peak resident
memory it added, and how fast the rest of the rank's rows are produced.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from bench import answer_help_early


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.data_plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1280000,100000000,2000000000", help="dataset sizes, comma-separated")
    ap.add_argument("--orders", default="global,block", help="orders to measure, comma-separated")
    ap.add_argument("--ranks", type=int, default=64, help="ranks of the first phase (default 64)")
    ap.add_argument("--exclusions", type=int, default=10_000, help="rows excluded in the second phase")
    ap.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (img2dataset's default)")
    ap.add_argument("--window", type=int, default=4, help="block order: shards per shuffle window")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--global-limit", type=float, default=2e8, help="global order: largest size to run (memory)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case, in a child process
    return ap


def peak_kb() -> int:
    """This process's peak resident memory (VmHWM: reset at exec, unlike ru_maxrss, which a child
    inherits from the process that forked it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def one_case(order: str, n: int, a: argparse.Namespace) -> dict:
    """Run in a child process: plan one rank's stream, measure time and added peak memory."""
    import numpy as np

    from data_pipeline.order.block_order import BlockOrder
    from data_pipeline.order.global_order import GlobalOrder
    from data_pipeline.order.phases import Phase

    base_kb = peak_kb()
    shards = -(-n // a.shard_size)
    shard_rows = np.minimum(np.arange(shards + 1, dtype=np.int64) * a.shard_size, n)
    world1, world2 = a.ranks, max(1, a.ranks * 3 // 4)
    per_rank = n // world1 // a.micro_batch * a.micro_batch
    excluded = tuple(sorted(set(np.random.default_rng(0).integers(0, n, a.exclusions).tolist())))
    phases = [Phase(world1, per_rank // 2 // a.micro_batch * a.micro_batch), Phase(world2, 0, excluded)]
    t0 = time.perf_counter()
    plan = GlobalOrder(n) if order == "global" else BlockOrder(shard_rows, a.window)
    stream = plan.stream(7, 3, phases, world2 // 3, a.micro_batch)
    batches = stream.batches(a.micro_batch)
    first = next(batches)
    plan_s = time.perf_counter() - t0
    peak_mb = (peak_kb() - base_kb) / 1024
    t1, rows = time.perf_counter(), len(first)
    for b in batches:  # produce more of the rank's share: the cost of reading on
        rows += len(b)
        if rows >= 2_000_000 or time.perf_counter() - t1 > 10:
            break
    rate = rows / max(time.perf_counter() - t1, 1e-9)
    return {
        "order": order,
        "samples": n,
        "shards": shards,
        "ranks": f"{world1} then {world2}",
        "exclusions": len(excluded),
        "plan_s": round(plan_s, 3),
        "peak_mb": round(peak_mb, 1),
        "rank_rows_left": stream.length,
        "rows_per_s": round(rate),
        "first_row": int(first[0]),
        "status": "ok",
        "note": "",
    }


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.one:
        order, n = a.one.split(":")
        print(json.dumps(one_case(order, int(n), a)))
        return 0
    from bench.common import header, write_json

    results = []
    own = ("json", "one", "sizes", "orders")
    forward = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in own]
    for n in (int(float(s)) for s in a.sizes.split(",")):
        for order in a.orders.split(","):
            if order == "global" and n > a.global_limit:
                gb = n * 8 * 3 / 1e9  # the permutation plus the masks and copies a phase makes
                note = f"needs ~{gb:.0f} GB per rank"
                results.append({"order": order, "samples": n, "status": "not run", "note": note})
                print(f"{order:6s} {n:>13,d}: not run (needs ~{gb:.0f} GB per rank)", flush=True)
                continue
            cmd = [sys.executable, "-m", "bench.data_plan", f"--one={order}:{n}", *forward]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                results.append({"order": order, "samples": n, "status": f"failed: {out.stderr.strip()[-300:]}"})
                print(f"{order:6s} {n:>13,d}: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"{order:6s} {n:>13,d}: plan {r['plan_s']:.3f} s, +{r['peak_mb']:.0f} MB peak, "
                f"{r['rows_per_s'] / 1e6:.1f} M rows/s after",
                flush=True,
            )
    write_json(a.json, {**header("data_plan", micro_batch=a.micro_batch, window=a.window), "results": results})
    return 0


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
