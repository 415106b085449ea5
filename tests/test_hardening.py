"""Hostile and unlucky inputs: no code runs from weight files, bad data never loops, damaged
checkpoints are stepped over, one job per run folder, no orphans, no silent stall, bad values named."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.loop.checkpoint import MARKER, list_checkpoints
from tests.conftest import ROOT, cpu_env, deepspeed_cmd, run_deepspeed, run_single

MARK = "payload-ran"


class Payload:
    """Pickles to a call that creates a marker file when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def base(run: Path, shards: Path, steps: int, *extra: str) -> list[str]:
    return ["--preset", "deepmim_test_pixel", "--run-dir", str(run), "--set", f"data.shards={shards}",
            "--set", f"schedule.max_steps={steps}", "--set", "log.reconstructions=false", *extra]  # fmt: skip


def text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


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


# ------------------------------------------------------------------ no code from weight files


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
    proc = subprocess.run([sys.executable, "-m", "engine.tools.export", str(tmp_path / "run"), str(tmp_path / "out")],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and str(f) in text(proc) and "refused" in text(proc), text(proc)[-2000:]
    assert not marker.exists() and not (tmp_path / "out" / "encoder.safetensors").exists()


def openai_visual_module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module tree whose parameter names are the keys of an OpenAI CLIP state dict."""

    class Root(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Root()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


def test_torchscript_clip_is_read_without_running_it(tmp_path):
    from engine.targets.teachers import ClipArch, TeacherError, load_clip_teacher
    from engine.tools.teacher_tools import random_openai_clip

    arch = ClipArch(width=64, layers=2, patch=4, grid=4, out_dim=24)
    sd = random_openai_clip(arch, seed=3, with_text_tower=False)
    archive = tmp_path / "ViT-test.pt"
    torch.jit.save(torch.jit.script(openai_visual_module(sd)), str(archive))
    torch.save(sd, tmp_path / "plain.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_clip_teacher(archive)(x), load_clip_teacher(tmp_path / "plain.pt")(x))

    # the same archive with a pickle payload in place of its data: refused, nothing runs
    marker = tmp_path / MARK
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(
                item, pickle.dumps(Payload(marker), protocol=2) if item.filename.endswith("/data.pkl") else data
            )
    with pytest.raises(TeacherError) as err:
        load_clip_teacher(evil)
    assert str(evil) in str(err.value) and "os" in str(err.value) and not marker.exists()


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


def test_our_checkpoints_are_plain_data(small_run):
    """Everything a run writes loads with weights_only=True and only DeepSpeed's three classes."""
    from engine.serialization import safe_load

    ck = list_checkpoints(small_run / "checkpoints")[-1]
    for f in ck.glob("*.pt"):
        assert safe_load(f) is not None


# ------------------------------------------------------------------ data correctness


@pytest.mark.launcher
def test_micro_batch_change_on_resume_reads_every_sample_once_per_epoch(demo_shards, tmp_path):
    """2 ranks, global batch 8: micro-batch 4 for 4 steps, then micro-batch 2 (accumulation 2) to the
    end of the second epoch. Each epoch (9 steps) every one of the 72 samples is read once."""
    run = tmp_path / "run"
    keys = ("--set", "log.sample_keys=true", "--set", "checkpoint.interval=4")
    run_deepspeed(2, *base(run, demo_shards, 4, *keys))
    out = run_deepspeed(2, *base(run, demo_shards, 18, *keys, "--set", "data.micro_batch=2"))
    assert "resuming with a changed setting: data.micro_batch: 4 -> 2" in text(out)
    per_step: dict[int, list[str]] = {}
    for f in (run / "sample_keys").glob("rank*.tsv"):
        for line in f.read_text().splitlines():
            step, _micro, ks = line.split("\t")
            per_step.setdefault(int(step), []).extend(ks.split(","))
    assert sorted(per_step) == list(range(1, 19))
    for epoch in (range(1, 10), range(10, 19)):
        seen = [k for s in epoch for k in per_step[s]]
        assert len(seen) == len(set(seen)) == 72


def test_index_and_manifest_disagreeing_with_the_tar_are_named(demo_shards, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline import preflight
    from data_pipeline.loader import read_dataset
    from data_pipeline.wds_index import read_index, write_index

    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    info = read_dataset(root)
    a, b = info.shards[0], info.shards[1]
    entries = read_index(root / f"{a}.idx")
    write_index(root / f"{a}.idx", entries[:-2])  # the index lists fewer samples than the tar holds
    t = pq.read_table(root / "manifest.parquet").to_pylist()
    phantom = dict(next(r for r in t if r["shard"] == b), key="phantom_sample", offset=10**6)
    pq.write_table(pa.Table.from_pylist([*t, phantom]), root / "manifest.parquet")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "num_samples": meta["num_samples"] + 1}))
    info = read_dataset(root)
    with caplog.at_level("WARNING"):
        view = preflight.run(info, "markers", tmp_path / "view", 0, 1, lambda x: [x], lambda: None)
    log = caplog.text
    assert f"shard {a}: the manifest lists {info.shard_size(a)} samples, the index {info.shard_size(a) - 2}" in log
    assert f"shard {b}: the manifest lists {info.shard_size(b)} samples, the index {info.shard_size(b) - 1}" in log
    bad = json.loads((tmp_path / "view" / "bad_samples.json").read_text())
    assert [(x["shard"], x["key"]) for x in bad] == [(b, "phantom_sample")] and view.num_samples == 72


def corrupt_header(root: Path, shard: str, which: int = 0) -> str:
    """Zero a JPEG's frame size: SOI and EOI markers stay, so the cheap start-up check passes, but
    no decoder (DALI's or PIL's) can decode it."""
    from data_pipeline.wds_index import read_index

    s = read_index(root / f"{shard}.idx")[which]
    jpg = s.component("jpg")
    with open(root / f"{shard}.tar", "r+b") as f:
        f.seek(jpg.offset)
        data = bytearray(f.read(jpg.size))
        i = data.find(b"\xff\xc0")
        data[i + 5 : i + 9] = b"\0\0\0\0"
        f.seek(jpg.offset)
        f.write(bytes(data))
    return s.key


@pytest.mark.launcher
def test_undecodable_jpeg_is_named_recorded_and_skipped_next_time(demo_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    names = json.loads((shards / "dataset.json").read_text())["shards"]
    key = corrupt_header(shards, names[1])
    run = tmp_path / "run"
    opts = ("--set", "fault.max_bad_sample_share=0.05", "--set", "checkpoint.interval=2")
    first = run_deepspeed(2, *base(run, shards, 18, *opts), check=False)
    assert first.returncode == 2 and f"{names[1]}/{key}" in text(first) and "restart the run" in text(first)
    recorded = [json.loads(p.read_text()) for p in (run / "data_view").glob("runtime_bad_rank*.json")]
    assert [r["key"] for part in recorded for r in part] == [f"{names[1]}/{key}"]
    second = run_deepspeed(2, *base(run, shards, 18, *opts))  # no second crash: the sample is skipped
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    derived = json.loads((run / "config.json").read_text())["derived"]
    assert derived["num_samples"] == 71 and rows[-1]["step"] == derived["stop_step"] and rows[-1]["bad_samples"] == 1
    assert "failed at run time" in (run / "data_view" / "bad_samples.json").read_text() and "resumed" in text(second)


# ------------------------------------------------------------------ checkpoints and run folders


@pytest.mark.launcher
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(demo_shards, tmp_path):
    run = tmp_path / "run"
    first = run_single(*base(run, demo_shards, 4, "--set", "checkpoint.interval=2"))
    assert first.returncode == 0, text(first)[-2000:]
    victim = run / "checkpoints" / "step_00000004" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    out = run_single(*base(run, demo_shards, 6, "--set", "checkpoint.interval=2"))
    t = text(out)
    assert out.returncode == 0, t[-2000:]
    assert "step_00000004 is damaged" in t and victim.name in t and "resumed from" in t and "step_00000002" in t
    assert (run / "checkpoints" / "broken-step_00000004").is_dir()
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == "step_00000006"


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


def wait_for(cond, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.1)


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
        proc = subprocess.Popen(deepspeed_cmd(2, *base(run, demo_shards, 300, *slow)), cwd=ROOT, env=cpu_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
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


@pytest.mark.launcher
def test_watchdog_names_a_stalled_rank_and_exits(demo_shards, tmp_path):
    run = tmp_path / "run"
    opts = ("--set", "fault.stall_min_s=1", "--set", "fault.stall_factor=3", "--set", "fault.stall_exit_s=8",
            "--set", "fault.heartbeat_s=1",
            "--set", "checkpoint.interval=2", "--set", "debug.step_sleep_s=0.1",
            "--set", "schedule.epochs=50")  # fmt: skip
    cmd = deepspeed_cmd(2, *base(run, demo_shards, 300, *opts))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: started(run, 6))
        ranks = [[p for p in running(run) if f"--local_rank={r}".encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
                 for r in (0, 1)]  # fmt: skip
        rank0, rank1 = ranks
        assert len(rank0) == len(rank1) == 1
        os.kill(rank1[0], signal.SIGSTOP)
        lines = []
        for line in proc.stdout:  # until rank 0's watchdog gives up ...
            lines.append(line)
            if "exiting with code 4" in line:
                break
        wait_for(lambda: not Path(f"/proc/{rank0[0]}").exists(), timeout=30)
        time.sleep(2)  # the launcher polls once a second: let it see rank 0's exit code first
        os.kill(rank1[0], signal.SIGKILL)  # ... then spare DeepSpeed's launcher its 30 s wait for a stopped process
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        for pid in running(run):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 4, out[-3000:]
    assert "watchdog: rank 0 has waited" in out and f"rank 1 (pid {rank1[0]}" in out and "is silent" in out
    assert "exiting with code 4" in out
    assert list_checkpoints(run / "checkpoints")  # the last complete checkpoint is still there


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("schedule.min_lr=-1", "schedule.min_lr"),
        ("mask.ratio=0.95", "mask.ratio"),
        ("mask.ratio=1.0", "mask.ratio"),
        ("debug.flag_lag=9", "debug.flag_lag"),
        ("optim.eps=-1", "optim.eps"),
        ("model.img_size=-16", "model.img_size"),
        ("model.img_size=18", "model.img_size"),
        ("seed=-3", "seed"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.base_lr=nan", "optim.base_lr"),
        ("data.decode_device=gpu", "data.decode_device"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(demo_shards, override, field):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "engine.pretrain", *base(Path("/tmp/unused"), demo_shards, 2),
                           "--set", override], cwd=ROOT, env=cpu_env(), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("config error: ") and field in proc.stderr
    assert time.monotonic() - t0 < 10  # before any work


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
    code = (f"import re, sys; from data_pipeline.make_shards import main; rc = main([{str(src.parent)!r}, "
            f"{str(out)!r}, '--workers', '1', '--no-progress', '--max-pixels', '2000000']); "
            "print('PEAK_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "sys.exit(rc)")  # fmt: skip
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


def test_verify_and_stats_report_problems_without_tracebacks(demo_shards, tmp_path):
    from tests.test_faults_unit import truncate_tar

    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    name = json.loads((root / "dataset.json").read_text())["shards"][0]
    truncate_tar(root, name, keep_samples=2)
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.verify", str(root)], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and name in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.stats", str(empty)], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "manifest.parquet is missing" in proc.stderr


def test_shard_names_must_be_plain_file_names(demo_shards, tmp_path):
    from data_pipeline.loader import DataError, read_dataset

    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["shards"][0] = "../escape"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="not a plain file name"):
        read_dataset(root)
