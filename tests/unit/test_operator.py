"""Commands as a user types them: help texts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cpu_env

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


def test_launch_plan_reads_hostfiles_and_refuses_what_deepspeed_would_trip_on(tmp_path, capsys):
    from engine.tools.launch_plan import main

    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nnode0 slots=8\nnode1 slots=8\n")
    assert main(["--hostfile", str(hf)]) == 0 and capsys.readouterr().out.strip() == "16"
    assert main(["--hostfile", str(hf), "--gpus", "8"]) == 0  # agreeing --gpus is fine
    assert main(["--hostfile", str(hf), "--gpus", "4"]) == 2
    assert "node0 slots=8" in capsys.readouterr().err
    hf.write_text("localhost slots=1\nlocalhost slots=1\n")
    assert main(["--hostfile", str(hf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'localhost' is listed twice" in err and "docs/launching.md" in err
    hf.write_text("node0 slots=two\n")
    assert main(["--hostfile", str(hf)]) == 2 and "is not '<host> slots=<processes>'" in capsys.readouterr().err
    assert main(["--gpus", "2", "--master-addr", "no-such-host.invalid"]) == 2
    assert "does not resolve" in capsys.readouterr().err
    assert main(["--gpus", "2", "--master-addr", "127.0.0.1"]) == 0 and capsys.readouterr().out.strip() == "2"
