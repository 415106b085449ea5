"""The training loop's decisions, in-process: the real ``Trainer`` on the local engine
(``engine.loop.engines.local_engine``), the real task, loader, checkpoints, guard and signals.
Save cadence, exact resume, rollback, preemption and the choice of checkpoint, without a launch."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from engine.errors import CheckpointError, DataError, NonFiniteError
from engine.loop.dist import DistInfo
from engine.loop.engines import LocalEngine, local_engine
from engine.loop.faults import FaultDrills
from engine.loop.trainer import Trainer
from engine.run_folder import checkpoints as ckpt
from engine.tasks.masked_modeling import PretrainTask
from tests.helpers import (
    copy_shards,
    corrupt_header,
    corrupt_jpeg,
    in_process_config,
    train_in_process,
    truncate_tar,
)

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def config(run: Path, shards: Path, steps: int, *sets: str):
    return in_process_config(run, shards, steps, "log.sample_keys=true", "fault.heartbeat_s=60", *sets)


def train(run: Path, shards: Path, steps: int, *sets: str, faults=None) -> dict:
    return train_in_process(config(run, shards, steps, *sets), faults)


def steps_saved(run: Path) -> list[int]:
    return [ckpt.step_of(p.name) for p in ckpt.list_checkpoints(run / "checkpoints")]


def weights(run: Path) -> dict[str, torch.Tensor]:
    path = ckpt.list_checkpoints(run / "checkpoints")[-1] / LocalEngine.FILE
    state = torch.load(path, weights_only=False)
    return {**state["module"], **{f"opt.{k}": v for k, v in _flat(state["optimizer"]["state"]).items()}}


def _flat(state: dict) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, st in state.items() for k, v in st.items() if isinstance(v, torch.Tensor)}


def keys(run: Path) -> str:
    return (run / "sample_keys" / "rank0.tsv").read_text()


def test_precision_is_recorded_and_auto_keeps_it_on_resume(demo_shards, tmp_path, monkeypatch):
    import engine.loop.trainer as trainer_module

    run = tmp_path / "run"
    train(run, demo_shards, 2, "engine.precision=fp32", "checkpoint.interval=2")
    assert ckpt.read_marker(run / "checkpoints" / "step_00000002")["precision"] == "fp32"
    # on a machine where auto would pick bf16, the resumed run stays in the precision it trained in
    monkeypatch.setattr(trainer_module, "native_cpu_bf16", lambda: True)
    cfg = config(run, demo_shards, 4, "engine.precision=auto", "checkpoint.interval=2")
    trainer = Trainer(cfg, CPU, PretrainTask(), engine_factory=local_engine)
    assert trainer.train()["step"] == 4
    assert trainer.precision == "fp32" and trainer.ds_config["bf16"]["enabled"] is False
    assert ckpt.read_marker(run / "checkpoints" / "step_00000004")["precision"] == "fp32"
    fresh = Trainer(
        config(tmp_path / "new", demo_shards, 1, "engine.precision=auto"),
        CPU,
        PretrainTask(),
        engine_factory=local_engine,
    )
    fresh.train()
    assert fresh.precision == "bf16"


def test_save_cadence_and_retention(demo_shards, tmp_path):
    run = tmp_path / "run"
    assert train(run, demo_shards, 7, "checkpoint.interval=3", "checkpoint.keep_last=2") == {
        "step": 7,
        "complete": True,
    }
    assert steps_saved(run) == [6, 7]  # 3 was pruned by keep_last, the last step is always saved
    marker = ckpt.read_marker(run / "checkpoints" / "step_00000007")
    assert marker["step"] == 7 and marker["world_size"] == 1 and marker["files"]


def test_interrupted_and_resumed_equals_straight(demo_shards, tmp_path):
    """N straight steps equal k steps + resume + N-k steps: weights, Adam moments, sample keys."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, demo_shards, 12, "checkpoint.interval=4")
    train(split, demo_shards, 5, "checkpoint.interval=4")
    assert steps_saved(split) == [4, 5]
    train(split, demo_shards, 12, "checkpoint.interval=4")
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert keys(straight) == keys(split) and len(keys(split).splitlines()) == 12 * 2  # accumulation 2 on one rank


def test_a_finished_run_does_nothing(demo_shards, tmp_path):
    run = tmp_path / "run"
    train(run, demo_shards, 3)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train(run, demo_shards, 3) == {"step": 3, "complete": True}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_nan_steps_are_skipped_then_rolled_back(demo_shards, tmp_path):
    run = tmp_path / "run"
    result = train(
        run, demo_shards, 10, "checkpoint.interval=4", "debug.nan_loss_steps=[6,7,8]", "fault.max_bad_steps=3"
    )
    assert result["complete"] and result["step"] == 10
    log = (run / "metrics.jsonl").read_text()
    assert '"rollbacks": 1' in log
    # the rollback returned to step 4 and went on past the offending batches: 6 more steps to 10
    assert len(keys(run).splitlines()) == (4 + 4 + 6) * 2


def test_rollback_without_a_checkpoint_stops_with_exit_code_3(demo_shards, tmp_path):
    with pytest.raises(NonFiniteError) as err:
        train(tmp_path / "run", demo_shards, 10, "checkpoint.interval=100", "debug.nan_loss_steps=[1,2,3]")
    assert err.value.exit_code == 3 and "no checkpoint to roll back to" in str(err.value)


class SignalAt(FaultDrills):
    """Sends this process a real signal after an optimizer step (the handler path of a run)."""

    def __init__(self, cfg, step: int, sig: signal.Signals):
        super().__init__(cfg.debug)
        self.at, self.sig = step, sig

    def step_done(self, step: int) -> None:
        super().step_done(step)
        if step == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_the_step_and_marks_the_run_preempted(demo_shards, tmp_path, sig):
    run = tmp_path / "run"
    cfg = config(run, demo_shards, 20, "checkpoint.interval=100")
    result = Trainer(cfg, CPU, PretrainTask(), local_engine, SignalAt(cfg, 3, sig)).train()
    # the request joins the next step's fault flags, so every rank stops after that same step
    assert result == {"step": 4, "complete": False, "preempted": True}
    assert steps_saved(run) == [4] and (run / "PREEMPTED").read_text().strip() == "4"
    assert signal.getsignal(sig) is not None  # the handlers are put back
    result = train(run, demo_shards, 5, "checkpoint.interval=100")  # and the same command continues
    assert result == {"step": 5, "complete": True} and not (run / "PREEMPTED").exists()


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(demo_shards, tmp_path):
    run = tmp_path / "run"
    train(run, demo_shards, 4, "checkpoint.interval=2")
    newest = run / "checkpoints" / "step_00000004" / LocalEngine.FILE
    newest.write_bytes(newest.read_bytes()[:-10])
    result = train(run, demo_shards, 6, "checkpoint.interval=2")
    assert result["step"] == 6
    assert (run / "checkpoints" / "broken-step_00000004").is_dir()


def test_every_checkpoint_damaged_refuses_every_start_until_told(demo_shards, tmp_path):
    """Every complete.json damaged (a storage fault), the job requeued twice: each start refuses with one
    line that lists what was found and how to go on; never a silent start from step 0. Forcing one of them
    (--resume PATH) continues from it; its marker's contents come from its model-states file."""
    run = tmp_path / "run"
    train(run, demo_shards, 4, "checkpoint.interval=2")
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:08d}" / ckpt.MARKER).write_text('{"step": 4, "files": {')
    for _ in range(3):  # the first start sets them aside; the requeued ones find only broken-* folders
        with pytest.raises(CheckpointError) as info:
            train(run, demo_shards, 6)
        msg = info.value.one_line()
        assert "no checkpoint in" in msg and "broken-step_00000004 (unreadable complete.json" in msg, msg
        assert "--resume fresh" in msg and "broken-step_00000002" in msg and "\n" not in str(info.value)
        assert not (run / "metrics.jsonl").read_text().count('"step": 5')
    forced = run / "checkpoints" / "broken-step_00000004"
    result = train(run, demo_shards, 6, f"checkpoint.resume={forced}", "checkpoint.interval=2")
    assert result == {"step": 6, "complete": True}
    train(tmp_path / "straight", demo_shards, 6, "checkpoint.interval=2")
    a, b = weights(tmp_path / "straight"), weights(run)  # continued from step 4, exactly
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train(run, demo_shards, 6) == {"step": 6, "complete": True}  # auto now finds step 6


def test_ranks_agree_on_the_checkpoints_even_when_one_lists_late(tmp_path):
    """Two ranks (threads here) choose among damaged checkpoints; rank 1 starts listing late. Rank 0 may
    not rename one before rank 1 has listed it, or rank 1 would skip the barriers rank 0 waits in."""
    import threading
    import time

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / ckpt.MARKER).write_text("{not json")
    meet = threading.Barrier(2, timeout=10)
    found, errors = {}, []

    def rank(r: int) -> None:
        if r == 1:
            time.sleep(0.5)  # rank 0 is well into the choice by now
        try:
            found[r] = ckpt.newest_verified(root, r, 2, None, meet.wait)
        except threading.BrokenBarrierError as err:
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and found == {0: None, 1: None}
    assert sorted(p.name for p in root.iterdir()) == ["broken-step_00000002", "broken-step_00000004"]


def test_incompatible_config_is_refused_before_anything_is_built(demo_shards, tmp_path):
    run = tmp_path / "run"
    train(run, demo_shards, 2)
    with pytest.raises(CheckpointError, match=r"model.decoder_dim: 32 -> 64"):
        train(run, demo_shards, 4, "model.decoder_dim=64")


@pytest.mark.parametrize("lag", [0, 2])
def test_a_nan_gradient_skips_one_update_and_the_lag_window_does_not_roll_back_twice(demo_shards, tmp_path, lag):
    """A NaN gradient at step 3 is one skipped update; NaN losses at 6-9 (max_bad_steps=3) are one
    rollback. With lag 2 (how flags are read on a GPU) the streak still running in the lag window
    must not trigger a second one."""
    run = tmp_path / "run"
    sets = (
        "checkpoint.interval=2",
        "log.interval=1",
        "debug.nan_grad_steps=3",
        "debug.nan_loss_steps=6,7,8,9",
        f"debug.flag_lag={lag}",
    )
    assert train(run, demo_shards, 12, *sets)["step"] == 12
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rollbacks"] == 1 and rows[-1]["skipped_updates"] == 5
    # every line carries one loss per decoder tap (named once the task is set up)
    taps = [k for k in rows[0] if k.startswith("loss_tap")]
    assert len(taps) >= 2 and all(set(taps) <= r.keys() for r in rows)
    assert all(torch.isfinite(v.float()).all() for v in weights(run).values())


def test_micro_batch_change_on_resume_reads_every_sample_once_per_epoch(demo_shards, tmp_path, caplog):
    """Global batch 8: micro-batch 4 for 4 steps, then 2 (accumulation 4) to the end of the second
    epoch. Each epoch (9 steps of 8) reads every one of the 72 samples once."""
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    train(run, demo_shards, 4, "checkpoint.interval=4")
    assert "precision bf16 (engine.precision=bf16)" in caplog.text  # said in the first lines of the log
    train(run, demo_shards, 18, "checkpoint.interval=4", "data.micro_batch=2")
    assert "resuming with a changed setting: data.micro_batch: 4 -> 2" in caplog.text
    per_step: dict[int, list[str]] = {}
    for line in keys(run).splitlines():
        step, _micro, ks = line.split("\t")
        per_step.setdefault(int(step), []).extend(ks.split(","))
    assert sorted(per_step) == list(range(1, 19))
    for epoch in (range(1, 10), range(10, 19)):
        seen = [k for s in epoch for k in per_step[s]]
        assert len(seen) == len(set(seen)) == 72


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_an_undecodable_jpeg_is_named_recorded_and_skipped_next_time(demo_shards, tmp_path, loader):
    shards = copy_shards(demo_shards, tmp_path / "shards")
    names = json.loads((shards / "dataset.json").read_text())["shards"]
    key = corrupt_header(shards, names[1])  # passes the cheap start-up check; no decoder can decode it
    run = tmp_path / "run"
    opts = ("fault.max_bad_sample_share=0.05", "checkpoint.interval=2", f"data.loader={loader}")
    with pytest.raises(DataError, match=rf"{names[1]}/{key}.*restart the run") as err:
        train(run, shards, 18, *opts)
    assert err.value.exit_code == 2 and err.value.rank_local  # printed by the rank that hit it
    recorded = json.loads((run / "data_view" / "runtime_bad_rank0.json").read_text())
    assert [r["key"] for r in recorded] == [f"{names[1]}/{key}"]
    assert train(run, shards, 18, *opts)["complete"]  # no second crash: the sample is skipped
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert plan["num_samples"] == 71 and "failed at run time" in (run / "data_view" / "bad_samples.json").read_text()


def test_corrupt_and_truncated_data_is_skipped_and_counted_or_refused_above_the_threshold(demo_shards, tmp_path):
    shards = copy_shards(demo_shards, tmp_path / "shards")
    names = json.loads((shards / "dataset.json").read_text())["shards"]
    corrupt_jpeg(shards, names[0])
    lost = truncate_tar(shards, names[-1], keep_samples=2)
    run = tmp_path / "run"
    train(run, shards, 6, "fault.max_bad_sample_share=0.1")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["bad_samples"] == 1 + lost
    bad = json.loads((run / "data_view" / "bad_samples.json").read_text())
    assert len(bad) == 1 + lost and {b["shard"] for b in bad} == {names[0], names[-1]}
    with pytest.raises(DataError, match=r"above fault.max_bad_sample_share=0.100%"):
        train(tmp_path / "run2", shards, 6)  # the default threshold: refused before training
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_resume_logs_what_changed(demo_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    train(run, demo_shards, 2)
    train(run, demo_shards, 4, "log.interval=2", "optim.base_lr=2e-3")
    assert "resuming with a changed setting: log.interval: 1 -> 2" in caplog.text
    assert "resuming with a changed setting that alters training: optim.base_lr" in caplog.text


def test_a_failed_save_is_one_error_and_keeps_earlier_checkpoints(demo_shards, tmp_path):
    """A file where the step-6 checkpoint folder must go makes the save fail for real."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000006").write_text("in the way")
    with pytest.raises(CheckpointError, match="saving checkpoint step_00000006 failed.*earlier checkpoints"):
        train(run, demo_shards, 8, "checkpoint.interval=3")
    assert steps_saved(run) == [3]


# ------------------------------------------------------------------ resuming onto changed data


def read_keys_by_step(run: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in keys(run).splitlines():
        step, _micro, ks = line.split("\t")
        out.setdefault(int(step), []).extend(ks.split(","))
    return out


def test_another_seed_mid_epoch_is_refused_or_starts_the_next_epoch(demo_shards, tmp_path):
    """9 steps per epoch (72 samples, global batch 8). Stopped at step 4, resumed with seed 1: the
    rest of epoch 0 would be another permutation's rest; refused in one line, or, when asked, epoch 1
    starts with the new seed and reads every sample once."""
    run = tmp_path / "run"
    train(run, demo_shards, 4, "checkpoint.interval=4")
    with pytest.raises(DataError) as err:
        train(run, demo_shards, 13, "checkpoint.interval=4", "seed=1")
    msg = str(err.value)
    assert "\n" not in msg and "32 samples per rank into epoch 0" in msg and "seed 0 -> 1" in msg
    assert "data.on_change=next_epoch" in msg and err.value.exit_code == 2
    train(run, demo_shards, 13, "checkpoint.interval=4", "seed=1", "data.on_change=next_epoch")
    steps = read_keys_by_step(run)
    assert sorted(steps) == list(range(1, 14))
    epoch1 = [k for s in range(5, 14) for k in steps[s]]  # steps 5-13: the whole of epoch 1
    assert len(epoch1) == len(set(epoch1)) == 72


def test_changed_or_grown_shards_are_refused_mid_epoch_and_taken_at_an_epoch_end(demo_tree, demo_shards, tmp_path):
    from tests.conftest import make_shards

    run = tmp_path / "run"
    shards = copy_shards(demo_shards, tmp_path / "shards")
    train(run, shards, 4, "checkpoint.interval=4")
    resharded = tmp_path / "resharded"  # the same images in another order: the same path, other contents
    make_shards(demo_tree, resharded, "--shard-size-mb", "0.03", "--seed", "5")
    import shutil

    shutil.rmtree(shards)
    shutil.copytree(resharded, shards)
    with pytest.raises(DataError, match=r"manifest \w+ -> \w+"):
        train(run, shards, 9, "checkpoint.interval=4")
    # at an epoch end the new data is simply the next epoch's
    run2 = tmp_path / "run2"
    train(run2, demo_shards, 9, "checkpoint.interval=9")  # the whole of epoch 0
    assert train(run2, shards, 18, "checkpoint.interval=9")["complete"]
    epoch1 = [k for s in range(10, 19) for k in read_keys_by_step(run2)[s]]
    assert len(epoch1) == len(set(epoch1)) == 72


def test_a_changed_global_batch_is_refused(demo_shards, tmp_path):
    run = tmp_path / "run"
    train(run, demo_shards, 4, "checkpoint.interval=4")
    with pytest.raises(CheckpointError, match=r"data.global_batch: 8 -> 24 \(the step count"):
        train(run, demo_shards, 8, "data.global_batch=24")


def test_resume_never_is_refused_on_a_used_folder_and_fresh_moves_the_run_aside(demo_shards, tmp_path, capsys):
    from engine.pretrain import main

    run = tmp_path / "run"
    train(run, demo_shards, 2)
    args = ["--preset", "deepmim_test_pixel", "--run-dir", str(run), "--set", f"data.shards={demo_shards}", "--check"]
    assert main([*args, "--resume", "never"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run (1 checkpoint(s), the newest at step 2 and metrics.jsonl)" in err
    assert "--resume fresh" in err
    assert train(run, demo_shards, 2, "checkpoint.resume=fresh")["complete"]  # the old run moved aside
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "step_00000002").is_dir()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # one run per metrics file
