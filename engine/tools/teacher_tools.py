"""Make teacher weight files with random values, in the real layouts.

No weights can be downloaded here, so tests and CPU demos build CLIP visual towers with random
values in exactly the layout OpenAI's ``clip.load(...).state_dict()`` or timm produce. A random
teacher exercises the whole DeepMIM-CLIP path; it is not a useful teacher.

    python -m engine.tools.teacher_tools random-clip OUT.pt [--width 64] [--layers 2] [--patch 8]
        [--grid 8] [--out-dim 32] [--layout openai|timm] [--seed 0]
    python -m engine.tools.teacher_tools random-timm OUT_DIR --arch vit_base_patch14_dinov2
        [--width 32] [--layers 2] [--heads 2] [--patch 4] [--img-size 32] [--seed 0]

``random-timm`` writes a timm hub folder (config.json with the architecture, its model_args and
pretrained_cfg, and model.safetensors) for any timm ViT, shrunk to the given width and depth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported inside the functions: --help answers at once
    import torch

    from engine.targets.teachers import ClipArch


def random_openai_clip(arch: ClipArch, seed: int = 0, with_text_tower: bool = True) -> dict[str, torch.Tensor]:
    import torch

    g = torch.Generator().manual_seed(seed)
    w, s = arch.width, 0.02

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    sd = {
        "visual.conv1.weight": rnd(w, 3, arch.patch, arch.patch),
        "visual.class_embedding": rnd(w),
        "visual.positional_embedding": rnd(arch.grid**2 + 1, w),
        "visual.ln_pre.weight": 1 + rnd(w),
        "visual.ln_pre.bias": rnd(w),
        "visual.ln_post.weight": 1 + rnd(w),
        "visual.ln_post.bias": rnd(w),
        "visual.proj": rnd(w, arch.out_dim),
    }
    for i in range(arch.layers):
        b = f"visual.transformer.resblocks.{i}."
        sd.update(
            {
                b + "ln_1.weight": 1 + rnd(w),
                b + "ln_1.bias": rnd(w),
                b + "attn.in_proj_weight": rnd(3 * w, w),
                b + "attn.in_proj_bias": rnd(3 * w),
                b + "attn.out_proj.weight": rnd(w, w),
                b + "attn.out_proj.bias": rnd(w),
                b + "ln_2.weight": 1 + rnd(w),
                b + "ln_2.bias": rnd(w),
                b + "mlp.c_fc.weight": rnd(4 * w, w),
                b + "mlp.c_fc.bias": rnd(4 * w),
                b + "mlp.c_proj.weight": rnd(w, 4 * w),
                b + "mlp.c_proj.bias": rnd(w),
            }
        )
    if with_text_tower:  # a full CLIP state dict also holds the text tower; the loader ignores it
        sd.update(
            {"token_embedding.weight": rnd(10, w), "logit_scale": torch.tensor(4.6), "text_projection": rnd(w, w)}
        )
    return sd


def random_timm_clip(arch: ClipArch, seed: int = 0) -> dict[str, torch.Tensor]:
    from engine.targets.teachers import openai_to_timm

    sd, _ = openai_to_timm(random_openai_clip(arch, seed, with_text_tower=False))
    return sd


def write_timm_teacher(
    out: str | Path,
    arch: str,
    seed: int = 0,
    num_classes: int = 0,
    config: bool = True,
    **model_args: Any,
) -> Path:
    """A timm ViT with random weights as a hub folder (``config``) or a bare ``.safetensors`` file
    (``out`` then names it). ``model_args`` shrink it (embed_dim, depth, num_heads, patch_size,
    img_size); the folder's config.json records them, as timm's own push_to_hub does."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    with torch.no_grad():  # timm zero-initializes some tensors (biases, layer scales): make every one count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    if not config:
        save_file(sd, str(out))
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    pcfg = {k: v for k, v in model.pretrained_cfg.items() if isinstance(v, (str, int, float, list, tuple, type(None)))}
    conf = {"architecture": arch, "num_classes": num_classes, "model_args": model_args, "pretrained_cfg": pcfg}
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m engine.tools.teacher_tools",
        description="Write teacher weight files with random values in the real layouts (for tests and CPU demos: "
        "no weights can be downloaded here; a random teacher exercises the whole path but teaches nothing).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    rc = sub.add_parser("random-clip", help="a random CLIP visual tower", description="A random CLIP visual tower.")
    rc.add_argument("out", help="the file to write (.pt)")
    rc.add_argument("--width", type=int, default=64, help="transformer width (default 64; ViT-B/16: 768)")
    rc.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2; ViT-B/16: 12)")
    rc.add_argument("--patch", type=int, default=8, help="patch size in pixels (default 8)")
    rc.add_argument("--grid", type=int, default=8, help="patches per side of the input (default 8: 64 px at patch 8)")
    rc.add_argument("--out-dim", type=int, default=32, help="output (projection) width (default 32; ViT-B/16: 512)")
    rc.add_argument(
        "--layout",
        choices=("openai", "timm"),
        default="openai",
        help="key layout: openai (clip.load(...).state_dict()) or timm (default openai)",
    )
    rc.add_argument("--seed", type=int, default=0, help="seed of the random values (default 0)")
    rt = sub.add_parser(
        "random-timm",
        help="a random timm ViT as a hub folder",
        description="A timm ViT (DINOv2, EVA-02, SigLIP, a CLIP tower, ...) with random weights, as a hub folder.",
    )
    rt.add_argument("out", help="the folder to write (config.json, model.safetensors)")
    rt.add_argument("--arch", required=True, help="timm architecture, e.g. vit_base_patch14_dinov2")
    rt.add_argument("--width", type=int, default=32, help="embedding width (default 32)")
    rt.add_argument("--layers", type=int, default=2, help="blocks (default 2)")
    rt.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    rt.add_argument("--patch", type=int, default=4, help="patch size in pixels (default 4)")
    rt.add_argument("--img-size", type=int, default=32, help="the size its position embedding is for (default 32)")
    rt.add_argument("--num-classes", type=int, default=0, help="head width; 0 = no head (default 0)")
    rt.add_argument("--seed", type=int, default=0, help="seed of the random values (default 0)")
    args = ap.parse_args(argv)
    if args.cmd == "random-timm":
        dims = {"embed_dim": args.width, "depth": args.layers, "num_heads": args.heads}
        dims |= {"patch_size": args.patch, "img_size": args.img_size}
        try:
            write_timm_teacher(args.out, args.arch, args.seed, args.num_classes, **dims)
        except Exception as err:  # timm refuses an unknown name or a shape the family cannot take
            print(f"random-timm: {args.arch}: {type(err).__name__}: {err}", file=sys.stderr)
            return 2
        print(f"wrote a random {args.arch} (width {args.width}, {args.layers} blocks) to {args.out}")
        return 0
    import torch

    from engine.targets.teachers import ClipArch

    arch = ClipArch(args.width, args.layers, args.patch, args.grid, args.out_dim)
    sd = random_openai_clip(arch, args.seed) if args.layout == "openai" else random_timm_clip(arch, args.seed)
    torch.save(sd, args.out)
    print(f"wrote random CLIP weights ({args.layout} layout, width {args.width}, {args.layers} layers) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
