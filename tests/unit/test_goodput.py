"""The goodput account (issue 27.3): every second of every attempt in one category, steps redone
after a kill counted as lost progress, and ``deepmim-goodput`` reading it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from engine.loop.faults import NoFaults
from engine.observe import goodput
from engine.tools.goodput import main as goodput_main
from tests.helpers import in_process_config, train_in_process


class CopyFolderAt(NoFaults):
    """Copies the run folder as a SIGKILL after optimizer step ``step`` would leave it."""

    def __init__(self, run: Path, step: int, to: Path):
        self.run, self.step, self.to = run, step, to

    def step_done(self, step: int) -> None:
        if step == self.step:
            # the heartbeat thread's last beat reports the step before: waited for (on a loaded machine
            # the thread runs late), never assumed
            deadline = time.monotonic() + 60
            while self._beat() < step - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            shutil.copytree(self.run, self.to, ignore=shutil.ignore_patterns("*.lock"))

    def _beat(self) -> int:
        try:
            return int(json.loads((self.run / "heartbeat" / "rank0.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return -1


def account(run: Path) -> dict:
    return json.loads((run / goodput.FILE).read_text())


def test_one_attempt_is_split_into_categories_that_add_up_to_its_wall_time(demo_shards, tmp_path):
    run = tmp_path / "run"
    assert train_in_process(in_process_config(run, demo_shards, 8, "checkpoint.interval=4", "log.interval=2"))[
        "complete"
    ]
    doc = account(run)
    (a,) = doc["attempts"]
    wall = a["last_write_at"] - a["launched_at"]
    assert a["outcome"] == "done" and (a["step_from"], a["step_to"]) == (0, 8)
    assert all(v >= 0 for v in a["seconds"].values())
    assert sum(a["seconds"].values()) == pytest.approx(wall, rel=0.01, abs=0.01)
    assert a["seconds"]["productive"] > 0 and a["seconds"]["checkpoint"] > 0 and a["seconds"]["startup"] > 0
    assert {"data checks and plan", "model", "engine", "checkpoint load", "loader"} <= set(a["startup_parts"])
    s = doc["summary"]
    assert s["goodput"] == pytest.approx(s["seconds"]["productive"] / s["total_s"], rel=1e-3)


def test_steps_after_the_resumed_checkpoint_count_as_lost_progress(demo_shards, tmp_path):
    """Killed during step 7 with the newest checkpoint at step 4 (the copy is the folder a SIGKILL
    leaves: the account as last written at step 4, the heartbeats up to step 6): the next attempt
    redoes steps 5 and 6."""
    run, killed = tmp_path / "run", tmp_path / "killed"
    sets = ("checkpoint.interval=4", "log.interval=4", "fault.heartbeat_s=0.01")
    train_in_process(in_process_config(run, demo_shards, 8, *sets), faults=CopyFolderAt(run, 7, killed))
    first = account(killed)["attempts"][0]
    assert first["outcome"] == "running" and first["step_to"] == 4  # its last write: step 4's line and save
    assert train_in_process(in_process_config(killed, demo_shards, 8, *sets))["complete"]
    doc = account(killed)
    assert [a["outcome"] for a in doc["attempts"]] == ["running", "done"]
    second = doc["attempts"][1]
    assert second["step_from"] == 4 and second["steps_redone"] == 2  # steps 5-6, known from the heartbeats
    per_step = first["seconds"]["productive"] / (first["step_to"] - first["step_from"])
    assert second["seconds"]["lost_progress"] == pytest.approx(2 * per_step, rel=0.01)
    s = doc["summary"]
    assert s["attempts"] == 2 and s["steps_redone"] == 2
    assert s["seconds"]["productive"] == pytest.approx(
        first["seconds"]["productive"] + second["seconds"]["productive"] - second["seconds"]["lost_progress"], rel=1e-3
    )


def test_the_goodput_command_prints_the_account_and_refuses_a_folder_without_one(demo_shards, tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(in_process_config(run, demo_shards, 4, "checkpoint.interval=4"))
    assert goodput_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "productive" in out and "goodput" in out and "attempt 1:" in out and "steps 0 -> 4, done" in out
    assert goodput_main([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attempts"] == 1
    assert goodput_main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no goodput account" in err


def test_a_damaged_account_starts_again_instead_of_stopping_the_run(demo_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / goodput.FILE).write_text("{not json")
    assert train_in_process(in_process_config(run, demo_shards, 4, "checkpoint.interval=4"))["complete"]
    assert len(account(run)["attempts"]) == 1


def test_the_launch_time_is_taken_from_the_launcher_script(monkeypatch):
    monkeypatch.setenv("DEEPMIM_LAUNCHED_AT", "1796400000,25")  # a locale that writes a decimal comma
    assert goodput.launch_time() == (1796400000.25, "launcher script")
    monkeypatch.delenv("DEEPMIM_LAUNCHED_AT")
    started, how = goodput.launch_time()
    assert how in ("process start", "deepspeed launcher start") and started <= goodput.time.time()
    assert abs(goodput.process_start() - started) < 10 or how != "process start"
