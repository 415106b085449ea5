"""Hostile and unlucky inputs under real launches: no code runs from weight files, one job per run
folder, no orphans, no silent stall."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.run_folder.checkpoints import MARKER, list_checkpoints
from tests.conftest import ROOT, cpu_env, deepspeed_cmd, run_deepspeed, run_single, start_job
from tests.helpers import MARK, Payload, text, wait_for


def base(run: Path, shards: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--preset",
        "deepmim_test_pixel",
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={shards}",
        "--set",
        f"schedule.max_steps={steps}",
        "--set",
        "log.reconstructions=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def small_run(demo_shards, tmp_path_factory) -> Path:
    """Two steps in a world of one: a real run folder with a checkpoint to tamper with."""
    run = tmp_path_factory.mktemp("small") / "run"
    proc = run_single(*base(run, demo_shards, 2, "--set", "checkpoint.interval=2"))
    assert proc.returncode == 0, text(proc)[-3000:]
    return run


def poisoned_copy(run: Path, dst: Path, marker: Path) -> Path:
    """The run with a pickle payload inside its model-states file, marker kept intact."""
    shutil.copytree(run, dst)
    f = list_checkpoints(dst / "checkpoints")[-1] / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=False)  # the test's own file: trusted here, on purpose
    state["extra"] = Payload(marker)
    torch.save(state, f)
    marker_json = f.parent / MARKER
    info = json.loads(marker_json.read_text())
    info.pop("files", None)  # as if written by an older version: nothing to verify against
    marker_json.write_text(json.dumps(info))
    return f


def test_generator_run_folder_with_a_payload_is_refused(small_run, tmp_path):
    from engine.targets.teachers import TeacherError, load_generator

    marker = tmp_path / MARK
    f = poisoned_copy(small_run, tmp_path / "run", marker)
    with pytest.raises(TeacherError) as err:
        load_generator(tmp_path / "run", 16)
    assert str(f) in str(err.value) and "refused" in str(err.value) and "posix.system" in str(err.value)
    assert not marker.exists()


@pytest.mark.launcher
def test_resume_from_a_checkpoint_with_a_payload_is_refused(small_run, demo_shards, tmp_path):
    marker = tmp_path / MARK
    f = poisoned_copy(small_run, tmp_path / "run", marker)
    proc = run_single(*base(tmp_path / "run", demo_shards, 4, "--resume", str(f.parent)))
    assert proc.returncode == 2, text(proc)[-3000:]
    assert "UnsafeFileError" in text(proc) and str(f) in text(proc)
    assert not marker.exists()


def test_export_of_a_run_with_a_payload_is_refused(small_run, tmp_path):
    marker = tmp_path / MARK
    f = poisoned_copy(small_run, tmp_path / "run", marker)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.tools.export", str(tmp_path / "run"), str(tmp_path / "out")],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and str(f) in text(proc) and "refused" in text(proc), text(proc)[-2000:]
    assert not marker.exists() and not (tmp_path / "out" / "model.safetensors").exists()


def test_our_checkpoints_are_plain_data(small_run):
    """Everything a run writes loads with weights_only=True and only DeepSpeed's three classes."""
    from engine.weights.safe_load import safe_load

    ck = list_checkpoints(small_run / "checkpoints")[-1]
    for f in ck.glob("*.pt"):
        assert safe_load(f) is not None


def running(run: Path) -> list[int]:
    """Pids of the processes whose command line names this run folder."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(run) in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def started(run: Path, steps: int) -> bool:
    m = run / "metrics.jsonl"
    return m.is_file() and len(m.read_text().splitlines()) >= steps


@pytest.mark.launcher
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_second_job_is_refused_and_a_signal_to_the_runner_stops_every_rank(demo_shards, tmp_path, sig):
    """A 2-rank job under the `deepspeed` runner: a second job on its run folder is refused while it
    runs; SIGTERM or SIGINT to the runner alone (as `kill <pid>` or Ctrl-C on it would) stops every
    rank the clean way (save, PREEMPTED), and the run folder is free again."""
    from engine.loop.runlock import RunLock

    run = tmp_path / "run"
    slow = ("--set", "debug.step_sleep_s=0.3", "--set", "schedule.epochs=50")
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        # A shell started in the background hands its jobs SIGINT ignored (and Python then installs
        # no Ctrl-C handler): give the runner the default disposition a terminal's foreground job has.
        proc = subprocess.Popen(
            deepspeed_cmd(2, *base(run, demo_shards, 300, *slow)),
            cwd=ROOT,
            env=cpu_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        wait_for(lambda: started(run, 2))
        if sig == signal.SIGTERM:
            second = run_single(*base(run, demo_shards, 300))  # the lock is rank 0's: one process shows it
            assert second.returncode == 2 and "RunFolderBusy" in text(second)
            assert "is in use by another job (pid " in text(second) and str(run) in text(second)
        proc.send_signal(sig)
        wait_for(lambda: not running(run), timeout=120)
    finally:
        for pid in running(run):
            os.kill(pid, signal.SIGKILL)
    assert (run / "PREEMPTED").is_file(), log.read_text()[-4000:]
    stopped = int((run / "PREEMPTED").read_text())
    assert (run / "checkpoints" / f"step_{stopped:08d}" / MARKER).is_file()
    lock = RunLock(run)
    lock.acquire()
    lock.release()


@pytest.mark.launcher
def test_watchdog_names_a_stalled_rank_and_exits(demo_shards, tmp_path):
    run = tmp_path / "run"
    opts = (
        "--set",
        "fault.stall_min_s=1",
        "--set",
        "fault.stall_factor=3",
        "--set",
        "fault.stall_exit_s=8",
        "--set",
        "fault.heartbeat_s=1",
        "--set",
        "checkpoint.interval=2",
        "--set",
        "debug.step_sleep_s=0.1",
        "--set",
        "schedule.epochs=50",
    )
    cmd = deepspeed_cmd(2, *base(run, demo_shards, 300, *opts))
    proc = start_job(cmd, capture=True)
    try:
        wait_for(lambda: started(run, 6))
        ranks = [
            [p for p in running(run) if f"--local_rank={r}".encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
            for r in (0, 1)
        ]
        rank0, rank1 = ranks
        assert len(rank0) == len(rank1) == 1
        os.kill(rank1[0], signal.SIGSTOP)
        lines = []
        for line in proc.stdout:  # until rank 0's watchdog gives up ...
            lines.append(line)
            if "exiting with code 4" in line:
                break
        for line in proc.stdout:  # the launcher has seen rank 0's exit code (it now stops the others) ...
            lines.append(line)
            if "Killing subprocess" in line:
                break
        os.kill(rank1[0], signal.SIGKILL)  # ... then spare DeepSpeed's launcher its 30 s wait for a stopped process
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        for pid in running(run):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 4, out[-3000:]
    assert "watchdog: rank 0 has waited" in out and f"rank 1 (pid {rank1[0]}" in out and "is silent" in out
    assert "exiting with code 4" in out
    assert list_checkpoints(run / "checkpoints")  # the last complete checkpoint is still there


def test_a_stop_on_one_rank_is_one_line(demo_tree, tmp_path):
    """A JPEG that passes the start-up checks but does not decode, in rank 1's share: rank 1 records it and
    says so in one line; rank 0, whose next collective fails because rank 1 left, says nothing more (no
    'Connection closed by peer' traceback) and ends with the same exit code."""
    from data_pipeline.dataset.table import read_table
    from data_pipeline.order.global_order import epoch_permutation
    from data_pipeline.order.phases import rank_range
    from tests.conftest import make_shards
    from tests.helpers import corrupt_header

    shards = tmp_path / "shards"
    make_shards(demo_tree, shards, "--shard-size-mb", "0.03")
    table = read_table(shards)
    row = int(epoch_permutation(0, 0, len(table))[rank_range(len(table), 1, 2)[0] + 4])  # rank 1's 2nd batch
    shard = table.shards[int(table.shard_id[row])]
    corrupt_header(shards, shard, list(table.rows_of(shard)).index(row))
    proc = run_deepspeed(
        2, "--preset", "deepmim_test_pixel", "--run-dir", str(tmp_path / "run"), "--set", f"data.shards={shards}",
        "--set", "schedule.max_steps=6", check=False,
    )  # fmt: skip
    out = text(proc)
    errors = [ln for ln in out.splitlines() if " ERROR engine" in ln]
    assert proc.returncode == 2, out[-3000:]
    assert len(errors) == 1 and "[rank1]" in errors[0] and table.key(row) in errors[0], errors
    assert "Traceback" not in out and "closed by peer" not in out, out[-3000:]


def test_torchscript_with_state_code_is_refused(tmp_path):
    """A TorchScript class whose state is restored by its own code (a scripted __setstate__, which
    torch.jit.load would run): refused, and the code does not run (it would print)."""
    archive = tmp_path / "coded.pt"
    script = f"""
import torch
from typing import Tuple
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
    def forward(self, x):
        return x * self.w
    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)
    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        print("TORCHSCRIPT-CODE-RAN")
        self.w = state[0]
        self.training = state[1]
torch.jit.save(torch.jit.script(M()), {str(archive)!r})
"""
    (tmp_path / "make.py").write_text(script)  # TorchScript reads the class's source: a file, not -c
    subprocess.run([sys.executable, str(tmp_path / "make.py")], check=True, capture_output=True)
    probe = f"""
from engine.targets.teachers import TeacherError, load_clip_teacher
try:
    load_clip_teacher({str(archive)!r})
except TeacherError as err:
    print("REFUSED", err)
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    assert "REFUSED" in out.stdout and str(archive) in out.stdout and "__setstate__" in out.stdout
    assert "TORCHSCRIPT-CODE-RAN" not in out.stdout + out.stderr


def test_a_killed_jobs_run_lock_is_not_in_the_way(tmp_path):
    """The lock dies with its holder, however it dies: no stale-lock clean-up needed."""
    from engine.loop.runlock import RunFolderBusy, RunLock

    code = (
        f"from engine.loop.runlock import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
        "print('held', flush=True); import time; time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_pixel_budget_downscales_and_skips_without_exhausting_memory(tmp_path):
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    Image.new("RGB", (2000, 1500), (40, 90, 200)).save(src / "large.png")  # 3 M px: downscaled
    Image.new("1", (20000, 20000)).save(src / "huge.png")  # 400 M px, tiny file: skipped unread
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 9, 9)).save(buf, format="JPEG")
    (src / "small.jpg").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    # VmHWM: this process's own peak resident memory (ru_maxrss would carry pytest's over the exec)
    code = (
        f"import re, sys; from data_pipeline.make_shards import main; rc = main([{str(src.parent)!r}, "
        f"{str(out)!r}, '--workers', '1', '--no-progress', '--max-pixels', '2000000']); "
        "print('PEAK_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
        "sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak_gb = int(proc.stdout.split("PEAK_KB")[1].split()[0]) / 2**20
    assert peak_gb < 1.0  # decoding the 400 M px image would take 1.2 GB alone, converting it far more
    import pyarrow.parquet as pq

    rows = {r["source"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert rows["only/large.png"]["width"] * rows["only/large.png"]["height"] <= 2_000_000
    assert "2 M pixels" in rows["only/large.png"]["action"] and rows["only/small.jpg"]["action"] == "copied"
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["source"] for s in skipped] == ["only/huge.png"] and "--max-pixels" in skipped[0]["reason"]
