"""Benchmark (a): the model part of a training step on synthetic input.

    python -m bench.model_step --arch deepmim_vit_base_patch16 --targets clip,pixel \
        --batches 256,192,128 --configs fused-compile,fused,reference --deepspeed fused-compile \
        --json bench/results/model_step.json

A step is: masking, targets (CLIP teacher forward for ``clip``), forward of encoder and all
decoders with the fused loss, backward, and the AdamW update with bf16 weights and float32
master weights. Configurations:

* ``fused`` / ``reference``: the batched decoder pass vs the per-decoder Python loop;
* ``-compile``: regional torch.compile of every block (student and teacher);
* ``-ckpt``: activation checkpointing of every encoder and decoder block.

``plain`` steps do the mixed-precision update by hand (what ZeRO-2 does on one GPU, without the
framework); ``--deepspeed CONFIGS`` also runs those configurations through a real DeepSpeed ZeRO-2
engine, so the ratio shows the framework's overhead. The first configuration that fits decides
the micro-batch (largest of ``--batches``); the others reuse it. Results are written after every
configuration, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from bench import answer_help_early


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.model_step",
        description="The model part of a training step on synthetic input: fused vs reference decoders, eager vs "
        "compiled, plain vs DeepSpeed ZeRO-2; images/s, MFU, peak memory and ratios measured in one run.",
    )
    ap.add_argument("--arch", default="deepmim_vit_test_patch4", help="encoder variant (engine.models.registry)")
    ap.add_argument("--targets", default="clip,pixel", help="target kinds to measure, comma-separated: clip, pixel")
    ap.add_argument(
        "--batches", default="8", help="candidate micro-batches, largest first: the first that fits is used"
    )
    ap.add_argument(
        "--configs",
        default="fused-compile,fused,reference",
        help="paths, comma-separated: fused | reference, with any of -compile, -ckpt (activation "
        "checkpointing), -loop (per-decoder GEMMs inside the fused pass), -split (copy-free q/k/v), "
        "-flash/-efficient/-cudnn/-mathattn/-flex (decoder attention kernel), -fp8 (encoder linears "
        "in FP8), -graphs (compile mode reduce-overhead: CUDA graphs)",
    )
    ap.add_argument(
        "--deepspeed", default="", help="configurations to also run through DeepSpeed ZeRO-2 (comma-separated)"
    )
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager on CPU)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    ap.add_argument("--iters", type=int, default=8, help="timed steps; the median is reported (default 8)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; later configurations are skipped (0 = none)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--append", action="store_true", help="add to the results already in --json")
    ap.add_argument(
        "--ds-set",
        dest="ds_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DeepSpeed knob for the --deepspeed runs, e.g. zero_optimization.overlap_comm=false "
        "(repeatable; as engine.ds_overrides)",
    )
    ap.add_argument("--label", default="", help="a name for this run's rows (e.g. the DeepSpeed variant)")
    return ap


if __name__ == "__main__":
    answer_help_early(build_parser)

import torch

from bench.common import Budget, free_memory, header, is_oom, sync, time_steps, write_json
from engine.models.compile import try_compile
from engine.models.flops import flops_for_model, peak_flops
from engine.models.mim import DeepMIM, random_masking
from engine.models.param_groups import weight_decay_groups
from engine.models.registry import get_variant
from engine.targets.kinds import FeatureTarget, PixelTarget
from engine.targets.teachers import ClipArch, ClipTeacher, freeze

log = logging.getLogger("bench.model_step")

CLIP_B16 = ClipArch(width=768, layers=12, patch=16, grid=14, out_dim=512)
CLIP_TINY = ClipArch(width=64, layers=2, patch=4, grid=4, out_dim=32)


class PlainStep:
    """bf16 weights, float32 master weights and fused AdamW, without a framework."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-4):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        by_id = {id(p): m for p, m in zip(self.params, self.master)}
        groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in weight_decay_groups(model, 0.05)]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=self.master[0].is_cuda or None)

    def forward(self, model, *args):
        return model(*args)

    def update(self, loss: torch.Tensor) -> None:
        loss.backward()
        for p, m in zip(self.params, self.master):
            m.grad = p.grad.float()
            p.grad = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)


class DeepSpeedStep:
    """The same step through the trainer's DeepSpeed set-up: ds_configs/zero2_bf16.json (ZeRO-2,
    bf16) with any ``--ds-set`` knobs, the fused AdamW and the non-finite guard, in a world of one."""

    overrides: tuple[str, ...] = ()
    label = ""

    def __init__(self, model: torch.nn.Module, batch: int, lr: float = 1e-4):
        from engine.loop.ds_setup import apply_ds_overrides, load_ds_config
        from engine.loop.engines import deepspeed_engine
        from engine.loop.guard import NonFiniteGuard
        from engine.loop.zero_adapter import adapter_for

        _init_dist()
        cfg = load_ds_config(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2_bf16.json")
        apply_ds_overrides(cfg, list(self.overrides))
        cfg.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1)
        opt = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        self.engine, _ = deepspeed_engine(model, opt, cfg)
        self.guard = NonFiniteGuard(adapter_for(self.engine.optimizer), next(model.parameters()).device)

    def forward(self, model, *args):
        out = self.engine(*args)
        self.guard.observe_loss(out[0])
        return out

    def update(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()


def _init_dist() -> None:
    import deepspeed

    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from engine.loop.dist import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def decoder_shape(arch: str) -> tuple[int, int, int]:
    """(width, depth, heads): the paper's 512 x 4 x 16, or a toy size for the test variant."""
    return (32, 2, 4) if "test" in arch else (512, 4, 16)


def build_step(arch: str, target_kind: str, config: str, batch: int, engine: str, backend: str, device):
    """Returns (step function, model, flops per image, compile status)."""
    spec = get_variant(arch)
    dtype = torch.bfloat16
    img = spec.img_size
    grid = img // spec.patch_size
    torch.manual_seed(0)
    if target_kind == "clip":
        teacher = freeze(ClipTeacher(CLIP_TINY if "test" in arch else CLIP_B16, grid=grid)).to(device, dtype)
        target, pred_dim = FeatureTarget(teacher, "clip"), teacher.out_dim
        a = teacher.arch
        teacher_ref = dict(kind="clip", width=a.width, layers=a.layers, patch=a.patch, out_dim=a.out_dim)
        teacher_ref["img_size"] = grid * a.patch
    else:
        target, pred_dim, teacher_ref = PixelTarget(spec.patch_size), 3 * spec.patch_size**2, None
    dd, depth, heads = decoder_shape(arch)
    parts = set(config.split("-"))
    ckpt = 1 if "ckpt" in parts else 0
    kernels = {"flash": "flash", "efficient": "efficient", "cudnn": "cudnn", "mathattn": "math", "flex": "flex"}
    attn = next((kernels[k] for k in kernels if k in parts), "auto")
    model = DeepMIM(
        spec,
        img,
        list(spec.default_taps),
        dd,
        depth,
        heads,
        pred_dim,
        loss_kind="cosine" if target_kind == "clip" else "mse",
        fused=config.startswith("fused"),
        act_ckpt_encoder=ckpt,
        act_ckpt_decoder=ckpt,
        decoder_attention=attn,
        qkv_layout="split" if "split" in parts else "packed",
    )
    if "fp8" in parts:
        from engine.models.fp8 import convert_encoder_to_fp8

        convert_encoder_to_fp8(model)
    model = model.to(device, dtype)
    model.decoders.set_gemm("loop" if "loop" in parts else "bmm")
    model.train()
    stepper = DeepSpeedStep(model, batch) if engine == "deepspeed" else PlainStep(model)
    imgs = torch.randn(batch, 3, img, img, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    compiled, reason = False, ""
    if "compile" in config:
        probe_in = imgs.to(dtype).requires_grad_(True)
        pmask = random_masking(batch, model.num_patches, 0.75, gen, device)
        modules = [model] + ([target.module] if target_kind == "clip" else [])
        mode = "reduce-overhead" if "graphs" in parts else "default"
        compiled, reason = try_compile(
            modules, backend, mode, lambda: model(probe_in, pmask, target(imgs, pmask))[0], probe_in
        )

    def step() -> None:
        masks = random_masking(batch, model.num_patches, 0.75, gen, device)
        targets = target(imgs, masks)
        loss = stepper.forward(model, imgs.to(dtype), masks, targets)[0]
        stepper.update(loss)

    return step, model, flops_for_model(model, 0.75, teacher_ref, img), (compiled, reason)


def run_one(arch, target_kind, config, batch, engine, backend, warmup, iters, device) -> dict:
    label = DeepSpeedStep.label if engine == "deepspeed" else ""
    rec = {
        "arch": arch,
        "target": target_kind,
        "config": config,
        "engine": engine + (f" {label}" if label else ""),
        "batch": batch,
    }
    free_memory()
    t0 = time.perf_counter()
    try:
        step, model, flops, (compiled, reason) = build_step(arch, target_kind, config, batch, engine, backend, device)
        timing = time_steps(step, warmup, iters)
    except Exception as err:
        rec["status"] = "oom" if is_oom(err) else f"error: {type(err).__name__}: {str(err)[:300]}"
        free_memory()
        return rec
    sync()
    rate = batch / timing["median_s"]
    peak = peak_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    rec.update(
        status="ok",
        step_ms=timing["median_s"] * 1e3,
        step_ms_min=timing["min_s"] * 1e3,
        img_per_s=rate,
        gflop_per_img=flops.per_image / 1e9,
        mfu=rate * flops.per_image / peak if peak else None,
        peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        compiled=compiled if "compile" in config else None,
        compile_fallback=reason or None,
        setup_and_warmup_s=time.perf_counter() - t0 - timing["median_s"] * iters,
    )
    del step, model
    free_memory()
    return rec


def add_ratios(results: list[dict]) -> dict:
    """Speed-ups within each invocation (``run``; --append adds one): each configuration vs the
    eager reference path (plain), and DeepSpeed ZeRO-2 vs the plain step for the same
    configuration. Rows of different invocations are never paired."""
    ok = {
        (r.get("run", 1), r["arch"], r["target"], r["config"], r["engine"], r["batch"]): r
        for r in results
        if r.get("status") == "ok"
    }
    ratios = {}
    for (run, arch, tgt, config, engine, batch), r in ok.items():
        ref = ok.get((run, arch, tgt, "reference", "plain", batch))
        if ref and config != "reference":
            ratios[f"{arch}/{tgt}/{config}/{engine} vs reference"] = r["img_per_s"] / ref["img_per_s"]
        if engine.startswith("deepspeed"):
            plain = ok.get((run, arch, tgt, config, "plain", batch))
            if plain:
                ratios[f"{arch}/{tgt}/{config} {engine} step time / plain"] = plain["img_per_s"] / r["img_per_s"]
    return ratios


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from engine.loop.ops import use_environment_cache

    use_environment_cache()  # DeepSpeed's ops as the trainer uses them: built once per environment, not again here
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    DeepSpeedStep.overrides, DeepSpeedStep.label = tuple(args.ds_overrides), args.label
    budget = Budget(args.time_budget)
    out = header(
        "model_step",
        precision="bf16 weights, fp32 master, fp32 loss reduction",
        compile_backend=args.compile_backend,
        results=[],
    )
    if args.append and args.json and os.path.exists(args.json):
        import json

        out["results"] = json.loads(Path(args.json).read_text())["results"]
    run_id = 1 + max((r.get("run", 1) for r in out["results"]), default=0)
    configs = [c for c in args.configs.split(",") if c]
    ds_configs = [c for c in args.deepspeed.split(",") if c]
    batches = [int(b) for b in args.batches.split(",")]
    for tgt in [t for t in args.targets.split(",") if t]:
        batch = None
        plan = [(c, "plain") for c in configs] + [(c, "deepspeed") for c in ds_configs]
        for config, engine in plan:
            if budget.exhausted():
                out["results"].append(
                    {
                        "arch": args.arch,
                        "target": tgt,
                        "config": config,
                        "engine": engine,
                        "status": "skipped (time budget)",
                        "run": run_id,
                    }
                )
                continue
            tries = [b for b in batches if batch is None or b <= batch]
            for b in tries:
                rec = run_one(args.arch, tgt, config, b, engine, args.compile_backend, args.warmup, args.iters, device)
                log.info("%s", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()})
                if rec["status"] != "oom":
                    break
            if rec["status"] == "ok" and batch is None:
                batch = rec["batch"]  # the largest micro-batch that fits, for the remaining configurations
            rec["run"] = run_id
            out["results"].append(rec)
            out["ratios"] = add_ratios(out["results"])
            write_json(args.json, out)
    for k, v in out.get("ratios", {}).items():
        log.info("ratio %s: %.3f", k, v)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
