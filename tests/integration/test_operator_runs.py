"""Commands as a user types them: the launcher script's ports, paths and hostfile, and start-up
errors that come at once."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cpu_env, run_deepspeed


def launch(cwd: Path, shards: Path, run_dir: str, steps: int, *opts: str, **kw) -> subprocess.Popen:
    cmd = [
        "bash",
        str(ROOT / "launchers" / "pretrain.sh"),
        *opts,
        "--",
        "--preset",
        "deepmim_test_pixel",
        "--run-dir",
        run_dir,
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={steps}",
        "--set",
        "log.reconstructions=false",
    ]
    return subprocess.Popen(cmd, cwd=cwd, env=cpu_env(**kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.launcher
def test_two_runs_at_once_from_another_folder_with_relative_run_dirs(demo_shards, tmp_path):
    """Started together without ports, from a folder outside the checkout: both get their own port,
    neither waits, and each run folder is where the user's relative path says (one process each:
    what matters here is the launcher, twice at once)."""
    procs = [launch(tmp_path, demo_shards, f"runs/r{i}", 3, "--gpus", "1") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    for i in range(2):
        assert (tmp_path / "runs" / f"r{i}" / "checkpoints" / "step_00000003" / "complete.json").is_file()
        assert not (ROOT / "runs" / f"r{i}").exists()
    text = "".join(o + e for o, e in outs)  # and the known noise is gone from what a user reads
    for noise in ("Setting CUDA_VISIBLE_DEVICES", "FutureWarning", "built successfully", "CUDA_HOME", "[INFO] [launch"):
        assert noise not in text, noise


def test_taken_port_is_one_line_at_once(demo_shards, tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        p = launch(tmp_path, demo_shards, "runs/x", 2, "--gpus", "2", "--master-port", str(port))
        _out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and f"port {port} is in use" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # refused before any process started


def test_wrong_shard_path_is_one_line_at_once(tmp_path):
    p = launch(tmp_path, tmp_path / "no_such_shards", "runs/x", 2, "--gpus", "2")
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.count("\n") == 1, err
    assert f"data.shards='{tmp_path / 'no_such_shards'}'" in err and "make_shards" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.launcher
def test_documented_no_ssh_two_node_command_runs_a_world_of_two(demo_shards, tmp_path):
    """docs/launching.md's command, on every "node" of a two-line hostfile (slots=1 each), as written
    but for K and the local master address: the hostfile's slots decide the world size (2, not 4)."""
    doc = (ROOT / "docs" / "launching.md").read_text()
    documented = re.search(
        r"launchers/pretrain.sh --hostfile hostfile --no-ssh --node-rank K --master-addr node0 "
        r"--master-port 29500 -- \\",
        doc,
    )
    assert documented, "the documented command changed: update this test"
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    procs = [
        launch(
            tmp_path,
            demo_shards,
            "runs/two",
            2,
            "--hostfile",
            "hostfile",
            "--no-ssh",
            "--node-rank",
            str(k),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
        )
        for k in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    text = "".join(o + e for o, e in outs)
    assert "2 ranks x micro-batch 4" in text


def test_a_world_size_the_recipe_cannot_use_is_refused_before_launch(demo_shards, tmp_path):
    """3 processes cannot share a global batch of 8: one line with the nearest batches, no process."""
    p = launch(tmp_path, demo_shards, "runs/x", 2, "--gpus", "3")
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.count("\n") == 1, err
    assert "data.global_batch=8 on 3 ranks" in err and "data.global_batch=9" in err
    assert not (tmp_path / "runs").exists()


def test_an_error_found_after_launch_is_printed_once(demo_shards, tmp_path):
    """Both ranks find the damaged marker; rank 0 alone says so, and the launcher exits 2."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "complete.json").write_text("{not json")
    proc = run_deepspeed(
        2, "--preset", "deepmim_test_pixel", "--run-dir", str(run), "--set", f"data.shards={demo_shards}", check=False
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and text.count("CheckpointError:") == 1 and "Traceback" not in text, text[-3000:]


def test_the_cpu_op_is_not_rebuilt_between_an_activated_and_a_plain_shell(tmp_path):
    """Built once per environment (make setup): loading it from a shell with the environment activated
    and from a plain one (whose PATH holds the system's ninja first) runs no build step: ninja's log,
    which records every build, is unchanged."""
    from engine.loop.ops import extensions_dir

    log = extensions_dir() / "deepspeed_shm_comm" / ".ninja_log"
    venv_bin = str(Path(sys.executable).parent)
    load = "from engine.loop.ops import build_cpu_ops, use_environment_cache; use_environment_cache(); build_cpu_ops()"
    base = {k: v for k, v in cpu_env().items() if k not in ("PATH", "VIRTUAL_ENV", "TORCH_EXTENSIONS_DIR")}
    activated = {**base, "PATH": f"{venv_bin}:/usr/bin:/bin", "VIRTUAL_ENV": str(Path(venv_bin).parent)}
    plain = {**base, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", load], cwd=ROOT, env=activated, check=True, capture_output=True)
    before = log.read_text()
    for env in (plain, activated, plain):
        proc = subprocess.run([sys.executable, "-c", load], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert log.read_text() == before, "the op was rebuilt"


def test_a_finished_run_answers_without_a_launch(pixel_run, demo_shards, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(pixel_run, run)
    p = launch(tmp_path, demo_shards, str(run), 6, "--gpus", "2")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "run already complete: step 6 of 6" in out, err
    assert "deepspeed" not in err.lower()  # no launcher was started


ENTRY_POINTS = [
    "engine.pretrain",
    "engine.finetune",
    "engine.tools.export",
    "engine.tools.evaluate",
    "engine.tools.teacher_tools",
    "engine.loop.ops",
    "data_pipeline.make_shards",
    "data_pipeline.index_shards",
    "engine.tools.launch_plan",
    "data_pipeline.verify",
    "data_pipeline.stats",
    "data_pipeline.demo_data",
    "bench.model_step",
    "bench.data_pipeline",
    "bench.shard_writer",
    "bench.gpu_decode",
    "bench.end_to_end",
    "bench.profile_step",
    "bench.report",
    "bench.checkpoint",
    "bench.host_path",
    "engine.tools.goodput",
    "experiments.digits_probe",
]


def unexplained_options(help_text: str) -> list[str]:
    """Options in an argparse help text that have no explanation after them."""
    lines = help_text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-{1,2}[\w-]+(?:[ ,=][^ ].*?)?)(?:  +(\S.*))?$", line)
        if not m or m.group(1).startswith(("-h, --help",)):
            continue
        explained = m.group(2) or (i + 1 < len(lines) and re.match(r"^ {6,}\S", lines[i + 1]))
        if not explained:
            bad.append(line.strip())
    return bad


HEAVY = {"torch", "deepspeed", "nvidia.dali", "timm", "pyarrow"}


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_answers_help_at_once_with_every_flag_explained(module):
    """--help answers before the heavy imports (none of torch, DeepSpeed, DALI, timm is loaded:
    read from the interpreter's own import log, not from a clock) and explains every flag."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & HEAVY, f"{module} --help imports {sorted(imported & HEAVY)}"
    assert not unexplained_options(proc.stdout), unexplained_options(proc.stdout)
    description = proc.stdout.split("\n\n")[1].strip()
    assert description.endswith((".", ")")), f"cut description: {description!r}"


def test_launcher_script_help():
    proc = subprocess.run(["bash", "launchers/pretrain.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--hostfile" in proc.stdout and "--master-port" in proc.stdout
    last = proc.stdout.rstrip().splitlines()[-1]
    assert "set -" not in proc.stdout and last.endswith("."), last  # the comment block, and nothing after it


def test_installed_commands_work_from_any_folder(demo_shards, tmp_path):
    """The deepmim-* commands of the environment, run from a folder outside the checkout, with a path
    relative to that folder."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "deepmim-stats").exists():
        pytest.fail("the project is not installed into this environment: run make setup (pip install -e .)")
    (tmp_path / "shards").symlink_to(demo_shards)
    for cmd, says in (("deepmim-stats", "72 samples"), ("deepmim-verify", "all shards verified")):
        proc = subprocess.run([str(bin_dir / cmd), "shards"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and says in proc.stdout + proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([str(bin_dir / "deepmim-pretrain"), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "--hostfile" in proc.stdout
