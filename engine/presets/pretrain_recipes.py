"""Named presets: plain functions that return a ``Config``.

The ViT presets follow the paper's recipe (global batch 4096, 1600 epochs, base lr 1.5e-4 scaled
by batch/256, 40 warm-up epochs, AdamW (0.9, 0.95), weight decay 0.05, mask ratio 0.75). DeepMIM
presets use four 4-block x 512 decoders at the variant's taps; MAE presets are the plain baseline
(one 8-block x 512 decoder on the final block). Tiny presets are CPU-sized for the quickstart and
the tests.
"""

from __future__ import annotations

from engine.config import Config
from engine.models.registry import get_variant
from engine.presets.registry import preset


def _paper(arch: str, micro_batch: int, mae: bool, kind: str = "pixel") -> Config:
    cfg = Config()
    cfg.target.kind = kind
    cfg.model.arch = arch
    cfg.data.global_batch = 4096
    # auto micro-batch: the per-GPU share of the global batch (64 on 64 GPUs), accumulating only where
    # that share is larger than what fits in memory (e.g. 16 x 256 on a single 80 GB GPU for ViT-B)
    cfg.data.micro_batch, cfg.data.max_micro_batch = 0, micro_batch
    cfg.schedule.epochs = 1600
    cfg.schedule.warmup_epochs = 40
    if mae:
        cfg.model.taps = [get_variant(arch).depth]
        cfg.model.decoder_depth = 8
    return cfg


_VIT = {  # short name -> (variant, largest micro-batch per GPU that fits 80 GB with the default settings)
    "b16": ("deepmim_vit_base_patch16", 256),
    "l16": ("deepmim_vit_large_patch16", 128),
    "h14": ("deepmim_vit_huge_patch14", 64),
}

# Mixed and CLIP presets need a local teacher file: set target.generator (an MAE run folder or
# an official MAE .pth with its decoder) or target.teacher (CLIP ViT-B/16 weights, OpenAI or timm
# layout). Start-up fails with a message naming the field when it is missing.
for _short, (_arch, _mb) in _VIT.items():
    for _kind in ("pixel", "mixed", "clip"):
        preset(f"deepmim_vit_{_short}_{_kind}")(lambda a=_arch, m=_mb, k=_kind: _paper(a, m, mae=False, kind=k))
    preset(f"mae_vit_{_short}_pixel")(lambda a=_arch, m=_mb: _paper(a, m, mae=True))

# Feature teachers (target.kind=features) read a timm hub folder or a file whose architecture is
# named; the folders below are where `huggingface-cli download timm/<name> --local-dir <folder>`
# puts them. The student predicts the teacher's width from its four decoders.
FEATURE_TEACHERS = {  # preset suffix -> (teacher folder, architecture, projection head)
    "dinov2": ("weights/vit_base_patch14_dinov2.lvd142m", "", False),
    "clip_laion": ("weights/vit_base_patch16_clip_224.laion2b", "vit_base_patch16_clip_224.laion2b", True),
}


def _features(arch: str, micro_batch: int, teacher: str, teacher_arch: str, head: bool) -> Config:
    cfg = _paper(arch, micro_batch, mae=False, kind="features")
    cfg.target.teacher, cfg.target.teacher_arch, cfg.target.teacher_head = teacher, teacher_arch, head
    return cfg


for _short, (_arch, _mb) in _VIT.items():
    for _suffix, (_path, _tarch, _head) in FEATURE_TEACHERS.items():
        preset(f"deepmim_vit_{_short}_{_suffix}")(
            lambda a=_arch, m=_mb, p=_path, t=_tarch, h=_head: _features(a, m, p, t, h)
        )


def _tiny(mae: bool, kind: str = "pixel") -> Config:
    """ViT-tiny/8 at 64 px on the bundled real photos: trains on 2 CPU ranks in a few minutes."""
    cfg = Config()
    cfg.target.kind = kind
    if kind == "mixed":  # the two-stage recipe: stage 1 is mae_tiny_pixel into runs/mae_tiny
        cfg.target.generator = "runs/mae_tiny"
    if kind == "clip":  # random weights from `python -m engine.tools.teacher_tools random-clip` (see README)
        cfg.target.teacher = "data/tiny_clip_random.pt"
    if kind == "features":  # a random timm DINOv2 from `engine.tools.teacher_tools random-timm` (docs/teachers.md)
        cfg.target.teacher = "data/tiny_dinov2_random"
    cfg.model.arch = "deepmim_vit_tiny_patch8"
    cfg.model.decoder_dim = 128
    cfg.model.decoder_depth = 2
    cfg.model.decoder_heads = 4
    if mae:
        cfg.model.taps = [get_variant(cfg.model.arch).depth]
        cfg.model.decoder_depth = 4
    cfg.data.shards = "data/demo_shards"
    cfg.data.global_batch = 32
    cfg.data.micro_batch = 16
    cfg.data.num_threads = 1
    cfg.engine.precision = "auto"  # a CPU recipe: fp32 where the CPU has no native bf16 (10x faster there)
    cfg.optim.base_lr = 1.5e-3  # small batch, short run: a larger base lr than the paper's
    cfg.schedule.epochs = 20
    cfg.schedule.warmup_epochs = 2
    cfg.checkpoint.interval = 100
    cfg.checkpoint.keep_last = 2
    cfg.log.interval = 10
    return cfg


for _kind in ("pixel", "mixed", "clip"):
    preset(f"deepmim_tiny_{_kind}")(lambda k=_kind: _tiny(mae=False, kind=k))
preset("mae_tiny_pixel")(lambda: _tiny(mae=True))
preset("deepmim_tiny_dinov2")(lambda: _tiny(mae=False, kind="features"))


def _test(mae: bool = False, kind: str = "pixel") -> Config:
    """The smallest model (ViT-test/4 at 16 px): unit and launcher tests."""
    cfg = _tiny(mae=mae, kind=kind)
    cfg.model.arch = "deepmim_vit_test_patch4"
    cfg.model.decoder_dim = 32
    cfg.model.decoder_depth = 2 if mae else 1
    cfg.model.decoder_heads = 2
    if mae:
        cfg.model.taps = [get_variant(cfg.model.arch).depth]
    cfg.target.generator = "runs/mae_test" if kind == "mixed" else ""
    cfg.target.teacher = {"clip": "data/test_clip_random.pt", "features": "data/test_dinov2_random"}.get(kind, "")
    cfg.engine.precision = "bf16"  # the tests exercise the GPU recipe's precision on every CPU
    cfg.data.global_batch = 8
    cfg.data.micro_batch = 4
    cfg.schedule.epochs = 2
    cfg.schedule.warmup_epochs = 0.5
    cfg.checkpoint.interval = 2
    cfg.log.interval = 1
    return cfg


for _kind in ("pixel", "mixed", "clip"):
    preset(f"deepmim_test_{_kind}")(lambda k=_kind: _test(kind=k))
# a DINOv2-layout teacher (random weights: `python -m engine.tools.teacher_tools random-timm
# data/test_dinov2_random --arch vit_base_patch14_dinov2`)
preset("deepmim_test_dinov2")(lambda: _test(kind="features"))
preset("mae_test_pixel")(lambda: _test(mae=True))
