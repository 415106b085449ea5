"""Checkpoint files written with their checksums, and saves that do not stop training (issue 27.2):
the writer on its own, and the real ``Trainer`` on the local engine with synchronous and
asynchronous saves."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_pipeline.dataset.hashing import crc32_file
from engine.loop import checkpoint_writer
from engine.loop.checkpoint_writer import RECORD, CheckpointWriter, gather_records
from engine.loop.engines import LocalEngine
from engine.run_folder import checkpoints as ckpt
from tests.helpers import in_process_config, train_in_process


def info(root: Path, tag: str) -> SimpleNamespace:
    return SimpleNamespace(tag=tag, save_dir=str(root), save_latest=False)


@pytest.fixture
def gate(monkeypatch):
    """Holds the background writer before it writes a file, until the test opens the gate."""
    opened = threading.Event()
    real = checkpoint_writer.write_file

    def held(state, path, zipped=True):
        opened.wait(timeout=60)
        return real(state, path, zipped)

    monkeypatch.setattr(checkpoint_writer, "write_file", held)
    return opened


def test_a_file_is_checksummed_while_written_and_the_record_matches_the_disk(tmp_path):
    w = CheckpointWriter(0, 1, async_save=False, device=torch.device("cpu"))
    w.create(info(tmp_path, "step_00000001"))
    w.makedirs(tmp_path / "step_00000001", exist_ok=True)
    path = tmp_path / "step_00000001" / "a.pt"
    w.save({"w": torch.randn(1000), "n": 3}, str(path))
    assert w.records == {"a.pt": {"size": path.stat().st_size, "crc32": crc32_file(path)}}
    assert torch.equal(w.load(str(path))["w"], torch.load(path)["w"])


def test_an_asynchronous_save_writes_the_state_of_the_save_not_what_training_did_next(tmp_path, gate):
    w = CheckpointWriter(0, 1, async_save=True, device=torch.device("cpu"))
    live = {"w": torch.zeros(64), "view": torch.arange(10.0)[2:5], "step": 7}
    done: list[tuple[Path, dict]] = []
    w.on_complete = lambda tag_dir, records: done.append((tag_dir, records))
    tag = tmp_path / "step_00000007"
    w.create(info(tmp_path, tag.name))
    w.makedirs(tag, exist_ok=True)
    w.save(live, str(tag / "states.pt"))
    w.commit(info(tmp_path, tag.name))
    assert w.writing and not (tag / "states.pt").exists()  # returned before the file was written
    live["w"].add_(1.0)  # the next optimizer step, in place
    gate.set()
    assert w.wait() >= 0 and not w.writing and w.error is None
    saved = torch.load(tag / "states.pt")
    assert torch.equal(saved["w"], torch.zeros(64)) and saved["step"] == 7
    assert torch.equal(saved["view"], torch.tensor([2.0, 3.0, 4.0]))
    # rank 0's completion ran once the record was durable, with the sizes and CRCs of the files
    assert done == [
        (tag, {"states.pt": {"size": (tag / "states.pt").stat().st_size, "crc32": crc32_file(tag / "states.pt")}})
    ]
    assert json.loads((tag / RECORD.format(rank=0)).read_text()) == done[0][1]


def test_host_copies_are_reused_from_one_save_to_the_next(tmp_path):
    w = CheckpointWriter(0, 1, async_save=True, device=torch.device("cpu"))
    for step in (1, 2):
        tag = tmp_path / f"step_{step:08d}"
        w.create(info(tmp_path, tag.name))
        w.makedirs(tag, exist_ok=True)
        w.save({"w": torch.full((256,), float(step)), "again": None}, str(tag / "s.pt"))
        w.commit(info(tmp_path, tag.name))
        buffers = [b.data_ptr() for b in w.copies.buffers]
    w.wait()
    assert buffers == [b.data_ptr() for b in w.copies.buffers] and len(buffers) == 1
    assert torch.equal(torch.load(tmp_path / "step_00000001" / "s.pt")["w"], torch.full((256,), 1.0))
    assert torch.equal(torch.load(tmp_path / "step_00000002" / "s.pt")["w"], torch.full((256,), 2.0))


def test_rank_zero_waits_for_every_rank_and_gives_up_when_one_failed(tmp_path):
    tag = tmp_path / "step_00000004"
    tag.mkdir()
    checkpoint_writer.write_record(tag / RECORD.format(rank=0), {"a": {"size": 1, "crc32": "0"}})
    late = threading.Timer(
        0.3, checkpoint_writer.write_record, (tag / RECORD.format(rank=1), {"b": {"size": 2, "crc32": "1"}})
    )
    late.start()
    assert gather_records(tag, 2) == {"a": {"size": 1, "crc32": "0"}, "b": {"size": 2, "crc32": "1"}}
    (tag / RECORD.format(rank=1)).unlink()
    (tag / ".failed-rank1").write_text("OSError: [Errno 28] No space left on device\n")
    with pytest.raises(OSError, match="rank1: OSError: .*No space left"):
        gather_records(tag, 2)
    (tag / ".failed-rank1").unlink()
    stop = threading.Event()
    stop.set()
    with pytest.raises(OSError, match="stopped waiting for rank 1"):
        gather_records(tag, 2, stop)


def test_a_write_that_fails_in_the_background_leaves_no_marker_and_reports_the_error(tmp_path, monkeypatch):
    def full(state, path, zipped=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_writer, "write_file", full)
    w = CheckpointWriter(0, 1, async_save=True, device=torch.device("cpu"))
    completed = []
    w.on_complete = lambda *a: completed.append(a)
    tag = tmp_path / "step_00000002"
    w.create(info(tmp_path, tag.name))
    w.makedirs(tag, exist_ok=True)
    w.save({"w": torch.ones(3)}, str(tag / "s.pt"))
    w.commit(info(tmp_path, tag.name))
    w.wait()
    assert isinstance(w.error, OSError) and not completed and not (tag / RECORD.format(rank=0)).exists()
    assert "No space left" in (tag / ".failed-rank0").read_text()


# ------------------------------------------------------------------------------ the trainer


def weights(run: Path) -> dict[str, torch.Tensor]:
    path = ckpt.list_checkpoints(run / "checkpoints")[-1] / LocalEngine.FILE
    return torch.load(path, weights_only=False)["module"]


def test_asynchronous_and_synchronous_saves_write_the_same_checkpoints(demo_shards, tmp_path):
    runs = {}
    for mode in ("true", "false"):
        run = tmp_path / mode
        cfg = in_process_config(
            run, demo_shards, 6, "checkpoint.interval=2", "checkpoint.keep_last=2", f"checkpoint.async_save={mode}"
        )
        assert train_in_process(cfg)["complete"]
        runs[mode] = run
    a, s = runs["true"], runs["false"]
    assert [p.name for p in ckpt.list_checkpoints(a / "checkpoints")] == ["step_00000004", "step_00000006"]
    assert [p.name for p in ckpt.list_checkpoints(s / "checkpoints")] == ["step_00000004", "step_00000006"]
    wa, ws = weights(a), weights(s)
    assert wa.keys() == ws.keys() and all(torch.equal(wa[k], ws[k]) for k in wa)
    for run in (a, s):
        newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
        marker = ckpt.read_marker(newest)
        # the marker lists what the writer recorded, and it is what is on disk
        assert marker["files"] == ckpt.describe_files(newest) and ckpt.verify(newest) == []
        assert not list(newest.glob(".files-rank*")) and (run / "checkpoints" / "latest").read_text() == newest.name


def test_a_process_killed_while_its_save_is_written_resumes_from_the_previous_one(demo_shards, tmp_path, monkeypatch):
    """The run folder as a kill during the background write of step 4 leaves it (copied while the
    writer is held in that write): no marker for step 4, and a start from that folder resumes from
    step 2 and ends with the weights of a run that was never interrupted."""
    straight = tmp_path / "straight"
    assert train_in_process(in_process_config(straight, demo_shards, 6, "checkpoint.interval=2"))["complete"]
    held, release = threading.Event(), threading.Event()
    real = checkpoint_writer.write_file

    def write(state, path, zipped=True):
        if path.parent.name == "step_00000004":
            held.set()
            release.wait(timeout=120)
        return real(state, path, zipped)

    monkeypatch.setattr(checkpoint_writer, "write_file", write)
    run, killed = tmp_path / "run", tmp_path / "killed"

    def kill_now() -> None:  # the folder at the moment of a kill: copied while the write is held
        if held.wait(timeout=300):
            shutil.copytree(run, killed, ignore=shutil.ignore_patterns("*.lock", "heartbeat"))
        release.set()

    snapshot = threading.Thread(target=kill_now)
    snapshot.start()
    cfg = in_process_config(run, demo_shards, 6, "checkpoint.interval=2")
    assert train_in_process(cfg)["complete"]  # (the held run itself finishes normally)
    snapshot.join()
    assert [p.name for p in ckpt.list_checkpoints(killed / "checkpoints")] == ["step_00000002"]
    assert not (killed / "checkpoints" / "step_00000004" / ckpt.MARKER).exists()
    cfg = in_process_config(killed, demo_shards, 6, "checkpoint.interval=2")
    assert train_in_process(cfg)["complete"]
    w1, w2 = weights(straight), weights(killed)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_old_checkpoints_lose_their_marker_before_their_files(tmp_path, monkeypatch):
    """Retention deletes the marker first: a deletion cut short leaves a partial folder, never a
    complete checkpoint with files missing."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        p = root / ckpt.tag_for(step)
        p.mkdir(parents=True)
        (p / "f.pt").write_bytes(b"x" * 10)
        ckpt.mark_complete(p, {"step": step, "world_size": 1})
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # cut short before any file goes
    ckpt.apply_retention(root, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert (root / "step_00000001" / "f.pt").exists() and not (root / "step_00000001" / ckpt.MARKER).exists()


# ------------------------------------------------------------------------------ restarts (issue 27.4)


def test_a_resume_verifies_the_checkpoint_while_the_engine_is_built(demo_shards, tmp_path, monkeypatch):
    """The check of the files waits here until the engine exists: had the start waited for the check
    before building, it would never get there (the check gives up after 60 s and says so)."""
    run = tmp_path / "run"
    assert train_in_process(in_process_config(run, demo_shards, 4, "checkpoint.interval=2"))["complete"]
    from engine.loop.trainer import Trainer

    built, waited = threading.Event(), []
    real_problems, real_build = ckpt.file_problems, Trainer._build_engine

    def slow_check(*a):
        waited.append(built.wait(timeout=60))
        return real_problems(*a)

    def build_engine(self):
        real_build(self)
        built.set()

    monkeypatch.setattr(ckpt, "file_problems", slow_check)
    monkeypatch.setattr(Trainer, "_build_engine", build_engine)
    assert train_in_process(in_process_config(run, demo_shards, 6, "checkpoint.interval=2"))["step"] == 6
    assert waited == [True]


def test_a_damaged_newest_checkpoint_the_built_run_cannot_load_ends_the_start_with_75(demo_shards, tmp_path):
    """Found damaged after the engine was built for it, and the one before was written by another
    world size: that start ends (exit 75: the same command continues) instead of loading it into an
    engine built for the other."""
    from engine.errors import TransientError

    run = tmp_path / "run"
    assert train_in_process(in_process_config(run, demo_shards, 4, "checkpoint.interval=2"))["complete"]
    older = run / "checkpoints" / "step_00000002" / ckpt.MARKER
    older.write_text(json.dumps({**json.loads(older.read_text()), "world_size": 2}))
    newest = run / "checkpoints" / "step_00000004" / LocalEngine.FILE
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.raises(TransientError, match="step_00000004 is damaged .* step_00000002, was written with other"):
        train_in_process(in_process_config(run, demo_shards, 6, "checkpoint.interval=2"))
    assert (run / "checkpoints" / "broken-step_00000004").is_dir()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000002"]
