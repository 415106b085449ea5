"""Commands as a user types them: help texts, the launcher script's ports, paths and hostfile, and
start-up errors that come at once."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cpu_env

ENTRY_POINTS = [
    "engine.pretrain", "engine.finetune", "engine.tools.export", "engine.tools.evaluate", "engine.tools.teacher_tools",
    "engine.loop.ops", "data_pipeline.make_shards", "data_pipeline.verify", "data_pipeline.stats",
    "data_pipeline.demo_data", "bench.model_step", "bench.data_pipeline", "bench.shard_writer", "bench.gpu_decode",
    "bench.end_to_end", "bench.profile_step", "bench.report", "experiments.digits_probe",
]  # fmt: skip


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


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_answers_help_at_once_with_every_flag_explained(module):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=cpu_env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    seconds = time.monotonic() - t0
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    assert seconds < 1.0, f"{module} --help took {seconds:.2f} s"
    assert not unexplained_options(proc.stdout), unexplained_options(proc.stdout)
    description = proc.stdout.split("\n\n")[1].strip()
    assert description.endswith((".", ")")), f"cut description: {description!r}"


def test_launcher_script_help():
    proc = subprocess.run(["bash", "launchers/pretrain.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--hostfile" in proc.stdout and "--master-port" in proc.stdout


def launch(cwd: Path, shards: Path, run_dir: str, steps: int, *opts: str, **kw) -> subprocess.Popen:
    cmd = ["bash", str(ROOT / "launchers" / "pretrain.sh"), *opts, "--", "--preset", "deepmim_test_pixel",
           "--run-dir", run_dir, "--set", f"data.shards={shards}", "--set", f"schedule.max_steps={steps}",
           "--set", "log.reconstructions=false"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=cwd, env=cpu_env(**kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.launcher
def test_two_runs_at_once_from_another_folder_with_relative_run_dirs(demo_shards, tmp_path):
    """Started together without ports, from a folder outside the checkout: both get their own port,
    neither waits, and each run folder is where the user's relative path says (one process each:
    what matters here is the launcher, twice at once)."""
    t0 = time.monotonic()
    procs = [launch(tmp_path, demo_shards, f"runs/r{i}", 3, "--gpus", "1") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert time.monotonic() - t0 < 150
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
        t0 = time.monotonic()
        p = launch(tmp_path, demo_shards, "runs/x", 2, "--gpus", "2", "--master-port", str(port))
        _out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and f"port {port} is in use" in err and err.count("\n") == 1, err
    assert time.monotonic() - t0 < 15


def test_wrong_shard_path_is_one_line_at_once(tmp_path):
    t0 = time.monotonic()
    p = launch(tmp_path, tmp_path / "no_such_shards", "runs/x", 2, "--gpus", "2")
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.count("\n") == 1, err
    assert f"data.shards='{tmp_path / 'no_such_shards'}'" in err and "make_shards" in err
    assert time.monotonic() - t0 < 15 and not (tmp_path / "runs").exists()


@pytest.mark.launcher
def test_documented_no_ssh_two_node_command_runs_a_world_of_two(demo_shards, tmp_path):
    """docs/launching.md's command, on every "node" of a two-line hostfile (slots=1 each), as written
    but for K and the local master address: the hostfile's slots decide the world size (2, not 4)."""
    doc = (ROOT / "docs" / "launching.md").read_text()
    documented = re.search(r"launchers/pretrain.sh --hostfile hostfile --no-ssh --node-rank K --master-addr node0 "
                           r"--master-port 29500 -- \\", doc)  # fmt: skip
    assert documented, "the documented command changed: update this test"
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    procs = [launch(tmp_path, demo_shards, "runs/two", 2, "--hostfile", "hostfile", "--no-ssh", "--node-rank", str(k),
                    "--master-addr", "127.0.0.1", "--master-port", str(port)) for k in (0, 1)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    text = "".join(o + e for o, e in outs)
    assert "2 ranks x micro-batch 4" in text


def test_digits_experiment_progress_counts_only_stages_that_ran(capsys, monkeypatch):
    """Stages reused from an earlier run take no time and must not shrink the estimate."""
    from experiments import digits_probe

    clock = iter([0.0, 0.0, 600.0, 660.0])
    monkeypatch.setattr(digits_probe.time, "time", lambda: next(clock))
    p = digits_probe.Progress({"pretrain": 2, "probe": 2})
    p.step("pretrain", "cached pretraining", ran=False)
    p.step("pretrain", "pretrained", ran=True)  # 10 min
    p.step("probe", "probed", ran=True)  # 1 min
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("(0.0 min so far, reused from an earlier run)")
    assert lines[1] == "[2/4] pretrained (10.0 min so far, about 20 min left)"  # 2 probes, none timed yet: 10 min each
    assert lines[2] == "[3/4] probed (11.0 min so far, about 1 min left)"
