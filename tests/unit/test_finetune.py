"""Fine-tuning pieces: layer decay, mixup, evaluation once per sample."""

from __future__ import annotations

import pytest
import torch

from engine.config import Config

TEST_ARCH = "deepmim_vit_test_patch4"  # ViT-test/4 at 16 px, depth 4, width 32


def test_layer_decay_groups_match_a_hand_computation():
    from engine.config import plan_run
    from engine.models.classifier import build_classifier
    from engine.tasks.classification import FinetuneTask

    cfg = Config()
    cfg.task, cfg.model.arch = "finetune", TEST_ARCH
    cfg.finetune.layer_decay, cfg.optim.weight_decay = 0.5, 0.05
    task = FinetuneTask()
    task.ctx = type("Ctx", (), {"cfg": cfg})()
    task.module = build_classifier(cfg, plan_run(cfg), 9)
    groups = task.param_groups()
    got = {}
    for g in groups:
        for p in g["params"]:
            got[id(p)] = (g["lr_scale"], g["weight_decay"])
    depth = 4
    for name, p in task.module.named_parameters():
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            scale = 0.5 ** (depth + 1)
        elif name.startswith("blocks."):
            scale = 0.5 ** (depth - int(name.split(".")[1]))  # the last block at 0.5, the first at 0.5**4
        else:
            assert name.startswith(("fc_norm", "head")), name
            scale = 1.0
        decay = 0.0 if p.ndim <= 1 or name in ("cls_token", "pos_embed") else 0.05
        assert got[id(p)] == pytest.approx((scale, decay)), name
    assert len(got) == sum(1 for _ in task.module.parameters())  # every parameter in exactly one group


def test_mixup_and_cutmix_targets_sum_to_one():
    from timm.data import Mixup

    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=5)
        xm, t = mix(x.clone(), y)
        assert xm.shape == x.shape and t.shape == (8, 5)
        assert torch.allclose(t.sum(dim=1), torch.ones(8)) and (t >= 0).all()


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_evaluation_reads_every_sample_once_across_ranks(demo_shards, kind):
    """72 samples over 5 ranks with batch 4: slices of 14 or 15, last batches smaller, none twice."""
    from data_pipeline.loaders.eval_loader import EvalLoader, EvalSpec

    keys, sizes = [], []
    for r in range(5):
        loader = EvalLoader(kind, EvalSpec(str(demo_shards), r, 5, 4, 16, num_threads=1, excluded=(3, 10)))
        for _ in range(2):  # a second evaluation reads the same slice again
            batch_keys = []
            for b in loader:
                assert b.img.shape[1:] == (3, 16, 16) and len(b.label) == len(b.keys)
                batch_keys += b.keys
                sizes.append(len(b.keys))
            keys.append(batch_keys)
    first = [k for i, ks in enumerate(keys) if i % 2 == 0 for k in ks]
    assert len(first) == len(set(first)) == 70  # 72 minus the two excluded rows
    assert keys[0] == keys[1] and 2 in sizes  # deterministic; a partial last batch
