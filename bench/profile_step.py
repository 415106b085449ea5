"""Where the time of one training step goes: a torch.profiler trace of the model step, with GPU
kernel time grouped into GEMMs, attention, compiled (Triton) fusions, other elementwise and
reduction kernels, the optimizer, and copies.

    python -m bench.profile_step --arch deepmim_vit_base_patch16 --target clip --config fused-compile \
        --batch 256 --json bench/results/profile.json
"""

from __future__ import annotations

import argparse
import logging
import sys

from bench import answer_help_early


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile_step",
        description="torch.profiler trace of one model step, kernel time grouped into GEMMs, attention, compiled "
        "fusions, other elementwise, optimizer and copies.",
    )
    ap.add_argument("--arch", default="deepmim_vit_test_patch4", help="encoder variant")
    ap.add_argument("--target", default="clip", help="clip or pixel")
    ap.add_argument("--config", default="fused-compile", help="path, as in bench.model_step --configs")
    ap.add_argument("--engine", default="plain", help="plain or deepspeed")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch (default 8)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps after 3 warm-up steps (default 3)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--json", help="write the results here")
    return ap


if __name__ == "__main__":
    answer_help_early(build_parser)

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import header, sync, write_json
from bench.model_step import build_step

log = logging.getLogger("bench.profile_step")

CATEGORIES = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90", "sm80")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled fusion (triton)", ("triton",)),
    ("copy / memset", ("memcpy", "memset", "copy_kernel", "cat", "catarray")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("elementwise / reduce (eager)", ("elementwise", "vectorized", "reduce", "gather", "scatter", "index", "softmax")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, _, flops, _ = build_step(
        args.arch, args.target, args.config, args.batch, args.engine, args.compile_backend, device
    )
    for _ in range(3):
        step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        sync()
    cuda = device.type == "cuda"
    by_cat: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        t = (evt.device_time_total if cuda else evt.self_cpu_time_total) / 1e3 / args.steps  # ms per step
        if cuda and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if t <= 0:
            continue
        by_cat[category(evt.key)] = by_cat.get(category(evt.key), 0.0) + t
        kernels.append({"name": evt.key[:120], "ms_per_step": t, "calls_per_step": evt.count / args.steps})
    kernels.sort(key=lambda k: -k["ms_per_step"])
    total = sum(by_cat.values())
    out = header(
        "profile_step",
        arch=args.arch,
        target=args.target,
        config=args.config,
        engine=args.engine,
        batch=args.batch,
        gflop_per_img=flops.per_image / 1e9,
        kernel_ms_per_step=total,
        by_category_ms=dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        top_kernels=kernels[:30],
    )
    write_json(args.json, out)
    for cat, ms in out["by_category_ms"].items():
        log.info("%-30s %8.2f ms/step (%4.1f%%)", cat, ms, 100 * ms / max(total, 1e-9))
    for k in kernels[:12]:
        log.info("%8.2f ms  x%-5.0f %s", k["ms_per_step"], k["calls_per_step"], k["name"][:90])
    return 0


if __name__ == "__main__":
    sys.exit(main())
