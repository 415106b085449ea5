"""Crash-proof, exact resume and fault handling under the real launcher (2 CPU ranks, ZeRO-2, bf16)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from engine.run_folder.checkpoints import MARKER, list_checkpoints, read_marker
from tests.conftest import deepspeed_cmd, run_deepspeed, start_job
from tests.helpers import final_state, kill_group, wait_for

pytestmark = pytest.mark.launcher

BASE = ("--preset", "deepmim_test_pixel", "--set", "log.reconstructions=false", "--set", "log.sample_keys=true")


def args(run: Path, shards: Path, steps: int, *extra: str) -> list[str]:
    return [
        *BASE,
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={steps}",
        *extra,
    ]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def keys(run: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((run / "sample_keys").glob("*.tsv"))}


def start(run: Path, shards: Path, steps: int, *extra: str) -> subprocess.Popen:
    return start_job(deepspeed_cmd(2, *args(run, shards, steps, *extra)))


def complete(run: Path, step: int) -> bool:
    return (run / "checkpoints" / f"step_{step:08d}" / MARKER).is_file()


def test_sigkill_then_auto_resume_is_bitwise_identical(demo_shards, tmp_path):
    """N straight steps vs k steps, SIGKILL of every process, auto-resume for the rest: the same
    final weights, optimizer state and per-rank sample keys, bit for bit."""
    n = 16
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_deepspeed(2, *args(straight, demo_shards, n, "--set", "checkpoint.interval=4"))
    proc = start(killed, demo_shards, n, "--set", "checkpoint.interval=4", "--set", "debug.step_sleep_s=0.25")
    wait_for(lambda: complete(killed, 8))
    kill_group(proc)
    assert not complete(killed, n), "the run finished before it was killed"
    run_deepspeed(2, *args(killed, demo_shards, n, "--set", "checkpoint.interval=4"))
    m1, o1 = final_state(straight)
    m2, o2 = final_state(killed)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert len(o1) == len(o2) and all(torch.equal(a, b) for a, b in zip(o1, o2))
    k1, k2 = keys(straight), keys(killed)
    assert set(k1) == {"rank0.tsv", "rank1.tsv"} and k1 == k2
    assert len(k1["rank0.tsv"].splitlines()) == n  # one line per micro-step (accumulation 1)
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(killed)][-n:]
    # the goodput account spans both attempts: the killed one as last written, the steps it ran past
    # the checkpoint the second resumed from counted as lost progress
    account = json.loads((killed / "goodput.json").read_text())
    first, second = account["attempts"]
    assert first["outcome"] == "running" and second["outcome"] == "done" and second["step_to"] == n
    assert second["steps_redone"] >= first["step_to"] - second["step_from"] >= 0  # (heartbeats may know more)
    assert first["launch_known_from"] == second["launch_known_from"] == "deepspeed launcher start"
    assert account["summary"]["attempts"] == 2 and 0 < account["summary"]["goodput"] < 1


def test_kill_during_save_uses_the_previous_checkpoint(demo_shards, tmp_path):
    run = tmp_path / "run"
    proc = start(run, demo_shards, 12, "--set", "checkpoint.interval=4", "--set", "debug.pause_before_marker_s=4")
    partial = run / "checkpoints" / "step_00000008"
    wait_for(lambda: (partial / "mp_rank_00_model_states.pt").is_file() or complete(run, 8), timeout=300)
    kill_group(proc)
    assert (partial / "mp_rank_00_model_states.pt").is_file() and not (partial / MARKER).is_file()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000004"]
    out = run_deepspeed(2, *args(run, demo_shards, 12, "--set", "checkpoint.interval=4"))
    text = out.stdout + out.stderr
    assert "resumed from" in text and "step_00000004" in text
    assert complete(run, 12) and complete(run, 8)  # step 8 redone and completed this time


def test_injected_nan_is_skipped_then_rolled_back_under_zero2(demo_shards, tmp_path):
    """A NaN gradient at step 3: that update is skipped. NaN losses at steps 6-9 (fault.max_bad_steps=3):
    skipped, then exactly one rollback to the newest checkpoint, and the run finishes with finite
    weights. lag=2 is how the flags are read on a GPU (two steps late): the streak still running
    in the lag window must not trigger a second rollback. (The loop's decisions for lag 0 are in
    tests/unit/test_loop.py; this is the guard on DeepSpeed's ZeRO-2 gradient partitions.)"""
    lag = 2
    run = tmp_path / "run"
    out = run_deepspeed(
        2,
        *args(
            run,
            demo_shards,
            12,
            "--set",
            "checkpoint.interval=2",
            "--set",
            "log.interval=1",
            "--set",
            "debug.nan_grad_steps=3",
            "--set",
            "debug.nan_loss_steps=6,7,8,9",
            "--set",
            f"debug.flag_lag={lag}",
        ),
    )
    text = out.stdout + out.stderr
    assert "step 3: non-finite loss or gradient; update skipped (1 skipped so far, 1 in a row)" in text
    assert "rolled back to" in text
    rows = metrics(run)
    assert rows[-1]["step"] == 12 and rows[-1]["rollbacks"] == 1 and rows[-1]["skipped_updates"] == 5
    module, optim = final_state(run)
    assert all(torch.isfinite(v.float()).all() for v in module.values())
    assert all(torch.isfinite(t).all() for t in optim)


# pixel_run (tests/conftest.py): 6 steps on 2 ranks, checkpoints at 3 and 6, logged every 2 steps.
AS_STARTED = (
    "--preset",
    "deepmim_test_pixel",
    "--set",
    "checkpoint.interval=3",
    "--set",
    "log.interval=2",
    "--set",
    "log.figure_interval=3",
)


def resume_args(run: Path, shards: Path, steps: int, *extra: str) -> list[str]:
    return [
        *AS_STARTED,
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={steps}",
        *extra,
    ]


def test_elastic_resume_from_two_ranks_to_one(pixel_run, demo_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pixel_run, run)
    out = run_deepspeed(1, *resume_args(run, demo_shards, 10))
    text = out.stdout + out.stderr
    assert "elastic resume" in text and "accumulation 2" in text
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert cfg["data"]["global_batch"] == 8  # the global batch is kept, accumulation re-derived
    # the schedule position is kept: the lr at every step is the 2-rank schedule's
    from engine.config import from_dict, plan_run
    from engine.loop.schedule import lr_at

    d = plan_run(from_dict(cfg), 2, 72)
    assert [r["lr"] for r in rows] == [lr_at(r["step"] - 1, d.lr, d.warmup_steps, d.total_steps) for r in rows]
    assert read_marker(list_checkpoints(run / "checkpoints")[-1])["world_size"] == 1
    assert all(0 < r["loss"] < 2 * rows[2]["loss"] for r in rows[3:])  # the loaded weights, not a fresh start
