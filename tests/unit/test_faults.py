"""Fault handling pieces without a launcher: data preflight, retention, config guard."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from data_pipeline.dataset.wds_index import read_index
from data_pipeline.loaders import preflight
from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.loaders.source import read_dataset
from engine.config import Config, compare_for_resume, fingerprint
from engine.errors import DataError
from engine.run_folder.checkpoints import MARKER, apply_retention, list_checkpoints, mark_complete, newest_complete
from tests.helpers import copy_shards, corrupt_jpeg, truncate_tar


def run_preflight(root: Path, out: Path, checks: str = "markers", world: int = 1):
    """preflight.run as ``world`` ranks would run it: each checks its share of the shards, and the
    exchange (all_gather in training) hands every rank everyone's findings."""
    info = read_dataset(root)
    parts = [
        [b for name in info.shards[r::world] for b in preflight.check_shard(info.table, name, checks, r)]
        for r in range(world)
    ]
    views = [preflight.run(info, checks, out, rank, world, lambda _mine: parts, lambda: None) for rank in range(world)]
    assert all(v.excluded == views[0].excluded for v in views)  # every rank trains on the same sample list
    return views[0]


def loader_spec(root: Path, micro: int = 4, **kw) -> LoaderSpec:
    return LoaderSpec(str(root), 0, 1, micro, micro, 32, seed=0, num_threads=1, **kw)


def test_preflight_skips_and_counts_corrupt_and_truncated(demo_shards, tmp_path):
    root = copy_shards(demo_shards, tmp_path / "shards")
    info = read_dataset(root)
    bad_key = corrupt_jpeg(root, info.shards[0], which=2)
    lost = truncate_tar(root, info.shards[-1], keep_samples=3)
    (root / f"{info.shards[1]}.idx").unlink()  # the loaders read the manifest: nothing lost
    view = run_preflight(root, tmp_path / "view", world=2)
    assert view.total_samples == 72 and view.num_samples == 72 - 1 - lost
    bad = json.loads((tmp_path / "view" / "bad_samples.json").read_text())
    reasons = {(b["shard"], b["key"]): b["reason"] for b in bad}
    assert "EOI" in reasons[(info.shards[0], bad_key)]
    assert sum("truncated tar" in r or "not in the tar" in r for r in reasons.values()) == lost
    meta = json.loads((tmp_path / "view" / "view.json").read_text())
    assert meta["bad_samples"] == 1 + lost and sum(meta["bad_by_rank"].values()) == 1 + lost
    # the loaders leave the excluded rows out: every usable sample once, none of the bad ones
    keys = [k for b in make_loader("dali", loader_spec(root, excluded=view.excluded)) for k in b.keys]
    assert f"{info.shards[0]}/{bad_key}" not in keys and len(set(keys)) == len(keys) == (view.num_samples // 4) * 4


def test_preflight_missing_tar_counts_its_samples(demo_shards, tmp_path):
    root = copy_shards(demo_shards, tmp_path / "shards")
    info = read_dataset(root)
    gone = info.shard_size(info.shards[2])
    (root / f"{info.shards[2]}.tar").unlink()
    view = run_preflight(root, tmp_path / "view")
    assert view.num_samples == 72 - gone
    assert set(view.excluded) == set(info.table.rows_of(info.shards[2]).tolist())
    with pytest.raises(DataError, match="above fault.max_bad_sample_share=0.100%"):
        preflight.check_threshold(view, 0.001, tmp_path / "view")
    preflight.check_threshold(view, 0.5, tmp_path / "view")  # under a loose threshold: fine


def test_preflight_on_clean_data_changes_nothing(demo_shards, tmp_path):
    view = run_preflight(demo_shards, tmp_path / "view", checks="decode")
    assert view.num_samples == view.total_samples == 72 and view.excluded == ()


def test_scan_tar_index_equals_the_written_index(demo_shards):
    info = read_dataset(demo_shards)
    for name in info.shards:
        assert preflight.scan_tar_index(info.tar(name)) == read_index(info.idx(name))


def fake_ckpt(root: Path, step: int, complete: bool = True, keep: bool = False) -> Path:
    p = root / f"step_{step:08d}"
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        mark_complete(p, {"step": step, "world_size": 2, "keep": keep})
    return p


def test_newest_complete_ignores_partial_checkpoints(tmp_path):
    fake_ckpt(tmp_path, 10)
    fake_ckpt(tmp_path, 20)
    fake_ckpt(tmp_path, 30, complete=False)
    assert newest_complete(tmp_path).name == "step_00000020"
    (tmp_path / "step_00000040").mkdir()  # an empty folder from a crash before any file
    (tmp_path / "step_00000020" / MARKER).with_suffix(".json.tmp").write_text("{")  # stray temp marker
    assert newest_complete(tmp_path).name == "step_00000020"


def test_retention_keeps_last_k_and_kept_epochs(tmp_path):
    for s in (10, 20, 30, 40, 50):
        fake_ckpt(tmp_path, s, keep=(s == 20))
    fake_ckpt(tmp_path, 35, complete=False)  # partial, older than the newest complete: removed
    fake_ckpt(tmp_path, 60, complete=False)  # partial, newer: maybe a save in flight: kept
    apply_retention(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000020",
        "step_00000040",
        "step_00000050",
        "step_00000060",
    ]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020", "step_00000040", "step_00000050"]


def test_config_guard_classification():
    saved, now = Config(), Config()
    now.model.taps = [3, 4, 6]
    now.target.kind = "clip"
    now.optim.base_lr = 3e-4
    now.log.interval = 7
    now.checkpoint.interval = 5
    errors, changes, harmless = compare_for_resume(saved, now)
    assert [e.split(":")[0] for e in errors] == ["model.taps", "target.kind"]
    assert [c.split(":")[0] for c in changes] == ["optim.base_lr"]
    assert [h.split(":")[0] for h in harmless] == ["checkpoint.interval", "log.interval"]
    assert fingerprint(saved) != fingerprint(now)
    only_harmless = Config()
    only_harmless.log.interval = 7
    assert fingerprint(saved) == fingerprint(only_harmless)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_every_stop_signal_asks_for_a_clean_stop(sig):
    """SIGTERM, SIGUSR1 and SIGINT all set the stop request (the loop tests act on it); copies
    that arrive at once (a terminal's process group and a forwarding launcher) are one request;
    a later SIGINT stops at once; the previous handlers come back afterwards."""
    from engine.loop.signals import StopRequest, StopSignals

    before = signal.getsignal(sig)
    request = StopRequest()
    stops = StopSignals(request, watch_parent=False, repeat_window_s=0.5)
    try:
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)  # the same Ctrl-C, forwarded: still one request, no abort
        assert request.requested and request.reason == f"received {sig.name}"
        if sig == signal.SIGINT:
            time.sleep(0.6)
            with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
                os.kill(os.getpid(), sig)
    finally:
        stops.restore()
    assert signal.getsignal(sig) is before


class _Dist:
    def __init__(self, rank: int, world_size: int = 2):
        self.rank, self.world_size = rank, world_size


def _failing_trainer(monkeypatch, err: Exception) -> None:
    import engine.loop.trainer as trainer

    class Failing:
        def __init__(self, *args, **kwargs):
            pass

        def train(self):
            raise err

    monkeypatch.setattr(trainer, "Trainer", Failing)


def test_a_rank_sharing_rank0s_error_leaves_only_after_rank0_said_it(monkeypatch, tmp_path):
    """The launcher kills every rank once one exits: rank 1, which found the same damaged checkpoint
    as rank 0, must not exit before rank 0's note (written after its one line) is there."""
    import threading

    from engine import cli
    from engine.errors import CheckpointError

    _failing_trainer(monkeypatch, CheckpointError("damaged"))
    cfg = Config()
    cfg.run_dir = str(tmp_path)
    note0 = tmp_path / "heartbeat" / "stopped_rank0.json"

    def rank0_prints_late():
        time.sleep(0.5)
        note0.parent.mkdir(parents=True, exist_ok=True)
        note0.write_text(json.dumps({"code": 2}))

    slow = threading.Thread(target=rank0_prints_late)
    slow.start()
    code = cli._train(cfg, _Dist(1), lambda: None, stop=None)
    seen_at_exit = note0.exists()
    slow.join()
    assert code == 2 and seen_at_exit
    assert cli.stop_notes(tmp_path / "heartbeat", 0.0) == {0: 2, 1: 2}


def test_a_rank_that_prints_its_own_error_does_not_wait(monkeypatch, tmp_path):
    """Rank 0, and a rank whose error is its own, print the line themselves and leave at once."""
    from engine import cli
    from engine.errors import CheckpointError

    waits = []
    monkeypatch.setattr(cli, "wait_for_notes", lambda *a, **k: waits.append(a) or {})
    cfg = Config()
    cfg.run_dir = str(tmp_path)
    _failing_trainer(monkeypatch, CheckpointError("damaged"))
    assert cli._train(cfg, _Dist(0), lambda: None, stop=None) == 2
    _failing_trainer(monkeypatch, CheckpointError("mine", rank_local=True))
    assert cli._train(cfg, _Dist(1), lambda: None, stop=None) == 2
    assert waits == []
    _failing_trainer(monkeypatch, CheckpointError("shared"))
    assert cli._train(cfg, _Dist(1), lambda: None, stop=None) == 2
    assert len(waits) == 1


def test_stop_notes_of_an_earlier_attempt_are_not_read(tmp_path):
    from engine import cli

    old = tmp_path / "stopped_rank0.json"
    old.write_text(json.dumps({"code": 2}))
    os.utime(old, (100.0, 100.0))
    (tmp_path / "stopped_rank3.json").write_text(json.dumps({"code": 75}))
    assert cli.stop_notes(tmp_path, started=1000.0) == {3: 75}
    assert cli.wait_for_notes(tmp_path, 1000.0, ranks={0}, wait_s=0.1) == {}


def test_a_config_error_every_rank_finds_is_printed_by_rank0_and_others_leave_later(monkeypatch, capsys):
    """Before the process group exists, ranks other than 0 stay silent and delay their exit, so the
    launcher (which kills every rank once one exits) cannot cut off rank 0's line."""
    from engine import cli
    from engine.pretrain import main

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "0")
    assert main(["--preset", "deepmim_test_pixel", "--set", "data.nosuch=1"]) == 2
    assert capsys.readouterr().err.startswith("config error:") and slept == []
    monkeypatch.setenv("RANK", "1")
    assert main(["--preset", "deepmim_test_pixel", "--set", "data.nosuch=1"]) == 2
    assert capsys.readouterr().err == "" and slept == [cli.QUIET_EXIT_DELAY_S]


def test_a_shared_error_rank0_never_reports_is_printed_by_the_rank_that_found_it(monkeypatch, tmp_path, caplog):
    """Rank 0 leaves no note in time (stuck elsewhere): the line is not lost, rank 1 prints it."""
    import logging

    from engine import cli
    from engine.errors import CheckpointError

    monkeypatch.setattr(cli, "PRINTER_WAIT_S", 0.2)
    _failing_trainer(monkeypatch, CheckpointError("no checkpoint verifies"))
    cfg = Config()
    cfg.run_dir = str(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="engine"):
        assert cli._train(cfg, _Dist(1), lambda: None, stop=None) == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no checkpoint verifies" in errors[0].getMessage()
