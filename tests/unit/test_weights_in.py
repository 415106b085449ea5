"""Weights users already have: official MAE and DeepMIM files, timm files and folders, checked
against the preset before launch and loaded without running anything from them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from engine.config import apply_overrides, plan_run, validate
from engine.errors import WeightsError
from engine.loop.dist import DistInfo
from engine.loop.engines import local_engine
from engine.loop.trainer import Trainer
from engine.models.classifier import build_classifier, load_encoder
from engine.models.mim import DeepMIM
from engine.models.registry import get_variant
from engine.presets import get_preset
from engine.tasks.classification import FinetuneTask
from engine.weights.formats import inspect_file
from engine.weights.sources import encoder_weights
from tests.helpers import MARK, Payload, to_official_layout

ARCH = "deepmim_vit_test_patch4"  # width 32, depth 4, patch 4, 16 px; default taps 2, 3, 4
TIMM_KW = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 0}


def pixel_model(taps=(4,), depth=2) -> DeepMIM:
    torch.manual_seed(0)
    return DeepMIM(get_variant(ARCH), 16, list(taps), 32, depth, 2, pred_dim=48)


def encoder_of(model: DeepMIM) -> dict[str, torch.Tensor]:
    return {k[len("encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One file of every form, all holding the same encoder weights."""
    d = tmp_path_factory.mktemp("weights")
    mae = pixel_model()
    deepmim = pixel_model(taps=(2, 3, 4))
    deepmim.encoder.load_state_dict(mae.encoder.state_dict())
    clip = DeepMIM(get_variant(ARCH), 16, [2, 3, 4], 32, 2, 2, pred_dim=24)
    clip.encoder.load_state_dict(mae.encoder.state_dict())
    out = {}
    torch.save({"model": encoder_of(mae)}, out.setdefault("mae", d / "mae_pretrain_vit_test.pth"))
    torch.save({"model": to_official_layout(mae)}, out.setdefault("mae-full", d / "mae_pretrain_vit_test_full.pth"))
    args = argparse.Namespace(model="mae_vit_test", norm_pix_loss=True, blr=1.5e-4, epochs=800, output_dir="./out")
    checkpoint = {
        "model": to_official_layout(mae),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "epoch": 799,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
        "args": args,
    }
    torch.save(checkpoint, out.setdefault("mae-checkpoint", d / "checkpoint-799.pth"))
    torch.save({"model": to_official_layout(deepmim, numbered=True)}, out.setdefault("deepmim", d / "deepmim.pth"))
    torch.save(
        {"model": to_official_layout(clip, numbered=True)}, out.setdefault("deepmim-clip", d / "deepmim_clip.pth")
    )
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KW)
    tm.load_state_dict(encoder_of(mae), strict=True)
    save_file(tm.state_dict(), str(out.setdefault("timm", d / "vit_test.safetensors")))
    torch.save(tm.state_dict(), out.setdefault("timm-bin", d / "pytorch_model.bin"))
    folder = d / "vit_test_patch4_16.mae"  # a timm / Hugging Face model folder
    folder.mkdir()
    save_file(tm.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": TIMM_KW}))
    out["timm-folder"] = folder
    out["encoder"] = encoder_of(mae)
    return out


KINDS = {
    "mae": "mae",
    "mae-full": "mae-full",
    "mae-checkpoint": "mae-checkpoint",
    "deepmim": "deepmim",
    "deepmim-clip": "deepmim-clip",
    "timm": "timm",
    "timm-bin": "timm",
    "timm-folder": "timm",
}


@pytest.mark.parametrize("form", list(KINDS))
def test_every_form_is_recognized_and_gives_the_same_encoder(files, form):
    info = inspect_file(files[form])
    assert info.kind == KINDS[form] and (info.shape.width, info.shape.depth, info.shape.patch) == (32, 4, 4)
    assert info.shape.img_size == 16
    w = encoder_weights(files[form])
    want = files["encoder"]
    assert w.state.keys() == want.keys() and all(torch.equal(w.state[k], want[k]) for k in want)
    if form in ("mae-full", "mae-checkpoint", "deepmim", "deepmim-clip"):
        assert any(k.startswith(("decoder_", "mask_token")) for k in w.dropped)  # reported, not loaded
    # into the fine-tuning classifier: the final norm dropped under average pooling, fc_norm and head new
    cfg = get_preset("finetune_test")
    model = build_classifier(cfg, plan_run(cfg), 9)
    report = load_encoder(model, w.state, form)
    assert report["dropped"] == ["norm.bias", "norm.weight"]
    assert report["new"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_an_argparse_namespace_is_data_but_nothing_else_is(files, tmp_path):
    """checkpoint-N.pth carries main_pretrain.py's args: read as data. A payload in the same place
    is refused and never runs."""
    ckpt = torch.load(files["mae-checkpoint"], weights_only=False)  # the test's own file
    ckpt["args"] = Payload(tmp_path / MARK)
    torch.save(ckpt, tmp_path / "checkpoint-1.pth")
    with pytest.raises(WeightsError, match="refused to read this file"):
        encoder_weights(tmp_path / "checkpoint-1.pth")
    assert not (tmp_path / MARK).exists()


def finetune_in_process(run: Path, shards: Path, val: Path, init: Path) -> dict:
    cfg = get_preset("finetune_test")
    sets = [
        f"data.shards={shards}",
        f"data.val_shards={val}",
        f"init.pretrained={init}",
        f"run_dir={run}",
        "schedule.max_steps=2",
        "data.loader=torch",
        "log.tensorboard=false",
    ]
    apply_overrides(cfg, sets)
    validate(cfg)
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    task = FinetuneTask()
    result = Trainer(cfg, dist, task, engine_factory=local_engine).train()
    return {"result": result, "init": task.init}


@pytest.mark.parametrize("form", ["mae", "mae-checkpoint", "deepmim-clip", "timm-folder"])
def test_fine_tuning_starts_from_an_official_or_timm_file(files, demo_shards, demo_val_shards, tmp_path, form):
    out = finetune_in_process(tmp_path / "run", demo_shards, demo_val_shards, files[form])
    assert out["result"]["complete"] and out["result"]["step"] == 2
    init = out["init"]
    assert init["kind"] == KINDS[form] and init["new"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "norm.weight" in init["dropped"]


def test_a_mismatched_file_is_refused_before_launch_in_one_line(tmp_path, demo_shards, demo_val_shards, capsys):
    from engine.finetune import main

    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TIMM_KW, "embed_dim": 48, "num_heads": 3})
    save_file(wide.state_dict(), str(tmp_path / "wide.safetensors"))
    coarse = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TIMM_KW, "patch_size": 8})
    save_file(coarse.state_dict(), str(tmp_path / "patch8.safetensors"))
    base = [
        "--preset",
        "finetune_test",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.shards={demo_shards}",
        "--set",
        f"data.val_shards={demo_val_shards}",
        "--check",
    ]
    for name, says in (("wide", "width 48"), ("patch8", "patch 8")):
        assert main([*base, "--set", f"init.pretrained={tmp_path / name}.safetensors"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "deepmim_vit_test_patch4" in err and "width 32" in err, err
    # another image size is fine: the position embedding is resampled when it loads
    big = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TIMM_KW, "img_size": 32})
    save_file(big.state_dict(), str(tmp_path / "big.safetensors"))
    assert main([*base, "--set", f"init.pretrained={tmp_path / 'big.safetensors'}"]) == 0


def test_generators_are_checked_before_launch_and_a_deepmim_clip_checkpoint_is_named(
    files, demo_shards, tmp_path, capsys
):
    from engine.pretrain import main
    from engine.targets.teachers import load_generator

    def check(generator: Path) -> tuple[int, str]:
        sets = [
            "--set",
            "target.kind=mixed",
            "--set",
            f"target.generator={generator}",
            "--set",
            "target.generator_norm_pix=true",
            "--set",
            f"data.shards={demo_shards}",
        ]
        code = main(["--preset", "deepmim_test_pixel", "--run-dir", str(tmp_path / "r"), *sets, "--check"])
        return code, capsys.readouterr().err

    code, err = check(files["deepmim-clip"])
    assert code == 2 and "official DeepMIM-CLIP checkpoint (3 decoders predicting 24-d CLIP features)" in err, err
    assert "needs a pixel MAE" in err and err.count("\n") == 1
    code, err = check(files["mae"])
    assert code == 2 and "without a decoder" in err
    for ok in ("mae-full", "mae-checkpoint", "deepmim"):
        assert check(files[ok])[0] == 0
    # an official DeepMIM pixel model generates with its final decoder
    gen = load_generator(files["deepmim"], 16)
    want = pixel_model(taps=(2, 3, 4))
    assert torch.equal(gen.model.decoders.pred.weight[0], want.decoders.pred.weight[2])
