"""Teacher targets end to end under the real launcher (2 CPU processes, ZeRO-2, bf16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import from_dict, plan_run
from engine.models.mim import build_model, random_masking
from engine.run_folder.checkpoints import list_checkpoints
from engine.targets.teachers import ClipArch, load_generator
from engine.tools.teacher_tools import random_openai_clip
from tests.conftest import ROOT, cpu_env, run_deepspeed, run_single

pytestmark = pytest.mark.launcher

CLIP = ClipArch(width=32, layers=2, patch=4, grid=4, out_dim=24)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(preset: str, run: Path, shards: Path, steps: int, *extra: str):
    return run_deepspeed(
        2,
        "--preset",
        preset,
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={steps}",
        "--set",
        "checkpoint.interval=2",
        *extra,
    )


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip_openai.pt"
    torch.save(random_openai_clip(CLIP, seed=4), path)
    return path


def test_clip_target_trains_saves_and_resumes(demo_shards, clip_file, tmp_path):
    run = tmp_path / "clip"
    train("deepmim_test_clip", run, demo_shards, 4, "--set", f"target.teacher={clip_file}")
    out = train("deepmim_test_clip", run, demo_shards, 6, "--set", f"target.teacher={clip_file}")
    assert "resumed from" in out.stdout + out.stderr
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0.0 <= r["loss_tap4"] <= 4.0 for r in rows)  # 2 - 2 cos lies in [0, 4]
    assert all(r["time_teacher_s"] > 0 for r in rows)  # the teacher's share is measured
    state = torch.load(list_checkpoints(run / "checkpoints")[-1] / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["target"]["kind"] == "clip" and len(state["target"]["sha256"]) == 64
    assert not any("teacher" in k or k.startswith("vit.") for k in state["module"])  # the teacher is not saved
    assert state["module"]["decoders.pred.weight"].shape[1] == CLIP.out_dim  # width read from the weights


def train_mae(run: Path, shards: Path, steps: int, *extra: str) -> None:
    """Stage 1 in a world of one: only its checkpoints matter here (stage 2 runs on 2 ranks)."""
    proc = run_single(
        "--preset",
        "mae_test_pixel",
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={steps}",
        "--set",
        "checkpoint.interval=2",
        *extra,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_two_stage_mae_then_deepmim_mixed(demo_shards, tmp_path):
    mae = tmp_path / "mae"
    train_mae(mae, demo_shards, 4)
    # Stage 1's checkpoint, loaded as the generator, reproduces our MAE model's reconstruction.
    ckpt = list_checkpoints(mae / "checkpoints")[-1] / "mp_rank_00_model_states.pt"
    state = torch.load(ckpt, weights_only=False)
    saved = from_dict(state["config"])
    ours = build_model(saved, plan_run(saved)).to(torch.bfloat16).eval()
    ours.load_state_dict(state["module"])
    gen = load_generator(mae, img_size=16)
    assert gen.norm_pix is True
    x = torch.randn(3, 3, 16, 16)
    masks = random_masking(3, 16, 0.75, torch.Generator().manual_seed(5), "cpu")
    with torch.no_grad():
        assert torch.equal(gen.model.to(torch.bfloat16).predict(x.bfloat16(), masks), ours.predict(x.bfloat16(), masks))

    # Stage 2: DeepMIM with mixed targets from that MAE; save and resume.
    run = tmp_path / "mixed"
    first = train("deepmim_test_mixed", run, demo_shards, 4, "--set", f"target.generator={mae}")
    assert "froze" in first.stdout + first.stderr and (run / "teacher" / "generator.pt").is_file()
    # The MAE run goes on, and its retention deletes the checkpoint stage 2 started from ...
    train_mae(mae, demo_shards, 8, "--set", "checkpoint.keep_last=1")
    assert [p.name for p in list_checkpoints(mae / "checkpoints")] == ["step_00000008"]
    # ... stage 2 still resumes, with the generator it started with.
    out = train("deepmim_test_mixed", run, demo_shards, 6, "--set", f"target.generator={mae}")
    text = out.stdout + out.stderr
    assert "resumed from" in text and f"snapshot of {mae} at step 4" in text
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    saved = torch.load(list_checkpoints(run / "checkpoints")[-1] / "mp_rank_00_model_states.pt", weights_only=False)
    assert saved["target"]["alphas"] == [0.0, 0.5, 1.0] and saved["target"]["generator_norm_pix"] is True


def test_teacher_stays_frozen_during_training(demo_shards, clip_file, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.frozen_teacher_check",
            "deepmim_test_clip",
            str(tmp_path / "run"),
            f"data.shards={demo_shards}",
            f"target.teacher={clip_file}",
            "schedule.max_steps=4",
            "log.reconstructions=false",
        ],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--set", "target.teacher=/nonexistent/clip.pt"), "config error: target.teacher='/nonexistent/clip.pt'"),
        (("--set", "target.feature_dim=512"), "TeacherError: target.feature_dim=512 but"),
    ],
)
def test_teacher_problems_stop_before_training(demo_shards, clip_file, tmp_path, extra, message):
    out = run_single(
        "--preset",
        "deepmim_test_clip",
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        f"data.shards={demo_shards}",
        "--set",
        f"target.teacher={clip_file}",
        *extra,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2 and message in text  # a missing file is found before any heavy import
    assert "step 1/" not in text


def test_wrong_architecture_for_the_weights(demo_shards, tmp_path):
    """CLIP weights with a broken block (c_fc of the wrong width) are named at start-up."""
    sd = random_openai_clip(CLIP)
    sd["visual.transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(7, 32)
    torch.save(sd, tmp_path / "bad.pt")
    out = run_single(
        "--preset",
        "deepmim_test_clip",
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        f"data.shards={demo_shards}",
        "--set",
        f"target.teacher={tmp_path / 'bad.pt'}",
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "TeacherError" in text and "mlp.fc1.weight" in text


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> Path:
    """A DINOv2-with-registers teacher in timm's hub layout (random weights, test size)."""
    from engine.tools.teacher_tools import write_timm_teacher

    dims = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 16}
    return write_timm_teacher(tmp_path_factory.mktemp("dino") / "dinov2", "vit_base_patch14_reg4_dinov2", 5, **dims)


def test_a_dinov2_teacher_run_killed_and_resumed_is_bitwise_identical(demo_shards, dinov2_folder, tmp_path):
    """A feature-teacher run on 2 ranks: 8 straight steps vs SIGKILL after the step-4 checkpoint and an
    automatic resume: the same weights, optimizer state and losses, bit for bit; the decoders predict
    the teacher's width and the checkpoint records the teacher."""
    from engine.run_folder.checkpoints import MARKER
    from tests.conftest import deepspeed_cmd, start_job
    from tests.helpers import final_state, kill_group, wait_for

    def argv(run: Path, *extra: str) -> list[str]:
        sets = [f"data.shards={demo_shards}", f"target.teacher={dinov2_folder}", "schedule.max_steps=8"]
        sets += ["checkpoint.interval=4"]  # (figures on: similarity maps of the teacher's features)
        flags = [a for s in sets for a in ("--set", s)]
        return ["--preset", "deepmim_test_dinov2", "--run-dir", str(run), *flags, *extra]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_deepspeed(2, *argv(straight))
    proc = start_job(deepspeed_cmd(2, *argv(killed, "--set", "debug.step_sleep_s=0.25")))
    wait_for(lambda: (killed / "checkpoints" / "step_00000004" / MARKER).is_file())
    kill_group(proc)
    assert not (killed / "checkpoints" / "step_00000008" / MARKER).is_file(), "finished before it was killed"
    out = run_deepspeed(2, *argv(killed))
    assert "resumed from" in out.stdout + out.stderr
    m1, o1 = final_state(straight)
    m2, o2 = final_state(killed)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert len(o1) == len(o2) and all(torch.equal(a, b) for a, b in zip(o1, o2))
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(killed)][-8:]
    assert m1["decoders.pred.weight"].shape[-1] == 32  # the teacher's width
    marker = json.loads((list_checkpoints(killed / "checkpoints")[-1] / MARKER).read_text())
    assert marker["target"]["kind"] == "features" and "vit_base_patch14_reg4_dinov2" in marker["target"]["arch"]
