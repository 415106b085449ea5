"""Helpers shared by both test tiers: damaging shards on purpose, pickle payloads, waiting on runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from data_pipeline.wds_index import read_index
from engine.loop.checkpoint import list_checkpoints

MARK = "payload-ran"


class Payload:
    """Pickles to a call that creates a marker file when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def corrupt_jpeg(root: Path, shard: str, which: int = 0) -> str:
    """Zero the second half of one JPEG inside a tar (its EOI marker goes with it)."""
    s = read_index(root / f"{shard}.idx")[which]
    jpg = s.component("jpg")
    with open(root / f"{shard}.tar", "r+b") as f:
        f.seek(jpg.offset + jpg.size // 2)
        f.write(b"\0" * (jpg.size - jpg.size // 2))
    return s.key


def truncate_tar(root: Path, shard: str, keep_samples: int) -> int:
    """Cut the tar in the middle of sample ``keep_samples``; returns how many samples are lost."""
    entries = read_index(root / f"{shard}.idx")
    cut = entries[keep_samples].component("jpg")
    with open(root / f"{shard}.tar", "r+b") as f:
        f.truncate(cut.offset + cut.size // 3)
    return len(entries) - keep_samples


def text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def wait_for(cond: Callable[[], bool], timeout: float = 240.0) -> None:
    """Poll until ``cond()`` (a guard against a hung run, not a timing assertion)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def final_state(run: Path) -> tuple[dict, list[torch.Tensor]]:
    """Module weights and every rank's fp32 master partition + Adam moments of the newest checkpoint."""
    ck = list_checkpoints(run / "checkpoints")[-1]
    module = torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    optim = []
    for f in sorted(ck.glob("*optim_states.pt")):
        osd = torch.load(f, weights_only=False)["optimizer_state_dict"]
        optim += list(osd["single_partition_of_fp32_groups"])
        for st in osd["base_optimizer_state"]["state"].values():
            optim += [st["exp_avg"], st["exp_avg_sq"]]
    return module, optim


def corrupt_header(root: Path, shard: str, which: int = 0) -> str:
    """Zero a JPEG's frame size: SOI and EOI markers stay, so the cheap start-up check passes, but
    no decoder (DALI's or PIL's) can decode it."""
    s = read_index(root / f"{shard}.idx")[which]
    jpg = s.component("jpg")
    with open(root / f"{shard}.tar", "r+b") as f:
        f.seek(jpg.offset)
        data = bytearray(f.read(jpg.size))
        i = data.find(b"\xff\xc0")
        data[i + 5 : i + 9] = b"\0\0\0\0"
        f.seek(jpg.offset)
        f.write(bytes(data))
    return s.key
