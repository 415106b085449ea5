"""Before launch, not after: what the ranks would only find after starting is found by the check that
launchers/pretrain.sh runs first (``--check``), as one line and exit code 2. In-process."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from tests.helpers import in_process_config, photo_bytes, train_in_process, write_tar
from tests.memory_store import MemoryStore


def check(capsys, stage: str, preset: str, run: Path, *sets: str) -> tuple[int, str]:
    from engine.cli import main

    argv = ["--preset", preset, "--run-dir", str(run), *[a for s in sets for a in ("--set", s)], "--check"]
    code = main(stage, "test", lambda: None, argv)
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------ labels


def sparse_tars(folder: Path, demo_tree: Path, count: int, start: int = 0) -> Path:
    """WebDataset tars whose .cls labels are 0 and 7 (integer labels of a wider label space)."""
    folder.mkdir()
    members = []
    for i in range(start, start + count):
        data, _ = photo_bytes(demo_tree, i)
        members += [(f"{i:06d}.jpg", data), (f"{i:06d}.cls", b"0" if i % 2 else b"7")]
    write_tar(folder / "part-0.tar", members)
    return folder


def test_sparse_integer_labels_are_mapped_to_a_dense_head_and_train(demo_tree, tmp_path, capsys):
    """Labels {0, 7} indexed from existing tars: a head of two outputs (label 7 is output 1), the validation
    labels mapped alike; fine-tuning with mixup trains (timm's mixup would index a one-hot of 2 at 7), and
    the checkpoint records which class each output is."""
    from data_pipeline.shards.index_shards import main as index_main
    from engine.config import apply_overrides, validate
    from engine.loop.dist import DistInfo
    from engine.loop.engines import local_engine
    from engine.loop.trainer import Trainer
    from engine.presets import get_preset
    from engine.run_folder import checkpoints as ckpt
    from engine.tasks.classification import FinetuneTask

    train, val = tmp_path / "train", tmp_path / "val"
    assert index_main([str(sparse_tars(tmp_path / "tr", demo_tree, 32)), str(train), "--workers", "1"]) == 0
    assert index_main([str(sparse_tars(tmp_path / "va", demo_tree, 8, 40)), str(val), "--workers", "1"]) == 0
    sets = [f"data.shards={train}", f"data.val_shards={val}", "init.pretrained=", "data.loader=torch"]
    code, err = check(capsys, "finetune", "finetune_test", tmp_path / "unused", *sets)
    assert code == 0, err
    cfg = get_preset("finetune_test")
    apply_overrides(cfg, [*sets, f"run_dir={tmp_path / 'run'}", "schedule.max_steps=2", "log.tensorboard=false"])
    validate(cfg)
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    task = FinetuneTask()
    result = Trainer(cfg, cpu, task, engine_factory=local_engine).train()
    assert result["complete"] and task.num_classes == 2 and task.head.lookup[7] == 1
    marker = ckpt.read_marker(ckpt.newest_complete(tmp_path / "run" / "checkpoints"))
    assert marker["classifier"]["label_names"] == ["0", "7"]
    code, err = check(capsys, "finetune", "finetune_test", tmp_path / "unused", *sets, "finetune.num_classes=5")
    assert code == 2 and "labels [7] are outside finetune.num_classes=5" in one_line(err)


# ------------------------------------------------------------------ settings


def test_a_cache_dir_that_is_a_file_is_refused(demo_shards, tmp_path, capsys):
    from data_pipeline.shards.upload import upload

    url = f"mem://{uuid.uuid4().hex[:8]}/demo"
    upload(demo_shards, url, workers=2)
    (tmp_path / "a-file").write_text("not a folder")
    sets = [f"data.shards={url}", f"data.cache_dir={tmp_path / 'a-file'}"]
    code, err = check(capsys, "pretrain", "deepmim_test_pixel", tmp_path / "run", *sets)
    assert code == 2 and "data.cache_dir=" in one_line(err) and "a file, not a folder" in err
    assert MemoryStore.buckets  # (the in-memory store answered the check)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("gradient_clippin=1.0", "did you mean 'gradient_clipping'"),
        ("zero_optimization.reduce_bucket_size=lots", "DeepSpeed refuses it"),
        ("gradient_clipping=x", "gradient_clipping='x'"),
        ("zero_optimization.stage=3", "ZeRO stages 1 and 2"),
        ("bf16.enabled=maybe", "engine.precision"),
    ],
)
def test_bad_deepspeed_overrides_are_refused(demo_shards, tmp_path, capsys, override, says):
    sets = [f"data.shards={demo_shards}", f"engine.ds_overrides={override}"]
    code, err = check(capsys, "pretrain", "deepmim_test_pixel", tmp_path / "run", *sets)
    assert code == 2 and says in one_line(err), err


def random_clip(path: Path, nan: bool = False) -> Path:
    from engine.targets.teachers import ClipArch
    from engine.tools.teacher_tools import random_openai_clip

    sd = random_openai_clip(ClipArch(32, 2, 4, 4, 16))
    if nan:
        sd["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = float("inf")
    torch.save(sd, path)
    return path


def test_resuming_a_pixel_checkpoint_as_a_clip_run_is_refused(demo_shards, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(in_process_config(run, demo_shards, 2))
    sets = [f"data.shards={demo_shards}", f"target.teacher={random_clip(tmp_path / 'clip.pt')}"]
    code, err = check(capsys, "pretrain", "deepmim_test_clip", run, *sets)
    assert code == 2 and "incompatible config change" in one_line(err) and "target.kind: 'pixel' -> 'clip'" in err


def test_a_torchscript_teacher_that_is_not_clip_is_refused(demo_shards, tmp_path, capsys):
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    scripted.save(str(tmp_path / "scripted.pt"))
    sets = [f"data.shards={demo_shards}", f"target.teacher={tmp_path / 'scripted.pt'}"]
    code, err = check(capsys, "pretrain", "deepmim_test_clip", tmp_path / "run", *sets)
    assert code == 2 and "scripted.pt" in one_line(err) and "not ViT weights" in err, err


def test_an_unnamed_timm_clip_file_is_refused_before_launch_in_one_line(demo_shards, tmp_path, capsys):
    """GELU or QuickGELU cannot be read from the weights: the check names both choices, once."""
    from engine.tools.teacher_tools import write_timm_teacher

    dims = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 16}
    f = write_timm_teacher(tmp_path / "c.safetensors", "vit_base_patch16_clip_224", 0, 16, config=False, **dims)
    for kind in ("clip", "features"):
        sets = [f"data.shards={demo_shards}", f"target.kind={kind}", f"target.teacher={f}"]
        code, err = check(capsys, "pretrain", "deepmim_test_clip", tmp_path / "run", *sets)
        assert code == 2 and "GELU or QuickGELU" in one_line(err) and "clip_quickgelu" in err, err


def test_non_finite_weights_are_refused_naming_the_file_and_the_tensor(demo_shards, demo_val_shards, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    sets = [f"data.shards={demo_shards}", f"target.teacher={random_clip(tmp_path / 'clip.pt', nan=True)}"]
    code, err = check(capsys, "pretrain", "deepmim_test_clip", tmp_path / "run", *sets)
    assert (code == 2 and "'transformer.resblocks.1.mlp.c_fc.weight'" in one_line(err)) or "c_fc.weight" in err, err
    kw = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 0}
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).state_dict()
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "encoder.safetensors"))
    sets = [f"data.shards={demo_shards}", f"data.val_shards={demo_val_shards}"]
    sets.append(f"init.pretrained={tmp_path / 'encoder.safetensors'}")
    code, err = check(capsys, "finetune", "finetune_test", tmp_path / "run", *sets)
    assert code == 2 and "encoder.safetensors: tensor 'blocks.1.attn.qkv.weight' holds 1 non-finite" in one_line(err)


def test_a_universal_checkpoint_given_to_resume_is_refused_naming_the_one_that_resumes(demo_shards, tmp_path, capsys):
    """ds_to_universal's output (a zero/ folder of per-parameter states, no marker) lacks the run's own state."""
    universal = tmp_path / "universal" / "step_00000004"
    (universal / "zero" / "encoder.cls_token").mkdir(parents=True)
    sets = [f"data.shards={demo_shards}", f"checkpoint.resume={universal}"]
    code, err = check(capsys, "pretrain", "deepmim_test_pixel", tmp_path / "run", *sets)
    assert code == 2 and "a DeepSpeed universal checkpoint" in one_line(err)
    assert "--resume RUN/checkpoints/step_00000004" in err


def test_settings_the_preset_makes_moot_are_said_before_launch(demo_shards, tmp_path, capsys):
    sets = [f"data.shards={demo_shards}", "data.max_micro_batch=2", "target.generator=runs/x"]
    code, err = check(capsys, "pretrain", "deepmim_test_pixel", tmp_path / "run", *sets)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "data.max_micro_batch has no effect: data.micro_batch=4 is fixed" in warnings[0]
    assert "target.generator has no effect: target.kind=pixel" in warnings[1]


def test_fine_tuning_against_its_own_training_images_is_warned_before_launch(demo_shards, tmp_path, capsys):
    sets = [f"data.shards={demo_shards}", f"data.val_shards={demo_shards}", "init.pretrained=", "data.loader=torch"]
    code, err = check(capsys, "finetune", "finetune_test", tmp_path / "run", *sets)
    assert code == 0 and "warning: the validation shards are the training shards" in err
