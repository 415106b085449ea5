"""Model pieces: masking, patchify, taps, decoders, registry variants, timm layout, param groups."""

from __future__ import annotations

import pytest
import torch

from engine.config import Config, ConfigError, plan_run
from engine.config.plan import resolve_taps
from engine.models.flops import num_kept
from engine.models.mim import (
    DeepMIM,
    build_model,
    gather_tokens,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)
from engine.models.param_groups import weight_decay_groups
from engine.models.registry import get_variant, list_variants, relative_taps
from engine.targets.kinds import normalized_pixel_target

TINY = [n for n in list_variants() if "tiny" in n or "test" in n]


def tiny_model(arch: str = "deepmim_vit_test_patch4", **kw) -> DeepMIM:
    spec = get_variant(arch)
    args = dict(
        spec=spec,
        img_size=spec.img_size,
        taps=list(spec.default_taps),
        decoder_dim=32,
        decoder_depth=2,
        decoder_heads=4,
        pred_dim=3 * spec.patch_size**2,
    )
    args.update(kw)
    return DeepMIM(**args)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_masking_keeps_the_right_count_and_is_consistent(ratio):
    n, length = 5, 49
    m = random_masking(n, length, ratio, gen(), "cpu")
    keep = num_kept(length, ratio)
    assert m.ids_keep.shape == (n, keep)
    assert m.mask.shape == (n, length)
    assert torch.all(m.mask.sum(1) == length - keep)
    # kept ids are exactly the unmasked positions
    for i in range(n):
        visible = set(torch.nonzero(m.mask[i] == 0).flatten().tolist())
        assert set(m.ids_keep[i].tolist()) == visible
    # ids_restore inverts the shuffle: the first `keep` shuffled slots map back to visible patches
    restored_slot = m.ids_restore
    assert torch.all((restored_slot < keep) == (m.mask == 0))
    # each sample has its own mask
    assert not torch.equal(m.mask[0], m.mask[1])


def test_masking_is_reproducible_from_the_generator_state():
    g = gen(3)
    state = g.get_state()
    a = random_masking(4, 16, 0.75, g, "cpu")
    g.set_state(state)
    b = random_masking(4, 16, 0.75, g, "cpu")
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_masking_rejects_ratio_outside_open_interval(ratio):
    with pytest.raises(ConfigError, match=r"mask.ratio"):
        random_masking(2, 16, ratio, gen(), "cpu")


def test_all_decoders_share_one_mask():
    """Changing masked pixels changes no decoder's prediction; changing a visible one changes all."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    masks = random_masking(2, 16, 0.75, gen(1), "cpu")
    base = model.predict(x, masks)
    p = model.patch_size
    masked_patch = int(torch.nonzero(masks.mask[0] == 1)[0])
    visible_patch = int(masks.ids_keep[0, 0])

    def bump(patch: int) -> torch.Tensor:
        y = x.clone()
        r, c = divmod(patch, 16 // p)
        y[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 3.0
        return model.predict(y, masks)

    assert torch.equal(bump(masked_patch), base)
    changed = bump(visible_patch)
    for t in range(len(model.taps)):
        assert not torch.allclose(changed[t, 0], base[t, 0])
        assert torch.allclose(changed[t, 1], base[t, 1])  # other sample untouched


# --------------------------------------------------------------------------- patches, pos embed


@pytest.mark.parametrize("p,size", [(4, 16), (8, 64), (16, 224), (14, 224)])
def test_patchify_round_trip(p, size):
    x = torch.randn(2, 3, size, size)
    patches = patchify(x, p)
    assert patches.shape == (2, (size // p) ** 2, p * p * 3)
    assert torch.equal(unpatchify(patches, p), x)
    # patch 1 (row 0, column 1) holds exactly that square of pixels in (p, q, c) order
    assert torch.equal(patches[0, 1].view(p, p, 3), x[0, :, :p, p : 2 * p].permute(1, 2, 0))


def test_sincos_embedding_matches_the_formula():
    emb = sincos_pos_embed_2d(8, 3)
    assert emb.shape == (10, 8)
    assert torch.equal(emb[0], torch.zeros(8))  # cls row
    # token for (row 1, col 2) = index 1 + 1*3 + 2; first half encodes the column, second the row
    tok = emb[1 + 3 + 2]
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2.0)
    col, row = 2 * omega, 1 * omega
    want = torch.cat([torch.sin(col), torch.cos(col), torch.sin(row), torch.cos(row)]).float()
    assert torch.allclose(tok, want)


def test_normalized_pixel_target_uses_patch_statistics():
    x = torch.randn(2, 3, 16, 16) * 3 + 1
    t = normalized_pixel_target(x, 4, norm_pix=True)
    raw = patchify(x, 4)
    want = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(t, want)
    assert torch.equal(normalized_pixel_target(x, 4, norm_pix=False), raw)


# --------------------------------------------------------------------------- encoder taps


def test_taps_read_the_raw_residual_stream_of_the_right_blocks():
    torch.manual_seed(0)
    model = tiny_model().eval()
    enc = model.encoder
    x = torch.randn(2, 3, 16, 16)
    masks = random_masking(2, 16, 0.75, gen(2), "cpu")
    outs = enc(x, masks.ids_keep, model.taps)
    # manual forward
    h = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    h = gather_tokens(h, masks.ids_keep)
    h = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), h], dim=1)
    manual = {}
    for i, blk in enumerate(enc.blocks, start=1):
        h = blk(h)
        manual[i] = h
    assert model.taps == [2, 3, 4]
    assert torch.equal(outs[0], manual[2])
    assert torch.equal(outs[1], manual[3])
    assert torch.equal(outs[2], enc.norm(manual[4]))  # only the final block is normed


def test_tap_validation():
    cfg = Config()
    spec = get_variant("deepmim_vit_base_patch16")
    assert resolve_taps(cfg, spec) == (6, 8, 10, 12)
    for bad in ([6, 8, 10], [0, 12], [8, 6, 12], [6, 6, 12], [6, 13]):
        cfg.model.taps = bad
        with pytest.raises(ConfigError, match="model.taps"):
            resolve_taps(cfg, spec)


def test_default_taps_follow_relative_depths():
    assert relative_taps(12) == (6, 8, 10, 12)
    assert get_variant("deepmim_vit_large_patch16").default_taps == (12, 16, 20, 24)
    assert get_variant("deepmim_vit_huge_patch14").default_taps == (16, 21, 27, 32)


# --------------------------------------------------------------------------- every tiny variant


@pytest.mark.parametrize("arch", TINY)
def test_tiny_variant_shapes_loss_and_gradients(arch):
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.arch = arch
    cfg.model.decoder_dim, cfg.model.decoder_depth, cfg.model.decoder_heads = 64, 2, 4
    model = build_model(cfg, plan_run(cfg))
    spec = get_variant(arch)
    n, length = 3, (spec.img_size // spec.patch_size) ** 2
    x = torch.randn(n, 3, spec.img_size, spec.img_size)
    masks = random_masking(n, length, 0.75, gen(), "cpu")
    targets = normalized_pixel_target(x, spec.patch_size, True)[None]
    loss, taps, preds = model(x, masks, targets)
    assert preds.shape == (len(spec.default_taps), n, length, 3 * spec.patch_size**2)
    assert taps.shape == (len(spec.default_taps),)
    assert torch.isfinite(loss) and torch.allclose(loss, taps.sum())
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
        else:
            assert name.endswith("pos_embed"), f"{name} is unexpectedly frozen"


@pytest.mark.parametrize("arch", ["deepmim_vit_base_patch16", "deepmim_vit_large_patch16", "deepmim_vit_huge_patch14"])
def test_large_variants_build_with_the_paper_shapes(arch):
    cfg = Config()
    cfg.model.arch = arch
    plan = plan_run(cfg)
    with torch.device("meta"):
        model = build_model(cfg, plan)
    spec = get_variant(arch)
    # the plan's parameter count (it sizes the memory estimate) is the built model's
    assert plan.trainable_params == sum(p.numel() for p in model.parameters())
    enc_params = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    expected = {
        "deepmim_vit_base_patch16": 85.8e6,
        "deepmim_vit_large_patch16": 303.3e6,
        "deepmim_vit_huge_patch14": 630.8e6,
    }
    assert abs(enc_params - expected[arch]) / expected[arch] < 0.01
    assert model.decoders.embed.weight.shape == (4, 512, spec.dim)
    assert len(model.decoders.blocks) == 4
    assert model.decoders.pred.weight.shape == (4, 3 * spec.patch_size**2, 512)


def test_encoder_state_dict_has_timm_layout():
    import timm

    spec = get_variant("deepmim_vit_tiny_patch8")
    model = tiny_model("deepmim_vit_tiny_patch8")
    ref = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs)
    ours = model.encoder.state_dict()
    assert set(ours) == set(ref.state_dict())
    ref.load_state_dict(ours, strict=True)
    x = torch.randn(2, 3, 64, 64)
    ref.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(ref.forward_features(x), model.encoder.forward_all(x)[-1], atol=1e-5)


def test_decoders_are_independent():
    torch.manual_seed(0)
    model = tiny_model()
    d = model.decoders
    for stacked in (d.embed.weight, d.mask_token, d.blocks[0].qkv.weight, d.pred.weight):
        assert stacked.shape[0] == 3
        assert not torch.equal(stacked[0], stacked[1])
    # a gradient into decoder 0's loss reaches only decoder 0's slices
    x = torch.randn(2, 3, 16, 16)
    masks = random_masking(2, 16, 0.75, gen(), "cpu")
    preds = model.predict(x, masks)
    preds[0].pow(2).mean().backward()
    assert d.pred.weight.grad[0].abs().sum() > 0
    assert d.pred.weight.grad[1:].abs().sum() == 0
    assert d.pos_embed.grad is None  # shared and fixed


def test_weight_decay_groups():
    model = tiny_model()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in weight_decay_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[i] for i in groups["decay"])
    no_decay = sorted(names[i] for i in groups["no_decay"])
    assert "encoder.blocks.0.attn.qkv.weight" in decay
    assert "decoders.blocks.0.fc1.weight" in decay
    assert "encoder.patch_embed.proj.weight" in decay
    expected_no_decay = [
        "encoder.cls_token",
        "decoders.mask_token",
        "encoder.norm.weight",
        "decoders.norm.weight",
        "decoders.blocks.0.norm1.weight",
        "decoders.blocks.0.qkv.bias",
        "encoder.blocks.0.attn.qkv.bias",
    ]
    for n in expected_no_decay:
        assert n in no_decay, n
    assert all("pos_embed" not in n for n in decay + no_decay)  # frozen: in no group
    assert len(decay) + len(no_decay) == sum(1 for p in model.parameters() if p.requires_grad)
