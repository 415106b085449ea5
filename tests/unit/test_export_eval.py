"""Export layouts and the per-block evaluation, in-process."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from engine.models.mim import MaskedViTEncoder
from engine.models.registry import get_variant
from engine.tools.evaluate import knn, linear_probe
from engine.tools.export import split_encoder


@pytest.mark.parametrize("arch", ["deepmim_vit_large_patch16", "deepmim_vit_huge_patch14"])
def test_vit_l_h_layouts_match_timm(arch):
    """Names and shapes of our ViT-L/H encoders are timm's (built on the meta device: no memory, no init)."""
    spec = get_variant(arch)
    with torch.device("meta"):
        enc = MaskedViTEncoder(spec, spec.img_size)
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    ours = {
        k: tuple(v.shape) for k, v in split_encoder({f"encoder.{k}": v for k, v in enc.state_dict().items()})[0].items()
    }
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vit_b_layout_loads_into_timm_with_equal_features(tmp_path):
    spec = get_variant("deepmim_vit_base_patch16")
    torch.manual_seed(0)
    enc = MaskedViTEncoder(spec, spec.img_size).eval()
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state["decoders.pred.weight"] = torch.zeros(1)
    encoder, dropped = split_encoder(state)
    assert dropped == ["decoders.pred.weight"]
    save_file(encoder, str(tmp_path / "encoder.safetensors"))
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0).eval()
    model.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")), strict=True)
    x = torch.randn(1, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), enc.forward_all(x)[-1], atol=1e-4)


def test_probe_and_knn_on_separable_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    x = np.eye(4)[y] * 3 + rng.normal(0, 0.3, (120, 4))
    assert linear_probe(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    assert knn(x[::2].astype(np.float32), y[::2], x[1::2].astype(np.float32), y[1::2], k=5) == 1.0
    noise = rng.normal(0, 1, (120, 4))
    assert linear_probe(noise[::2], y[::2], noise[1::2], y[1::2]) < 0.6


def test_evaluator_warns_when_validation_is_not_held_out(demo_tree, demo_shards, demo_val_shards, tmp_path):
    from data_pipeline.dataset.table import overlap_warning
    from tests.conftest import make_shards

    assert "are the training shards" in overlap_warning(str(demo_shards), str(demo_shards))
    assert overlap_warning(str(demo_shards), str(demo_val_shards)) is None
    # a "validation" folder that reuses one training class's photos byte for byte
    cls = sorted(p for p in demo_tree.iterdir() if p.is_dir())[0]
    shutil.copytree(cls, tmp_path / "src" / cls.name)
    make_shards(tmp_path / "src", tmp_path / "mixed")
    n = len(list(cls.iterdir()))
    assert overlap_warning(str(demo_shards), str(tmp_path / "mixed")) == (
        f"{n} of {n} validation images are also in the training shards (same bytes)"
    )


def test_evaluate_errors_are_one_line_and_exit_2(demo_shards, demo_val_shards, tmp_path, capsys):
    """A missing folder, unlabeled shards, a folder that is not a classifier: one line each, exit 2."""
    from data_pipeline.shards.index_shards import main as index_main
    from engine.tools.evaluate import main

    cases = [
        (["--run", str(tmp_path / "nope"), "--train-shards", str(demo_shards)], "nope"),
        (["--random", "deepmim_vit_test_patch4", "--train-shards", str(tmp_path / "none")], "not a finished shard"),
        (["--classifier", str(tmp_path / "nope")], "nope"),
    ]
    unlabeled = tmp_path / "unlabeled"
    assert index_main([str(demo_shards), str(unlabeled), "--label", "none", "--workers", "1"]) == 0
    cases.append((["--random", "deepmim_vit_test_patch4", "--train-shards", str(unlabeled)], "unlabeled"))
    for args, expect in cases:
        assert main([*args, "--val-shards", str(demo_val_shards)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("evaluate: ") and expect in err, err
