"""Commands as a user types them: the digits experiment's progress line (help texts and the installed
commands run them: tests/integration/test_operator_runs.py)."""

from __future__ import annotations


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
