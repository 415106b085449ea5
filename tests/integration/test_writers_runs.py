"""Two writers into one folder as two nodes of one job start them: real processes at the same time,
for make_shards and for index_shards. Each time the folder is exactly what one writer makes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from data_pipeline.shards import verify
from tests.conftest import ROOT, cpu_env, make_shards


def both(cmd: list[str]) -> None:
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs


def same_files(ref: Path, out: Path) -> None:
    names = sorted(p.name for p in ref.iterdir() if p.is_file())
    assert names == sorted(p.name for p in out.iterdir() if p.is_file())
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert not list(out.glob("*.tmp"))


def test_two_make_shards_into_one_folder(demo_tree, tmp_path):
    ref = tmp_path / "ref"
    make_shards(demo_tree, ref, "--shard-size-mb", "0.01")
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        both([sys.executable, "-m", "data_pipeline.make_shards", str(demo_tree), str(out), "--shard-size-mb", "0.01",
              "--workers", "2", "--no-progress"])  # fmt: skip
        same_files(ref, out)
        assert verify.verify(out) == []


def test_two_index_shards_into_one_folder(demo_shards, tmp_path):
    from data_pipeline.shards.index_shards import main

    ref = tmp_path / "ref"
    assert main([str(demo_shards), str(ref), "--workers", "1"]) == 0
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        both([sys.executable, "-m", "data_pipeline.index_shards", str(demo_shards), str(out), "--workers", "2"])
        same_files(ref, out)


def test_rerun_after_a_killed_write_gives_identical_shards(demo_tree, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    make_shards(demo_tree, ref, "--shard-size-mb", "0.01")
    n_shards = len(json.loads((ref / "dataset.json").read_text())["shards"])
    cmd = [
        sys.executable,
        "-m",
        "data_pipeline.make_shards",
        str(demo_tree),
        str(killed),
        "--shard-size-mb",
        "0.01",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while len(list(killed.glob("*.part.json"))) < 3 and time.monotonic() - t0 < 60:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("*.part.json")))
    assert 3 <= done < n_shards, "the writer finished before it was killed"
    (killed / "shard-000000.tar").write_bytes(b"torn")  # a finished shard damaged afterwards is redone too
    make_shards(demo_tree, killed, "--shard-size-mb", "0.01")
    for name in sorted(p.name for p in ref.iterdir() if p.suffix in (".tar", ".idx", ".json")):
        assert (ref / name).read_bytes() == (killed / name).read_bytes(), name
    assert pq.read_table(ref / "manifest.parquet").equals(pq.read_table(killed / "manifest.parquet"))
    assert not list(killed.glob("*.tmp"))
    assert verify.verify(killed) == []
