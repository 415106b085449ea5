"""Shared fixtures for both tiers (tests/unit: in-process; tests/integration: real launches): a small
real-photo shard set, and helpers that run the deepspeed launcher with a clean environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# What a cluster shell may have exported. A test that starts processes must not inherit them: an
# exported MASTER_PORT would make every launch share one port, a RANK would tell a world-of-one run
# it is rank 3.
DIST_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "CROSS_RANK",
    "CROSS_SIZE",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
    "TORCHELASTIC_RUN_ID",
    "DEEPSPEED_PORT",
    "DS_ACCELERATOR",
    "CUDA_VISIBLE_DEVICES",
)


@pytest.fixture(scope="session", autouse=True)
def _hermetic_environment():
    """In-process tests see no distributed variables of the shell pytest was started from."""
    saved = {k: os.environ.pop(k) for k in DIST_VARS if k in os.environ}
    os.environ["DS_ACCELERATOR"] = "cpu"
    yield
    os.environ.pop("DS_ACCELERATOR", None)
    os.environ.update(saved)


def _untracked() -> set[str]:
    """Untracked and ignored paths of the checkout (folders as one entry)."""
    proc = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = {ln[3:] for ln in proc.stdout.splitlines() if ln[:2] in ("??", "!!")}
    return {p for p in lines if "__pycache__" not in p and not p.startswith((".pytest_cache", ".ruff_cache"))}


@pytest.fixture(scope="session", autouse=True)
def _tests_write_only_under_their_tmp_dirs():
    """A test that leaves a file in the checkout (a run folder, a weights file) fails the session."""
    before = _untracked()
    yield
    left = sorted(_untracked() - before)
    assert not left, f"tests left files in the checkout: {left[:10]}"


def make_shards(src: Path, out: Path, *extra: str) -> None:
    from data_pipeline.shards.make_shards import main

    assert main([str(src), str(out), "--workers", "1", "--no-progress", *extra]) == 0


@pytest.fixture(autouse=True)
def _no_leaked_shared_memory():
    """DeepSpeed's CPU all-reduce leaves ~70 MB buffers in /dev/shm when a run is killed; remove
    what a test's runs left behind so a long suite does not fill the machine's RAM. Only buffers no
    live process holds: a job running beside the tests (another suite, a user's run) keeps its own."""
    import glob

    from engine.loop.dist import SHM_PATTERN, reclaim_stale_shared_memory

    before = set(glob.glob(SHM_PATTERN))
    yield
    if set(glob.glob(SHM_PATTERN)) - before:
        reclaim_stale_shared_memory(min_age_s=0.0, only=set(glob.glob(SHM_PATTERN)) - before)


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory) -> Path:
    """9 classes x 8 real-photo crops (72 JPEGs) in the class-folder layout."""
    from data_pipeline.shards.demo_data import build

    root = tmp_path_factory.mktemp("demo") / "train"
    build(root, per_class=8, size=48, seed=1)
    return root


@pytest.fixture(scope="session")
def demo_shards(demo_tree, tmp_path_factory) -> Path:
    """The demo tree written as 5 or so shards."""
    out = tmp_path_factory.mktemp("shards") / "demo"
    make_shards(demo_tree, out, "--shard-size-mb", "0.03")
    return out


@pytest.fixture(scope="session")
def demo_val_shards(tmp_path_factory) -> Path:
    """Held-out crops of the same nine photos (another seed): labels agree with demo_shards."""
    from data_pipeline.shards.demo_data import build

    root = tmp_path_factory.mktemp("val") / "tree"
    build(root, per_class=4, size=48, seed=7)
    out = tmp_path_factory.mktemp("val_shards") / "val"
    make_shards(root, out, "--shard-size-mb", "0.02")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(nprocs: int, *args: str, module: str = "engine.pretrain") -> list[str]:
    ds = Path(sys.executable).parent / "deepspeed"
    return [str(ds), "--num_gpus", str(nprocs), "--master_port", str(free_port()), "--module", module, *args]


def cpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def start_job(cmd: list[str], env: dict[str, str] | None = None, capture: bool = False) -> subprocess.Popen:
    """A job in a session of its own (``kill_group`` stops all of it), from the repository root;
    ``capture``: stdout and stderr together as text for ``communicate``, else discarded."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    err = subprocess.STDOUT if capture else subprocess.DEVNULL
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env or cpu_env(), stdout=out, stderr=err, text=capture, start_new_session=True
    )


def run_deepspeed(
    nprocs: int, *args: str, timeout: int = 420, check: bool = True, module: str = "engine.pretrain", **env
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        deepspeed_cmd(nprocs, *args, module=module),
        cwd=ROOT,
        env=cpu_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"deepspeed run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_single(*args: str, timeout: int = 300, module: str = "engine.pretrain") -> subprocess.CompletedProcess:
    """``python -m engine.pretrain`` in one process (a world of one, no launcher): for start-up checks."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def pixel_run(demo_shards, tmp_path_factory) -> Path:
    """One 6-step 2-rank run of ``deepmim_test_pixel`` that several test files read (copy it before
    changing it): checkpoints at steps 3 and 6, metrics and TensorBoard every 2 steps, figures every 3."""
    run = tmp_path_factory.mktemp("pixel") / "run"
    sets = [
        f"data.shards={demo_shards}",
        "schedule.max_steps=6",
        "checkpoint.interval=3",
        "log.interval=2",
        "log.figure_interval=3",
    ]
    sets = [a for x in sets for a in ("--set", x)]
    out = run_deepspeed(2, "--preset", "deepmim_test_pixel", "--run-dir", str(run), *sets)
    assert "Process" in out.stdout + out.stderr  # the deepspeed launcher's own lines: it ran under it
    return run
