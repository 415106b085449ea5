"""Fused vs reference decoders, activation checkpointing, torch.compile, FLOP counting, telemetry."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.models.compile import block_modules, try_compile
from engine.models.flops import count_flops, flops_for_model, peak_flops
from engine.models.mim import DeepMIM, random_masking
from engine.models.registry import get_variant
from engine.observe.telemetry import MetricMeter, PhaseTimer
from engine.targets.kinds import normalized_pixel_target


def model_and_batch(seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    spec = get_variant("deepmim_vit_test_patch4")
    args = dict(decoder_dim=32, decoder_depth=2, decoder_heads=4, pred_dim=48)
    args.update(kw)
    model = DeepMIM(spec, 16, [2, 3, 4], **args).to(dtype)
    x = torch.randn(4, 3, 16, 16)
    masks = random_masking(4, 16, 0.75, torch.Generator().manual_seed(seed + 1), "cpu")
    targets = normalized_pixel_target(x, 4, True)[None]
    return model, x.to(dtype), masks, targets


def grads(model: DeepMIM, x, masks, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, taps, _ = model(x, masks, targets)
    loss.backward()
    return taps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_and_reference_paths_agree_in_fp32():
    model, x, masks, targets = model_and_batch()
    taps_f, g_f = grads(model, x, masks, targets)
    model.decoders.fused = False
    taps_r, g_r = grads(model, x, masks, targets)
    assert torch.allclose(taps_f, taps_r, rtol=1e-5, atol=1e-6)
    for n in g_f:
        assert torch.allclose(g_f[n], g_r[n], rtol=1e-4, atol=1e-6), n


def test_fused_and_reference_paths_agree_in_bf16():
    model, x, masks, targets = model_and_batch(seed=3, dtype=torch.bfloat16)
    taps_f, g_f = grads(model, x, masks, targets)
    model.decoders.fused = False
    taps_r, g_r = grads(model, x, masks, targets)
    assert torch.allclose(taps_f, taps_r, rtol=2e-2)
    for n in g_f:
        a, b = g_f[n].float(), g_r[n].float()
        assert (a - b).norm() <= 3e-2 * b.norm() + 1e-3, n  # bf16: relative error of a few 1e-3


def test_fused_and_reference_share_one_checkpoint_format():
    fused, x, masks, targets = model_and_batch()
    ref = copy.deepcopy(fused)
    ref.decoders.fused = False
    ref.load_state_dict(fused.state_dict(), strict=True)  # same keys, same shapes: nothing to convert
    with torch.no_grad():
        assert torch.allclose(fused(x, masks, targets)[1], ref(x, masks, targets)[1], atol=1e-6)


@pytest.mark.parametrize("enc,dec", [(1, 0), (0, 1), (2, 2), (1, 1)])
@pytest.mark.parametrize("fused", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(enc, dec, fused):
    base, x, masks, targets = model_and_batch(seed=5)
    base.decoders.fused = fused
    taps0, g0 = grads(base, x, masks, targets)
    ck = copy.deepcopy(base)
    ck.encoder.act_ckpt_every, ck.decoders.act_ckpt_every = enc, dec
    taps1, g1 = grads(ck, x, masks, targets)
    assert torch.equal(taps0, taps1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-7), n


def test_activation_checkpointing_recomputes(monkeypatch):
    """Checkpointed blocks run their forward twice per step (once more in backward)."""
    model, x, masks, targets = model_and_batch()
    model.encoder.act_ckpt_every, model.decoders.act_ckpt_every = 1, 2
    calls = {"enc": 0, "dec": 0}
    enc_fwd = type(model.encoder.blocks[0]).forward
    dec_fwd = type(model.decoders.blocks[0]).forward

    def count(kind, fn):
        def wrapper(self, *a, **k):
            calls[kind] += 1
            return fn(self, *a, **k)

        return wrapper

    monkeypatch.setattr(type(model.encoder.blocks[0]), "forward", count("enc", enc_fwd))
    monkeypatch.setattr(type(model.decoders.blocks[0]), "forward", count("dec", dec_fwd))
    grads(model, x, masks, targets)
    assert calls["enc"] == 2 * 4  # every encoder block recomputed
    assert calls["dec"] == 2 + 1  # decoder blocks 0 and 1: only block 0 (every 2nd) recomputed


def test_compile_probe_and_fallback():
    model, x, masks, targets = model_and_batch(dtype=torch.bfloat16)
    ref = model(x, masks, targets)[1].detach()
    inp = x.clone().requires_grad_(True)
    ok, reason = try_compile([model], "aot_eager", "default", lambda: model(inp, masks, targets)[0], inp)
    assert ok and reason == ""
    assert all(b._compiled_call_impl is not None for b in block_modules(model))
    assert torch.allclose(model(x, masks, targets)[1].float(), ref.float(), rtol=1e-2)
    model2, *_ = model_and_batch(dtype=torch.bfloat16)
    ok, reason = try_compile([model2], "no_such_backend", "default", lambda: model2(inp, masks, targets)[0], inp)
    assert not ok and "no_such_backend" in reason
    assert all(b._compiled_call_impl is None for b in block_modules(model2))  # restored to eager
    assert torch.isfinite(model2(x, masks, targets)[0])


# ------------------------------------------------------------------------------ FLOPs

CLIP_B16 = dict(width=768, layers=12, patch=16, out_dim=512, img_size=224)
# (patch, dim, depth) and the worked numbers of docs/performance.md (GFLOP per image)
WORKED = {
    "B": ((16, 768, 12), 58.7, 92.1, 126.7),
    "L": ((16, 1024, 24), 124.5, 158.1, 192.7),
    "H": ((14, 1280, 32), 291.4, 335.6, 370.6),
}


@pytest.mark.parametrize("name", list(WORKED))
def test_flop_counter_matches_the_worked_numbers(name):
    (p, d, depth), mae, deepmim, clip = WORKED[name]
    common = dict(img_size=224, patch=p, dim=d, depth=depth, decoder_dim=512)
    got_mae = count_flops(**common, num_decoders=1, decoder_depth=8, pred_dim=3 * p * p).per_image / 1e9
    got_pix = count_flops(**common, num_decoders=4, decoder_depth=4, pred_dim=3 * p * p).per_image / 1e9
    got_clip = count_flops(**common, num_decoders=4, decoder_depth=4, pred_dim=512, teacher=CLIP_B16)
    for got, want in ((got_mae, mae), (got_pix, deepmim), (got_clip.per_image / 1e9, clip)):
        assert abs(got - want) / want < 0.01, (name, got, want)
    shares = got_clip.shares()
    assert sum(shares.values()) == pytest.approx(1.0)


def test_flops_from_a_built_model_match_the_formula():
    cfg_model, *_ = model_and_batch()
    f = flops_for_model(cfg_model, 0.75)
    want = count_flops(
        img_size=16, patch=4, dim=32, depth=4, num_decoders=3, decoder_dim=32, decoder_depth=2, pred_dim=48
    )
    assert f == want and f.teacher_macs == 0


def test_peak_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("Some Future GPU") is None
    assert peak_flops("Some Future GPU", 500.0) == pytest.approx(500e12)


# ------------------------------------------------------------------------------ telemetry


def test_loss_meter_sums_on_device_and_reads_once():
    meter = MetricMeter()
    for v in (1.0, 2.0, 3.0):
        meter.add(torch.tensor(v), torch.tensor([v, 2 * v]))
    assert meter.count == 3 and isinstance(meter.total, torch.Tensor)  # still a tensor: nothing read yet
    total, taps = meter.mean_across_ranks()
    assert total == pytest.approx(2.0) and taps == pytest.approx([2.0, 4.0])
    assert meter.count == 0 and meter.total is None


def test_phase_timer_on_cpu():
    timer = PhaseTimer(torch.device("cpu"))
    timer.start("fwd_bwd")
    sum(range(10000))
    timer.stop("fwd_bwd")
    timer.add_host("data_wait", 0.25)
    out = timer.collect()
    assert out["fwd_bwd"] > 0 and out["data_wait"] == 0.25
    assert timer.collect() == {}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    ("backend", "layout"),
    [("math", "packed"), ("flash", "packed"), ("flex", "packed"), ("auto", "split"), ("math", "split")],
)
def test_attention_kernels_and_qkv_layouts_are_the_same_math(fused, backend, layout):
    """Every decoder attention kernel available on a CPU and the copy-free q/k/v layout give the
    reference path's losses and gradients in fp32 (same weights, same mask), within 1e-5 relative."""
    ref, x, masks, targets = model_and_batch(seed=11)
    ref.decoders.fused = False  # the research-style loop with SDPA's default kernel and the packed q/k/v
    taps_r, g_r = grads(ref, x, masks, targets)
    other = copy.deepcopy(ref)
    other.decoders.fused = fused
    other.decoders.set_attention(backend, layout)
    if backend == "flex" and not torch.cuda.is_available():  # FlexAttention has no backward on the CPU
        with torch.no_grad():
            assert torch.allclose(other(x, masks, targets)[1], taps_r, rtol=1e-5, atol=1e-7)
        return
    taps_o, g_o = grads(other, x, masks, targets)
    assert torch.allclose(taps_o, taps_r, rtol=1e-5, atol=1e-7)
    for n in g_r:
        assert (g_o[n] - g_r[n]).norm() <= 1e-5 * g_r[n].norm() + 1e-7, n


def test_fp8_wraps_the_encoder_linears_and_trains_close_to_fp32():
    """torchao's float8 training in emulation: exactly the encoder blocks' linears are converted,
    the state dict is unchanged, and loss and gradients stay close to fp32 (FP8 rounds: not equal)."""
    from torchao.float8.float8_linear import Float8Linear

    from engine.models.fp8 import convert_encoder_to_fp8

    ref, x, masks, targets = model_and_batch(seed=13, decoder_dim=32, decoder_heads=2)
    fp8 = copy.deepcopy(ref)
    n = convert_encoder_to_fp8(fp8, emulate=True)
    assert n == 4 * 4  # qkv, proj, fc1, fc2 of each of the 4 encoder blocks; decoders untouched
    assert all(name.startswith("encoder.blocks.") for name, m in fp8.named_modules() if isinstance(m, Float8Linear))
    assert fp8.state_dict().keys() == ref.state_dict().keys()
    taps_r, g_r = grads(ref, x, masks, targets)
    taps_8, g_8 = grads(fp8, x, masks, targets)
    assert torch.allclose(taps_8, taps_r, rtol=5e-2)
    for name in g_r:
        cos = torch.nn.functional.cosine_similarity(g_8[name].flatten(), g_r[name].flatten(), dim=0)
        assert cos > 0.95, (name, float(cos))


def test_deepspeed_knobs_from_the_command_line(tmp_path):
    from engine.config import Config, ConfigError, plan_run
    from engine.loop.ds_setup import apply_ds_overrides, resolve_ds_config

    cfg = Config()
    cfg.engine.ds_overrides = [
        "zero_optimization.reduce_bucket_size=5e8",
        "zero_optimization.overlap_comm=false",
        "zero_optimization.round_robin_gradients=true",
    ]
    cfg.data.global_batch, cfg.data.micro_batch = 64, 32
    ds = resolve_ds_config(cfg, plan_run(cfg, 2, 1000))
    z = ds["zero_optimization"]
    assert z["reduce_bucket_size"] == 5e8 and z["overlap_comm"] is False and z["round_robin_gradients"] is True
    with pytest.raises(ConfigError, match="train_batch_size comes from data.global_batch"):
        apply_ds_overrides({}, ["train_batch_size=8"])
