"""Feature teachers from timm (DINOv2 with and without registers, EVA-02, SigLIP, GELU and QuickGELU
CLIP towers): the targets are the tokens timm's own model computes on the same images, in each
family's own normalization; a file that cannot say its architecture is refused, not guessed."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from data_pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD
from engine.errors import TeacherError
from engine.models.losses import masked_smooth_l1
from engine.targets.teachers import load_clip_teacher
from engine.targets.timm_teachers import load_feature_teacher
from engine.tools.teacher_tools import random_openai_clip, write_timm_teacher

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 32}
FAMILIES = {  # name -> (timm architecture, head width: CLIP towers project)
    "dinov2": ("vit_base_patch14_dinov2", 0),
    "dinov2_registers": ("vit_base_patch14_reg4_dinov2", 0),
    "eva02": ("eva02_base_patch14_224", 0),
    "siglip": ("vit_base_patch16_siglip_224", 0),
    "clip_gelu": ("vit_base_patch16_clip_224", 16),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", 16),
}


def imagenet_batch(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_reference(folder, arch: str, x_imagenet: torch.Tensor, head: bool) -> torch.Tensor:
    """timm's own model, loaded from the folder's file as timm loads it, on the images in its own
    normalization: patch tokens of forward_features (+ the norm a pooling model applies after pooling,
    + the head where used)."""
    from safetensors.torch import load_file

    conf = json.loads((folder / "config.json").read_text())
    net = timm.create_model(arch, pretrained=False, num_classes=conf["num_classes"], **conf["model_args"]).eval()
    net.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    mean, std = torch.tensor(net.pretrained_cfg["mean"]), torch.tensor(net.pretrained_cfg["std"])
    pixels = x_imagenet * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    x = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = net.forward_features(x)
        if isinstance(net.norm, torch.nn.Identity) and not isinstance(net.fc_norm, torch.nn.Identity):
            tokens = net.fc_norm(tokens)  # EVA-02 MIM: the norm comes after pooling; applied per token
        tokens = tokens[:, net.num_prefix_tokens :]
        return net.head(tokens) if head else tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_targets_are_the_tokens_timm_computes(tmp_path, family):
    arch, head = FAMILIES[family]
    folder = write_timm_teacher(tmp_path / family, arch, seed=3, num_classes=head, **TINY)
    teacher, src = load_feature_teacher(folder, "", grid=8, use_head=bool(head))
    assert src.arch == arch and arch in src.describe()
    x = imagenet_batch()
    with torch.no_grad():
        ours = teacher(x)
    ref = timm_reference(folder, arch, x, bool(head))
    assert ours.shape == (2, 64, head or 32) == ref.shape  # prefix tokens (class, registers) dropped
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_eva02_targets_carry_the_norm_its_mim_checkpoints_apply_after_pooling(tmp_path):
    folder = write_timm_teacher(tmp_path / "eva", "eva02_base_patch14_224", seed=1, **TINY)
    teacher, _ = load_feature_teacher(folder, "", grid=8, use_head=False)
    assert isinstance(teacher.vit.norm, torch.nn.Identity) and teacher.post_norm
    with torch.no_grad():
        out = teacher(imagenet_batch())
        raw = teacher.vit.forward_features(teacher.renormalize(imagenet_batch()))[:, 1:]
    ln = teacher.vit.fc_norm
    assert torch.allclose(out, F.layer_norm(raw, (32,), ln.weight, ln.bias, ln.eps), atol=1e-6)


def test_gelu_and_quickgelu_clip_differ_so_the_name_decides(tmp_path):
    """The same weights under the two activations give different targets: guessing would be wrong."""
    folder = write_timm_teacher(tmp_path / "g", "vit_base_patch16_clip_224", seed=2, num_classes=16, **TINY)
    gelu, _ = load_feature_teacher(folder, "", grid=8, use_head=True)
    conf = json.loads((folder / "config.json").read_text())
    conf["architecture"] = "vit_base_patch16_clip_quickgelu_224"
    (folder / "config.json").write_text(json.dumps(conf))
    quick, _ = load_feature_teacher(folder, "", grid=8, use_head=True)
    with torch.no_grad():
        assert (gelu(imagenet_batch()) - quick(imagenet_batch())).abs().max() > 1e-4


def test_a_teacher_at_another_grid_runs_at_the_size_of_the_students_grid(tmp_path):
    """A /4 teacher under a student with a 6x6 grid runs at 24 px, its position embedding resampled by
    timm's own filter; the features are the student's 36 patches."""
    folder = write_timm_teacher(tmp_path / "d", "vit_base_patch14_dinov2", **TINY)
    teacher, _ = load_feature_teacher(folder, "", grid=6, use_head=False)
    assert teacher.input_size == 24
    with torch.no_grad():
        out = teacher(imagenet_batch(size=48))  # the student's crop, resized for the teacher
    assert out.shape == (2, 36, 32) and torch.isfinite(out).all()


def test_a_bare_file_needs_its_architecture_and_a_clip_file_names_both_choices(tmp_path):
    clip = write_timm_teacher(tmp_path / "clip.safetensors", "vit_base_patch16_clip_224", num_classes=16, config=False)
    with pytest.raises(TeacherError) as err:
        load_feature_teacher(clip, "", grid=8, use_head=True)
    msg = str(err.value)
    assert "\n" not in msg and "GELU or QuickGELU" in msg
    assert "target.teacher_arch=vit_base_patch16_clip_224 " in msg and "vit_base_patch16_clip_quickgelu_224" in msg
    dino = write_timm_teacher(tmp_path / "d.safetensors", "vit_base_patch14_dinov2", config=False)
    with pytest.raises(TeacherError, match="does not name its architecture; set target.teacher_arch"):
        load_feature_teacher(dino, "", grid=8, use_head=False)


def test_a_bare_file_with_its_architecture_named_loads(tmp_path):
    """A real-size name for a real-size file: ViT-S/14 DINOv2 (timm's layout), built at the grid asked."""
    f = write_timm_teacher(tmp_path / "s.safetensors", "vit_small_patch14_dinov2", config=False, img_size=56)
    teacher, _ = load_feature_teacher(f, "vit_small_patch14_dinov2", grid=4, use_head=False)
    assert teacher.input_size == 56 and teacher.out_dim == 384
    with pytest.raises(TeacherError, match="missing"):  # the wrong name for the file: every mismatch named
        load_feature_teacher(f, "vit_small_patch14_reg4_dinov2", grid=4, use_head=False)


def test_folder_and_name_disagreeing_or_not_a_timm_folder_are_refused(tmp_path):
    folder = write_timm_teacher(tmp_path / "d", "vit_base_patch14_dinov2", **TINY)
    with pytest.raises(TeacherError, match="leave target.teacher_arch empty"):
        load_feature_teacher(folder, "eva02_base_patch14_224", grid=8, use_head=False)
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(TeacherError, match="transformers folder"):
        load_feature_teacher(folder, "", grid=8, use_head=False)
    with pytest.raises(TeacherError, match="no such file or folder"):
        load_feature_teacher(tmp_path / "nope", "", grid=8, use_head=False)
    with pytest.raises(TeacherError, match="no projection head"):
        load_feature_teacher(write_timm_teacher(tmp_path / "e", "vit_base_patch14_dinov2", **TINY), "", 8, True)


def test_openai_layout_needs_no_name_and_keeps_the_clip_path(tmp_path):
    """OpenAI's towers are all QuickGELU: read as they are; the features path without the head gives
    the ln_post tokens the projection would map."""
    from engine.targets.teachers import ClipArch

    torch.save(random_openai_clip(ClipArch(64, 2, 4, 4, 24)), tmp_path / "openai.pt")
    proj = load_clip_teacher(tmp_path / "openai.pt")
    tokens, _ = load_feature_teacher(tmp_path / "openai.pt", "", grid=None, use_head=False)
    x = imagenet_batch(size=16)
    with torch.no_grad():
        assert torch.allclose(proj(x), proj.vit.head(tokens(x)), atol=1e-6)
    assert tokens.out_dim == 64 and proj.out_dim == 24


def test_smooth_l1_is_against_the_layer_normalized_target():
    pred, target = torch.randn(2, 3, 5, 8), torch.randn(1, 3, 5, 8) * 4 + 2
    mask = torch.zeros(3, 5)
    mask[:, :2] = 1
    got = masked_smooth_l1(pred, target, mask)
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    d = (pred - t).abs()
    per = torch.where(d < 2.0, 0.5 * d * d / 2.0, d - 1.0).mean(-1)
    want = (per * mask).sum(dim=(1, 2)) / mask.sum()
    assert torch.allclose(got, want, atol=1e-5)


def test_the_plan_counts_the_teacher_it_read(tmp_path):
    """--print-config with the teacher present counts its real FLOPs (its blocks, its prefix tokens)."""
    from engine.config import apply_overrides, plan_run
    from engine.presets import get_preset
    from engine.targets.kinds import feature_target

    folder = write_timm_teacher(tmp_path / "d", "vit_base_patch14_reg4_dinov2", **TINY)
    cfg = apply_overrides(get_preset("deepmim_test_dinov2"), [f"target.teacher={folder}"])
    assumed = plan_run(cfg)
    _, ref, shape = feature_target(cfg, assumed)
    plan = plan_run(cfg, teacher=shape)
    assert shape.prefix == 5 and shape.width == 32 and not shape.assumed and ref["kind"] == "features"
    assert plan.pred_dim == 32 and 0 < plan.flops.teacher_macs < assumed.flops.teacher_macs
    assert "vit_base_patch14_reg4_dinov2" in ref["arch"] and ref["mean"] == [0.485, 0.456, 0.406]


def test_weights_are_read_without_running_code(tmp_path):
    """A pickle that would run code is refused before any of it runs, like every weight file here."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (sys.exit, (7,))

    folder = write_timm_teacher(tmp_path / "d", "vit_base_patch14_dinov2", **TINY)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(TeacherError):
        load_feature_teacher(folder, "", grid=8, use_head=False)
