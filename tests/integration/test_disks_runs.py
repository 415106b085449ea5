"""Full and read-only disks, on a small file system of the test's own (a tmpfs mounted for it: these
tests start ``mount``, so they live in this tier). The training itself runs in this process."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from engine.config import apply_overrides
from engine.disk import DiskError
from engine.errors import CheckpointError
from engine.loop.faults import FaultDrills
from engine.presets import get_preset
from tests.helpers import in_process_config, train_in_process


def pretrain(run: Path, shards: Path, steps: int, *sets: str, faults=None) -> dict:
    return train_in_process(in_process_config(run, shards, steps, *sets), faults=faults)


@pytest.fixture
def small_fs(tmp_path):
    """A 6 MB tmpfs of the test's own (skipped where this machine allows no mounts); a checkpoint of the
    test model on the local engine is about 1.3 MB."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


class FillDiskBeforeMarker(FaultDrills):
    """Fills the file system after the checkpoint's files and before its marker, once."""

    def __init__(self, cfg, folder: Path, step: int):
        super().__init__(cfg.debug)
        self.folder, self.at, self.step = folder, step, 0

    def step_done(self, step: int) -> None:
        self.step = step

    def before_marker(self) -> None:
        if self.step == self.at:
            with open(self.folder / "filler", "wb") as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()


def test_a_full_disk_at_a_checkpoint_or_its_marker_leaves_earlier_checkpoints_intact(demo_shards, small_fs):
    run = small_fs / "run"
    cfg = get_preset("deepmim_test_pixel")
    apply_overrides(cfg, ["checkpoint.interval=2"])
    with pytest.raises(DiskError) as err:
        pretrain(run, demo_shards, 6, "checkpoint.interval=2", faults=FillDiskBeforeMarker(cfg, small_fs, 4))
    msg = str(err.value)
    assert "no space left writing" in msg and "complete.json" in msg and "MB free" in msg, msg
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000002"]  # the failed one is gone, the earlier one intact
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("complete.json.tmp"))
    (small_fs / "filler").unlink()
    assert pretrain(run, demo_shards, 6, "checkpoint.interval=2")["complete"]  # and the run resumes from it
    # the checkpoint's own files do not fit: the same, one error naming the space left
    shutil.rmtree(run)
    (small_fs / "filler2").write_bytes(b"\0" * (shutil.disk_usage(small_fs).free - 300_000))
    with pytest.raises(CheckpointError, match=r"saving checkpoint step_00000002 failed .*MB free on that file system"):
        pretrain(run, demo_shards, 4, "checkpoint.interval=2")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]


def test_a_read_only_run_folder_is_found_before_launch(small_fs, demo_shards, capsys):
    from engine.pretrain import main

    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    code = main(
        [
            "--preset",
            "deepmim_test_pixel",
            "--run-dir",
            str(small_fs / "run"),
            "--set",
            f"data.shards={demo_shards}",
            "--check",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "read-only file system" in err, err
