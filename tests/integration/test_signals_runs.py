"""Stops the way terminals, schedulers and service managers send them, to launchers/pretrain.sh:
one Ctrl-C in a terminal, a signal while the ranks are still starting, a SIGTERM to the whole
process group in the middle of a save longer than DeepSpeed's own 30 s grace; and a compiled
(inductor) run that exits after finishing and after a preemption."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from engine.run_folder.checkpoints import MARKER, list_checkpoints
from tests.conftest import ROOT, cpu_env, free_port, start_job
from tests.helpers import wait_for

pytestmark = pytest.mark.launcher


def run_args(run: Path, shards: Path, steps: int, *sets: str) -> list[str]:
    base = [f"data.shards={shards}", f"schedule.max_steps={steps}", "log.reconstructions=false", *sets]
    return ["--preset", "deepmim_test_pixel", "--run-dir", str(run), *[a for s in base for a in ("--set", s)]]


def launcher(run: Path, shards: Path, steps: int, *sets: str) -> list[str]:
    return [
        "bash",
        "launchers/pretrain.sh",
        "--gpus",
        "2",
        "--master-port",
        str(free_port()),
        "--",
        *run_args(run, shards, steps, *sets),
    ]


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


class Terminal:
    """A command whose controlling terminal is a pseudo-terminal we type into, as a user's shell."""

    def __init__(self, cmd: list[str]):
        master, slave = pty.openpty()

        def become_terminal_session() -> None:
            # a terminal's foreground job has Ctrl-C's default disposition; a suite started from a
            # background job (`make test &`) hands its children SIGINT ignored, which bash cannot trap
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**cpu_env(), "TERM": "xterm"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            preexec_fn=become_terminal_session,
            close_fds=True,
        )
        os.close(slave)
        self.master, self.chunks = master, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data)

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")  # the terminal sends SIGINT to its foreground process group

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        os.close(self.master)
        return code, b"".join(self.chunks).decode(errors="replace")


def test_one_ctrl_c_in_a_terminal_saves_and_exits_zero(demo_shards, tmp_path):
    """The terminal's SIGINT reaches the script's process group; the ranks get it once (not twice,
    not from DeepSpeed's launcher), save and exit 0. The progress bar shows on a terminal."""
    run = tmp_path / "run"
    term = Terminal(
        # 300 steps need a schedule that long (the test preset's is 18 steps: the run could end on its
        # own before the signal was passed on)
        launcher(
            run,
            demo_shards,
            300,
            "debug.step_sleep_s=0.3",
            "checkpoint.interval=1000",
            "log.interval=2",
            "schedule.epochs=50",
        )
    )
    wait_for(lambda: logged_steps(run) >= 2)
    term.ctrl_c()
    code, out = term.wait()
    assert code == 0, out[-3000:]
    assert (run / "PREEMPTED").is_file(), out[-4000:]
    assert (run / "PREEMPTED").is_file(), out[-4000:]
    stopped = int((run / "PREEMPTED").read_text())
    assert stopped >= 4 and (run / "checkpoints" / f"step_{stopped:08d}" / MARKER).is_file()
    assert "received SIGINT" in out and "second SIGINT" not in out and "Traceback" not in out
    assert "step/s" in out or "s/step" in out  # tqdm's bar, drawn because stderr is a terminal


def rank_processes(run: Path) -> list[int]:
    """The training processes of the run in ``run`` (they carry ``--local_rank``)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes()
        except OSError:
            continue
        if b"--local_rank" in args and str(run).encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def test_a_signal_while_the_ranks_start_is_a_clean_preemption(demo_shards, tmp_path):
    """SIGTERM a moment after launch, while the ranks import and build: passed on once their handlers
    are in place; they stop before the first step, write PREEMPTED and exit 0 (a scheduler requeues)."""
    run = tmp_path / "run"
    proc = start_job(launcher(run, demo_shards, 300), capture=True)
    wait_for(lambda: rank_processes(run), timeout=120)  # the ranks exist and are still importing
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert (run / "PREEMPTED").read_text().strip() == "0" and "nothing new to save" in out
    assert not list_checkpoints(run / "checkpoints") and logged_steps(run) == 0


def test_a_process_group_sigterm_during_a_long_save_lets_it_finish(demo_shards, tmp_path):
    """systemd or a scheduler stopping the process group: the save (held 32 s before its marker, longer
    than DeepSpeed's launcher would wait before SIGKILL) completes and the run exits 0."""
    run = tmp_path / "run"
    proc = start_job(
        launcher(
            run,
            demo_shards,
            300,
            "debug.step_sleep_s=0.3",
            "debug.pause_before_marker_s=32",
            "checkpoint.interval=1000",
            "log.interval=2",
        ),
        capture=True,
    )
    wait_for(lambda: logged_steps(run) >= 2)
    os.killpg(proc.pid, signal.SIGTERM)  # the script's whole process group, as a service manager does
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert (run / "PREEMPTED").is_file(), out[-4000:]
    stopped = int((run / "PREEMPTED").read_text())
    assert (run / "checkpoints" / f"step_{stopped:08d}" / MARKER).is_file(), out[-3000:]
    assert "checkpoint saved; exiting 0" in out


def test_a_compiled_run_with_inductor_exits_after_a_preemption_and_after_finishing(demo_shards, tmp_path):
    """torch.compile's default backend keeps compile threads and worker processes; the run still
    exits at once, preempted (exit 0, PREEMPTED) and when complete."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "engine.pretrain",
        *run_args(run, demo_shards, 12, "engine.compile=true", "log.interval=1", "checkpoint.interval=100"),
    ]
    proc = subprocess.Popen(
        [*cmd, "--set", "debug.step_sleep_s=0.5"],
        cwd=ROOT,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: logged_steps(run) >= 2, timeout=400)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)  # a hang fails here
    assert proc.returncode == 0 and "stopped by a signal" in out, out[-3000:]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] >= 2
    assert "blocks compiled (backend inductor" in out and (run / "PREEMPTED").is_file()
    done = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0 and "'complete': True" in done.stdout + done.stderr, done.stderr[-3000:]
