"""Frozen teachers: CLIP loaders and features, the MAE generator, mixed targets, and losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD
from engine.config import Config, plan_run
from engine.models.losses import masked_cosine, masked_mse
from engine.models.mim import DeepMIM, patchify, random_masking
from engine.models.registry import get_variant
from engine.targets.kinds import MixedTarget, build_target, normalized_pixel_target, progressive_alphas
from engine.targets.teachers import (
    CLIP_MEAN,
    CLIP_STD,
    ClipArch,
    TeacherError,
    load_clip_teacher,
    load_generator,
)
from engine.tools.teacher_tools import random_openai_clip, random_timm_clip
from tests.helpers import to_official_layout

ARCH = ClipArch(width=64, layers=2, patch=4, grid=4, out_dim=24)


def openai_visual_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's VisionTransformer forward, written from its published code, on CLIP-normalized x.
    Returns ln_post + proj applied to every token: [N, 1+L, out]."""
    v = {k[len("visual.") :]: t for k, t in sd.items() if k.startswith("visual.")}
    w = v["conv1.weight"]
    h = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # [N, L, W]
    cls = v["class_embedding"].expand(h.shape[0], 1, -1)
    h = torch.cat([cls, h], dim=1) + v["positional_embedding"]
    h = F.layer_norm(h, h.shape[-1:], v["ln_pre.weight"], v["ln_pre.bias"], 1e-5)
    width = h.shape[-1]
    heads = max(1, width // 64)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in v:
        b = lambda n, i=i: v[f"transformer.resblocks.{i}.{n}"]
        y = F.layer_norm(h, (width,), b("ln_1.weight"), b("ln_1.bias"), 1e-5).transpose(0, 1)  # [S, N, W]
        att, _ = F.multi_head_attention_forward(
            y,
            y,
            y,
            width,
            heads,
            b("attn.in_proj_weight"),
            b("attn.in_proj_bias"),
            None,
            None,
            False,
            0.0,
            b("attn.out_proj.weight"),
            b("attn.out_proj.bias"),
            need_weights=False,
        )
        h = h + att.transpose(0, 1)
        y = F.layer_norm(h, (width,), b("ln_2.weight"), b("ln_2.bias"), 1e-5)
        y = F.linear(y, b("mlp.c_fc.weight"), b("mlp.c_fc.bias"))
        y = y * torch.sigmoid(1.702 * y)  # QuickGELU
        h = h + F.linear(y, b("mlp.c_proj.weight"), b("mlp.c_proj.bias"))
        i += 1
    h = F.layer_norm(h, (width,), v["ln_post.weight"], v["ln_post.bias"], 1e-5)
    return h @ v["proj"]


def imagenet_batch(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


# ------------------------------------------------------------------------------------ CLIP


def timm_clip_folder(folder, sd: dict) -> str:
    """A timm hub folder for the tiny OpenAI-shaped tower: config.json names the QuickGELU family."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    sd = {**sd, "head.bias": torch.zeros(ARCH.out_dim)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    args = {"embed_dim": ARCH.width, "depth": ARCH.layers, "num_heads": ARCH.heads, "patch_size": ARCH.patch}
    conf = {"architecture": "vit_base_patch16_clip_quickgelu_224", "num_classes": ARCH.out_dim, "model_args": args}
    (folder / "config.json").write_text(json.dumps(conf))
    return str(folder)


def test_clip_openai_and_timm_layouts_load_to_identical_outputs(tmp_path):
    torch.save(random_openai_clip(ARCH, seed=1), tmp_path / "openai.pt")
    a = load_clip_teacher(tmp_path / "openai.pt")
    b = load_clip_teacher(timm_clip_folder(tmp_path / "timm", random_timm_clip(ARCH, seed=1)))
    assert a.arch == ARCH  # width, depth, patch, grid and output width read from the weights
    assert b.input_size == a.input_size and b.out_dim == a.out_dim
    x = imagenet_batch()
    with torch.no_grad():
        fa, fb = a(x), b(x)
    assert fa.shape == (3, 16, 24)
    assert torch.allclose(fa, fb, atol=1e-6)


def test_clip_teacher_matches_openai_reference_forward(tmp_path):
    sd = random_openai_clip(ARCH, seed=2)
    torch.save(sd, tmp_path / "openai.pt")
    teacher = load_clip_teacher(tmp_path / "openai.pt")
    x = imagenet_batch()
    with torch.no_grad():
        ours = teacher(x)
        ref = openai_visual_reference(sd, teacher.renormalize(x))
    assert torch.allclose(ours, ref[:, 1:], atol=1e-5)  # every patch token; cls excluded


def test_clip_normalization_swap_equals_the_formula(tmp_path):
    torch.save(random_openai_clip(ARCH), tmp_path / "c.pt")
    teacher = load_clip_teacher(tmp_path / "c.pt")
    x = imagenet_batch()
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    want = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(teacher.renormalize(x), want, atol=1e-6)


def test_clip_teacher_is_frozen(tmp_path):
    torch.save(random_openai_clip(ARCH), tmp_path / "c.pt")
    teacher = load_clip_teacher(tmp_path / "c.pt")
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("layout", ["openai", "timm"])
def test_clip_missing_or_unexpected_key_raises(tmp_path, layout):
    sd = random_openai_clip(ARCH) if layout == "openai" else random_timm_clip(ARCH)
    name = "visual.transformer.resblocks.1.mlp.c_fc.bias" if layout == "openai" else "blocks.1.mlp.fc1.bias"

    def source(d: dict, name: str) -> str:
        if layout == "timm":
            return timm_clip_folder(tmp_path / name, d)
        torch.save(d, tmp_path / f"{name}.pt")
        return str(tmp_path / f"{name}.pt")

    missing = dict(sd)
    del missing[name]
    with pytest.raises(TeacherError, match="missing"):
        load_clip_teacher(source(missing, "missing"))
    extra = dict(sd)
    extra["visual.some_adapter.weight" if layout == "openai" else "some_adapter.weight"] = torch.zeros(3)
    with pytest.raises(TeacherError, match="unexpected"):
        load_clip_teacher(source(extra, "extra"))


def test_clip_bad_path_and_wrong_file(tmp_path):
    with pytest.raises(TeacherError, match="no such file or folder"):
        load_clip_teacher(tmp_path / "nope.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(TeacherError, match="not ViT weights"):
        load_clip_teacher(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot read"):
        load_clip_teacher(tmp_path / "garbage.pt")


def test_clip_teacher_on_a_different_grid_resamples(tmp_path):
    torch.save(random_openai_clip(ARCH), tmp_path / "c.pt")
    teacher = load_clip_teacher(tmp_path / "c.pt", grid=6)  # student sees 6x6 patches
    with torch.no_grad():
        out = teacher(imagenet_batch(2, 20))
    assert out.shape == (2, 36, 24)


def clip_cfg(path, **target) -> Config:
    cfg = Config()
    cfg.model.arch = "deepmim_vit_test_patch4"
    cfg.target.kind = "clip"
    cfg.target.teacher = str(path)
    for k, v in target.items():
        setattr(cfg.target, k, v)
    return cfg


def test_build_target_reads_the_width_and_checks_feature_dim(tmp_path):
    torch.save(random_openai_clip(ARCH), tmp_path / "c.pt")
    cfg = clip_cfg(tmp_path / "c.pt")
    plan = plan_run(cfg)
    assert plan.teacher.assumed and plan.pred_dim == 512  # before the weights are read
    target, ref, shape = build_target(cfg, plan)
    assert target.kind == "clip" and shape.out_dim == 24 and ref["out_dim"] == 24 and len(ref["sha256"]) == 64
    assert plan.with_teacher(shape).pred_dim == 24  # the decoders then predict the teacher's width
    bad = clip_cfg(tmp_path / "c.pt", feature_dim=512)
    with pytest.raises(TeacherError, match="feature_dim=512 but .* 24-d"):
        build_target(bad, plan_run(bad))


# ------------------------------------------------------------------------------------ losses


def test_cosine_loss_equals_direct_computation_on_masked_tokens():
    torch.manual_seed(0)
    t, n, length, c = 3, 4, 16, 24
    pred, target = torch.randn(t, n, length, c), torch.randn(1, n, length, c)
    mask = (torch.rand(n, length) > 0.25).float()
    got = masked_cosine(pred, target, mask)
    for k in range(t):
        vals = []
        for i in range(n):
            for j in range(length):
                if mask[i, j]:
                    p, q = pred[k, i, j], target[0, i, j]
                    vals.append(2 - 2 * float(p @ q) / (float(p.norm()) * float(q.norm())))
        assert got[k].item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def test_mse_loss_counts_masked_patches_only():
    pred, target = torch.randn(2, 3, 8, 5), torch.randn(1, 3, 8, 5)
    mask = torch.zeros(3, 8)
    mask[0, 2] = mask[2, 7] = 1
    got = masked_mse(pred, target, mask)
    for k in range(2):
        want = ((pred[k, 0, 2] - target[0, 0, 2]).pow(2).mean() + (pred[k, 2, 7] - target[0, 2, 7]).pow(2).mean()) / 2
        assert got[k].item() == pytest.approx(want.item(), rel=1e-6)


# ------------------------------------------------------------------------------------ mixed


def small_mae(seed: int = 0) -> DeepMIM:
    torch.manual_seed(seed)
    spec = get_variant("deepmim_vit_test_patch4")
    return DeepMIM(spec, 16, [4], 32, 2, 16 // 8, pred_dim=48).eval()


def test_mixing_limits_are_exact():
    gen = small_mae()
    x = imagenet_batch(2)
    masks = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0), "cpu")
    for space, gen_norm, norm_pix in (("norm", True, True), ("raw", False, False), ("raw", False, True)):
        target = MixedTarget(gen, gen_norm, [0.0, 0.5, 1.0], 4, norm_pix, space)
        x_hat = target.generate(x, masks)
        mixed = target.mix(x, x_hat)
        assert mixed.shape == (3, 2, 16, 48)
        assert torch.equal(mixed[2], normalized_pixel_target(x, 4, norm_pix))  # a = 1: the pixel target
        if not (space == "raw" and norm_pix):  # a = 0: the generator's output itself
            assert torch.equal(mixed[0], x_hat)
        if space == "norm" or not norm_pix:  # mixing is linear there; raw + norm-pix re-normalizes the blend
            assert torch.allclose(mixed[1], 0.5 * mixed[0] + 0.5 * mixed[2], atol=1e-5)


def test_norm_space_normalizes_a_raw_generator_and_raw_space_unnormalizes_a_norm_one():
    gen = small_mae()
    x = imagenet_batch(2)
    masks = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0), "cpu")
    raw_pix = patchify(x, 4)
    mean, std = raw_pix.mean(-1, keepdim=True), (raw_pix.var(-1, keepdim=True) + 1e-6).sqrt()
    t_norm = MixedTarget(gen, False, [0.0], 4, True, "norm")
    x_hat = t_norm.generate(x, masks)
    got = t_norm.mix(x, x_hat)[0]
    want = (x_hat - x_hat.mean(-1, keepdim=True)) / (x_hat.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(got, want, atol=1e-5)
    t_raw = MixedTarget(gen, True, [0.0], 4, False, "raw")
    assert torch.allclose(t_raw.mix(x, x_hat)[0], x_hat * std + mean, atol=1e-5)


def test_progressive_alphas():
    assert progressive_alphas(4) == [0.0, 1 / 3, 2 / 3, 1.0]
    assert progressive_alphas(1) == [1.0]


def test_official_mae_layout_loads_and_reproduces_the_model(tmp_path, monkeypatch):
    spec = get_variant("deepmim_vit_test_patch4")
    torch.manual_seed(3)
    model = DeepMIM(spec, 16, [4], 32, 2, 16, pred_dim=48).eval()  # MAE decoders have 16 heads
    torch.save({"model": to_official_layout(model)}, tmp_path / "mae_official.pth")
    gen = load_generator(tmp_path / "mae_official.pth", 16)
    assert gen.norm_pix is None  # official files do not say
    x = imagenet_batch(2)
    masks = random_masking(2, 16, 0.75, torch.Generator().manual_seed(1), "cpu")
    with torch.no_grad():
        assert torch.equal(gen.model.predict(x, masks), model.predict(x, masks))
    # without the decoder it is refused with a helpful message
    enc_only = {k: v for k, v in to_official_layout(model).items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": enc_only}, tmp_path / "enc.pth")
    with pytest.raises(TeacherError, match="an MAE encoder without its decoder"):
        load_generator(tmp_path / "enc.pth", 16)
    # and a generator for another image size is refused
    with pytest.raises(TeacherError, match="image size 16 differs"):
        load_generator(tmp_path / "mae_official.pth", 32)


def test_official_generator_needs_explicit_norm_pix(tmp_path):
    spec = get_variant("deepmim_vit_test_patch4")
    model = DeepMIM(spec, 16, [4], 32, 2, 16, pred_dim=48)
    torch.save({"model": to_official_layout(model)}, tmp_path / "m.pth")
    cfg = Config()
    cfg.model.arch = "deepmim_vit_test_patch4"
    cfg.target.kind, cfg.target.generator = "mixed", str(tmp_path / "m.pth")
    with pytest.raises(TeacherError, match="generator_norm_pix=true"):
        build_target(cfg, plan_run(cfg))
    cfg.target.generator_norm_pix = "true"
    target, ref, shape = build_target(cfg, plan_run(cfg))
    assert target.kind == "mixed" and target.generator_norm_pix is True
    assert (shape.decoder_dim, shape.decoder_depth, shape.out_dim) == (32, 2, 48)
    assert ref["alphas"] == progressive_alphas(3) and ref["mix_space"] == "norm"
    cfg.target.mix_alphas = [0.0, 1.0]
    with pytest.raises(TeacherError, match="2 values for 3 taps"):
        build_target(cfg, plan_run(cfg))


def test_generator_path_errors(tmp_path):
    with pytest.raises(TeacherError, match="no complete checkpoint"):
        load_generator(tmp_path, 16)
    with pytest.raises(TeacherError, match="not found"):
        load_generator(tmp_path / "missing.pth", 16)
