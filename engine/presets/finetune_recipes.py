"""Fine-tuning and linear-probing presets: the published protocols, each number traced to its source.

* ``finetune_vit_b16``: DeepMIM's README (github.com/OliverRensu/DeepMIM, "Fine-tuning on
  ImageNet-1K"): ``--batch_size 128`` on 8 GPUs (global 1024), ``--epochs 100 --blr 1e-4
  --layer_decay 0.6 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0``;
  the rest are the defaults of the MAE ``main_finetune.py`` it builds on: 5 warm-up epochs, min lr
  1e-6, half-cycle cosine per iteration, AdamW betas (0.9, 0.999), RandAugment
  ``rand-m9-mstd0.5-inc1``, label smoothing 0.1, mixup/cutmix probability 1.0 and switch
  probability 0.5, random-resized crop scale (0.08, 1) (timm's default), global average pooling
  with a new fc_norm, head initialized with a truncated normal of std 2e-5; evaluation resizes to
  256 and center-crops 224. Its log reaches 85.50% top-1 at epoch 99 from DeepMIM-CLIP ViT-B.
* ``finetune_mae_vit_{b16,l16,h14}``: MAE's FINETUNE.md (github.com/facebookresearch/mae):
  global batch 1024 for all three; ``--blr 5e-4 / 1e-3 / 1e-3``, ``--layer_decay 0.65 / 0.75 /
  0.75``, ``--drop_path 0.1 / 0.2 / 0.3``, ``--epochs 100 / 50 / 50``, weight decay 0.05, reprob
  0.25, mixup 0.8, cutmix 1.0; other values as above (MAE reports 83.6 / 85.9 / 86.9).
* ``linprobe_vit_{b16,l16,h14}``: MAE's linear probing (FINETUNE.md, ``main_linprobe.py``): the
  cls token (``--cls_token``) after the pretrained norm, ``BatchNorm1d(affine=False, eps=1e-6)``
  before the head (std 0.01), the encoder frozen, LARS (momentum 0.9) with ``--blr 0.1
  --weight_decay 0.0``, global batch 16384 (512 x 32 GPUs), 90 epochs, 10 warm-up epochs, min lr 0,
  random-resized crop (0.08, 1) + flip only. MAE notes 50 epochs suffice for ViT-L/H
  (``--set schedule.epochs=50``); the preset keeps the script's 90.
* ``*_tiny``, ``*_test``: the same protocols at CPU size (ViT-tiny/8 at 64 px, ViT-test/4 at
  16 px) on the bundled demo shards.

Fine-tuning presets need ``init.pretrained`` (a pretraining run folder, a checkpoint folder or an
``engine.tools.export`` folder) and ``data.shards`` / ``data.val_shards`` (ImageNet train and val).
"""

from __future__ import annotations

from engine.config import Config
from engine.presets.registry import preset

_VIT = {  # short name -> (variant, largest fine-tuning micro-batch per 80 GB GPU, linear-probe micro-batch)
    "b16": ("deepmim_vit_base_patch16", 128, 512),
    "l16": ("deepmim_vit_large_patch16", 64, 512),
    "h14": ("deepmim_vit_huge_patch14", 32, 256),
}


def _finetune_base(arch: str, micro: int) -> Config:
    cfg = Config()
    cfg.task = "finetune"
    cfg.model.arch = arch
    cfg.data.shards = "data/shards/train"
    cfg.data.val_shards = "data/shards/val"
    cfg.data.global_batch = 1024
    cfg.data.micro_batch, cfg.data.max_micro_batch = 0, micro  # auto: the per-GPU share, up to what fits
    cfg.data.crop_scale = [0.08, 1.0]
    cfg.optim.weight_decay = 0.05
    cfg.optim.betas = [0.9, 0.999]
    cfg.schedule.warmup_epochs = 5
    cfg.schedule.min_lr = 1e-6
    cfg.checkpoint.interval = 2000
    f = cfg.finetune
    f.global_pool, f.head_init_std = "avg", 2e-5
    f.smoothing, f.mixup, f.cutmix, f.mixup_prob, f.mixup_switch_prob = 0.1, 0.8, 1.0, 1.0, 0.5
    f.rand_augment, f.reprob, f.eval_crop = "rand-m9-mstd0.5-inc1", 0.25, 224 / 256
    return cfg


def deepmim_finetune(arch: str, micro: int) -> Config:
    cfg = _finetune_base(arch, micro)
    cfg.optim.base_lr = 1e-4
    cfg.schedule.epochs = 100
    cfg.finetune.layer_decay, cfg.finetune.drop_path = 0.6, 0.1
    return cfg


_MAE = {"b16": (5e-4, 0.65, 0.1, 100), "l16": (1e-3, 0.75, 0.2, 50), "h14": (1e-3, 0.75, 0.3, 50)}


def mae_finetune(short: str) -> Config:
    arch, micro, _ = _VIT[short]
    blr, decay, drop_path, epochs = _MAE[short]
    cfg = _finetune_base(arch, micro)
    cfg.optim.base_lr, cfg.schedule.epochs = blr, epochs
    cfg.finetune.layer_decay, cfg.finetune.drop_path = decay, drop_path
    return cfg


def linprobe(arch: str, micro: int) -> Config:
    cfg = Config()
    cfg.task = "linprobe"
    cfg.model.arch = arch
    cfg.data.shards = "data/shards/train"
    cfg.data.val_shards = "data/shards/val"
    cfg.data.global_batch = 16384
    cfg.data.micro_batch, cfg.data.max_micro_batch = 0, micro
    cfg.data.crop_scale = [0.08, 1.0]
    cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.momentum = "lars", 0.1, 0.0, 0.9
    cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.min_lr = 90, 10, 0.0
    cfg.checkpoint.interval = 1000
    f = cfg.finetune
    f.global_pool, f.freeze_encoder, f.head_norm, f.head_init_std = "token", True, "batchnorm", 0.01
    f.layer_decay, f.drop_path, f.smoothing, f.mixup, f.cutmix, f.rand_augment, f.reprob = 1.0, 0.0, 0.0, 0, 0, "", 0
    f.eval_crop = 224 / 256
    return cfg


preset("finetune_vit_b16")(lambda: deepmim_finetune(*_VIT["b16"][:2]))
for _short in _VIT:
    preset(f"finetune_mae_vit_{_short}")(lambda s=_short: mae_finetune(s))
    preset(f"linprobe_vit_{_short}")(lambda s=_short: linprobe(_VIT[s][0], _VIT[s][2]))


def _cpu(cfg: Config, arch: str, test: bool) -> Config:
    """The same protocol on the bundled photos (make quickstart writes data/demo_shards and the
    held-out data/demo_val_shards), pretrained weights from the quickstart run."""
    cfg.model.arch = arch
    cfg.data.shards, cfg.data.val_shards = "data/demo_shards", "data/demo_val_shards"
    cfg.init.pretrained = "runs/quickstart"
    cfg.data.global_batch, cfg.data.micro_batch = (16, 8) if not test else (8, 4)
    cfg.data.num_threads = 1
    # fp32 where the CPU has no native bf16 (the tiny preset); the tests keep the GPU recipe's bf16
    cfg.engine.precision = "auto" if not test else "bf16"
    # a small batch and a short run: a larger base lr than the ImageNet recipes' (as the tiny pretraining presets)
    cfg.optim.base_lr = 1e-2 if cfg.task == "finetune" else 2.0
    cfg.schedule.epochs, cfg.schedule.warmup_epochs = (10, 1) if not test else (2, 0.5)
    cfg.checkpoint.interval, cfg.checkpoint.keep_last = (50, 2) if not test else (2, 2)
    cfg.log.interval = 10 if not test else 1
    cfg.log.reconstructions = False
    return cfg


for _name, _arch, _test in (("tiny", "deepmim_vit_tiny_patch8", False), ("test", "deepmim_vit_test_patch4", True)):
    preset(f"finetune_{_name}")(lambda a=_arch, t=_test: _cpu(deepmim_finetune(a, 8), a, t))
    preset(f"linprobe_{_name}")(lambda a=_arch, t=_test: _cpu(linprobe(a, 8), a, t))
