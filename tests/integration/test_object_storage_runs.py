"""Pretraining that streams its shards from a real S3-compatible server (moto's server mode on a random
loopback port), killed with SIGKILL and resumed, then resumed on another number of ranks: every sample
key once per epoch."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from data_pipeline.shards.upload import upload
from engine.run_folder.checkpoints import MARKER
from tests.conftest import ROOT, cpu_env, deepspeed_cmd, run_deepspeed, start_job
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


def test_throttled_storage_saves_stops_75_and_the_launcher_starts_it_again(demo_shards, tmp_path):
    """S3 answers 503 SlowDown to everything for longer than data.fetch_patience_s, from the fourth tar
    download on: the ranks wait it out with jittered backoff, then stand in empty data, undo those steps,
    save the last step both trained and exit 75; launchers/pretrain.sh starts the run again once the wait is
    over, and it finishes. Nothing is recorded against the data; every key is read once per epoch."""
    import time

    from tests.object_store import CuttingProxy

    run, cache = tmp_path / "run", tmp_path / "cache"
    with s3_server(tmp_path / "aws") as s3, environment(s3.env):
        s3.client().create_bucket(Bucket="shards")
        upload(demo_shards, "s3://shards/demo", workers=4)
        host, port = s3.endpoint.split("//")[1].split(":")
        proxy = CuttingProxy((host, int(port)), throttle_after=4, throttle_s=8.0)
        sets = [
            f"data.s3_endpoint={proxy.endpoint}",
            "data.fetch_patience_s=2",
            "data.prefetch_shards=1",
            "data.block_window=1",
            "data.cache_gb=0.0003",  # about four shards: evicted and fetched again in epoch 1
            "debug.step_sleep_s=0",
            "checkpoint.interval=100",
        ]
        argv = [a for x in sets for a in ("--set", x)]
        cmd = [str(ROOT / "launchers" / "pretrain.sh"), "--gpus", "2", "--transient-restarts", "3"]
        cmd += ["--transient-wait", "2", "--", *args(run, cache, 18), *argv]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=tmp_path, env=cpu_env(**s3.env), capture_output=True, text=True, timeout=600)
        proxy.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert proxy.throttled > 0 and "SlowDown" in out and "standing in empty batches" in out, out[-3000:]
    assert "exit 75" in out and "starting again in" in out  # the launcher's restart after the transient stop
    assert "Traceback" not in out
    assert not list((run / "data_view").glob("runtime_bad_rank*.json"))
    assert json.loads((run / "data_view" / "view.json").read_text())["bad_samples"] == 0
    by_epoch = keys_by_epoch(run, {})
    assert sorted(by_epoch) == [0, 1], out[-2000:]
    for epoch, keys in by_epoch.items():
        assert len(keys) == len(set(keys)) == 72, f"epoch {epoch}: {len(keys)} keys, {len(set(keys))} distinct"
    assert time.monotonic() - t0 < 400


def test_a_fetch_alive_in_another_pid_namespace_keeps_its_reservation(tmp_path):
    """Containers sharing a host's cache folder: a fetch running in another PID namespace names a pid that
    means nothing here (its own 1). Its lock decides: held, its bytes and partial file stay; once it dies,
    they are reclaimed. Without unshare on this machine, a plain process stands in for the container."""
    import shutil
    import sys

    from data_pipeline.remote.cache import ShardCache

    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "a.tar").write_bytes(b"x" * 100)
    holder = (
        "import fcntl, os, sys, time; d = sys.argv[1]; fd = os.open(d + '/b.reserve', os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'300 b.tar.feedfacecafe.tmp'); "
        "open(d + '/b.tar.feedfacecafe.tmp', 'wb').write(b'p' * 10); print(os.getpid(), flush=True); time.sleep(300)"
    )
    cmd = [sys.executable, "-c", holder, str(ns)]
    if shutil.which("unshare") and subprocess.run(["unshare", "--pid", "--fork", "true"]).returncode == 0:
        cmd = ["unshare", "--pid", "--fork", "--kill-child", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pid_inside = int(proc.stdout.readline())
        cache = ShardCache(tmp_path, "ns", budget=1000)
        assert cache.usage() == 400 and (ns / "b.tar.feedfacecafe.tmp").exists()
        assert cmd[0] != "unshare" or pid_inside == 1  # it lived in a PID namespace of its own
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert cache.usage() == 100 and not (ns / "b.reserve").exists() and not (ns / "b.tar.feedfacecafe.tmp").exists()
