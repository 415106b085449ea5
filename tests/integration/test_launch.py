"""Real DeepSpeed (ZeRO-2, bf16) under the real `deepspeed` launcher: 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.run_folder.checkpoints import MARKER, list_checkpoints
from tests.conftest import run_deepspeed, run_single

pytestmark = pytest.mark.launcher


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(run: Path, shards: Path, steps: int, *extra: str):
    return run_deepspeed(
        2,
        "--preset",
        "deepmim_test_pixel",
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={steps}",
        "--set",
        "checkpoint.interval=3",
        *extra,
    )


def test_two_process_zero2_bf16_saves_and_resumes(pixel_run, demo_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pixel_run, run)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    for p in ckpts:
        assert (p / MARKER).is_file()
        assert (p / "mp_rank_00_model_states.pt").is_file()
        # ZeRO-2: one optimizer-state partition per rank
        assert len(list(p.glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    saved = json.loads((run / "config.json").read_text())
    cfg, derived = saved["config"], saved["plan"]
    assert cfg["data"]["shards"] == str(demo_shards) and cfg["schedule"]["max_steps"] == 6
    # what the preset leaves at 0 or empty is written out, apart from what was set
    assert cfg["model"]["taps"] == [] and derived["taps"] == [2, 3, 4]
    assert cfg["model"]["img_size"] == 0 and derived["img_size"] == 16
    assert derived["lr"] == cfg["optim"]["base_lr"] * 8 / 256 and derived["grad_accum"] == 1
    assert derived["world_size"] == 2 and derived["stop_step"] == 6 and derived["num_samples"] == 72
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6]  # log.interval=2
    assert all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    assert (run / "reconstructions.png").is_file()

    # Resume: the same command with a longer budget continues from step 6, it does not restart.
    same = ("--set", "log.interval=2", "--set", "log.figure_interval=3")  # as pixel_run was started
    second = train(run, demo_shards, 9, *same)
    out = second.stdout + second.stderr
    assert "resumed from" in out and "step_00000006" in out
    assert [r["step"] for r in metrics(run)] == [2, 4, 6, 8, 9]  # and the last step of the budget

    # A finished run finishes at once.
    third = train(run, demo_shards, 9, *same)
    assert "run already complete" in third.stdout + third.stderr
    assert len(metrics(run)) == 5


def test_compile_and_activation_checkpointing_under_zero2(pixel_run, demo_shards, tmp_path):
    """Regional compile (aot_eager: graph capture and AOT autograd without a C++ toolchain) plus
    checkpointing of every encoder and decoder block trains like the eager run and resumes."""
    fast = tmp_path / "fast"
    opts = (
        "--set",
        "engine.compile=true",
        "--set",
        "engine.compile_backend=aot_eager",
        "--set",
        "engine.act_ckpt_encoder=1",
        "--set",
        "engine.act_ckpt_decoder=1",
        "--set",
        "log.reconstructions=false",
    )
    out = train(fast, demo_shards, 3, *opts)
    assert "torch.compile:" in out.stdout + out.stderr and "blocks compiled" in out.stdout + out.stderr
    out = train(fast, demo_shards, 4, *opts)
    assert "resumed from" in out.stdout + out.stderr
    eager = {r["step"]: r["loss"] for r in metrics(pixel_run)}
    compiled = {r["step"]: r["loss"] for r in metrics(fast)}
    assert compiled.keys() == {1, 2, 3, 4}
    for step in (2, 4):  # the steps both logged
        assert abs(eager[step] - compiled[step]) <= 2e-2 * abs(eager[step]), (step, eager[step], compiled[step])


def test_compile_failure_falls_back_to_eager(demo_shards, tmp_path):
    """Each process probes compile on its own: a world of one shows the fallback."""
    sets = (
        f"data.shards={demo_shards}",
        "schedule.max_steps=2",
        "engine.compile=true",
        "engine.compile_backend=no_such_backend",
        "log.reconstructions=false",
    )
    out = run_single(
        "--preset", "deepmim_test_pixel", "--run-dir", str(tmp_path / "r"), *[a for x in sets for a in ("--set", x)]
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "torch.compile failed, running eager instead" in text and "no_such_backend" in text
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2]


def test_speed_options_train_under_zero2(demo_shards, tmp_path):
    """The copy-free q/k/v layout, a pinned attention kernel and FP8 encoder linears (emulated on CPU)
    train, save and resume on 2 ranks like the default path."""
    run = tmp_path / "r"
    opts = (
        "--set",
        "model.qkv_layout=split",
        "--set",
        "model.decoder_attention=math",
        "--set",
        "engine.fp8=true",
        "--set",
        "log.reconstructions=false",
    )
    out = train(run, demo_shards, 3, *opts)
    text = out.stdout + out.stderr
    assert "fp8: 16 of" in text and "(emulated" in text
    assert [r["step"] for r in metrics(run)] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in metrics(run))
    out = train(run, demo_shards, 4, *opts)
    assert "resumed from" in out.stdout + out.stderr
