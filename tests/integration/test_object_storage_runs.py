"""Pretraining that streams its shards from a real S3-compatible server (moto's server mode on a random
loopback port), killed with SIGKILL and resumed, then resumed on another number of ranks: every sample
key once per epoch."""

from __future__ import annotations

import collections
import subprocess
from pathlib import Path

import pytest

from data_pipeline.shards.upload import upload
from engine.run_folder.checkpoints import MARKER
from tests.conftest import cpu_env, deepspeed_cmd, run_deepspeed, start_job
from tests.helpers import kill_group, wait_for
from tests.object_store import environment, s3_server

pytestmark = pytest.mark.launcher

STEPS_PER_EPOCH = 9  # 72 samples, global batch 8, nothing left out


def args(run: Path, cache: Path, steps: int) -> list[str]:
    sets = [
        "data.shards=s3://shards/demo",
        f"data.cache_dir={cache}",
        "data.block_window=2",
        f"schedule.max_steps={steps}",
        "checkpoint.interval=4",
        "log.sample_keys=true",
        "log.reconstructions=false",
        "debug.step_sleep_s=0.3",
    ]
    return ["--preset", "deepmim_test_pixel", "--run-dir", str(run), *(a for s in sets for a in ("--set", s))]


def complete(run: Path, step: int) -> bool:
    return (run / "checkpoints" / f"step_{step:08d}" / MARKER).is_file()


def keys_by_epoch(run: Path, last_step_of: dict[str, int]) -> dict[int, list[str]]:
    """Sample keys of every step, by epoch; ``last_step_of[file]``: lines after it were redone by others."""
    out = collections.defaultdict(list)
    for path in sorted((run / "sample_keys").glob("*.tsv")):
        for line in path.read_text().splitlines():
            step, _micro, keys = line.split("\t")
            if int(step) <= last_step_of.get(path.name, 10**9):
                out[(int(step) - 1) // STEPS_PER_EPOCH].extend(keys.split(","))
    return out


def test_stream_from_s3_sigkill_resume_then_fewer_ranks(demo_shards, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    with s3_server(tmp_path / "aws") as s3, environment(s3.env):
        s3.client().create_bucket(Bucket="shards")
        upload(demo_shards, "s3://shards/demo", workers=4)
        env = cpu_env(**s3.env)

        def start(steps: int) -> subprocess.Popen:
            return start_job(deepspeed_cmd(2, *args(run, cache, steps)), env)

        proc = start(18)  # two epochs on 2 ranks, killed mid-epoch 0 ...
        wait_for(lambda: complete(run, 4))
        kill_group(proc)
        proc = start(18)  # ... resumed on 2 ranks, killed mid-epoch 1 ...
        wait_for(lambda: complete(run, 12))
        kill_group(proc)
        assert not complete(run, 18), "the run finished before it was killed"
        out = run_deepspeed(1, *args(run, cache, 18), **s3.env)  # ... and finished on 1 rank
    text = out.stdout + out.stderr
    assert "elastic resume" in text and "block order" in text
    by_epoch = keys_by_epoch(run, {"rank1.tsv": 12})  # rank 1's lines after step 12 were redone by rank 0
    assert sorted(by_epoch) == [0, 1]
    for epoch, keys in by_epoch.items():
        assert len(keys) == len(set(keys)) == 72, f"epoch {epoch}: {len(keys)} keys, {len(set(keys))} distinct"
    assert list((cache / "shards").glob("*/*.tar"))  # streamed through the node's cache
