"""Hostile and unlucky inputs, in-process: no code runs from weight files, inconsistent shards are
named, a killed job's lock is not in the way, bad values named in one line."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, cpu_env
from tests.helpers import MARK, Payload


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


def test_index_and_manifest_disagreeing_with_the_tar_are_named(demo_shards, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.dataset.wds_index import read_index, write_index
    from data_pipeline.loaders import preflight
    from data_pipeline.loaders.source import read_dataset

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
def test_bad_values_are_one_line_errors_naming_the_field(demo_shards, tmp_path, capsys, override, field):
    from engine.pretrain import main

    run = tmp_path / "unused"
    assert main([*base(run, demo_shards, 2), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: ") and field in err, err
    assert not run.exists()  # refused before any work


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


def test_verify_and_stats_report_problems_without_tracebacks(demo_shards, tmp_path):
    from tests.helpers import truncate_tar

    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    name = json.loads((root / "dataset.json").read_text())["shards"][0]
    truncate_tar(root, name, keep_samples=2)
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.verify", str(root)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and name in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.stats", str(empty)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "manifest.parquet is missing" in proc.stderr


def test_shard_names_must_be_plain_file_names(demo_shards, tmp_path):
    from data_pipeline.loaders.source import read_dataset
    from engine.errors import DataError

    root = tmp_path / "shards"
    shutil.copytree(demo_shards, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["shards"][0] = "../escape"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="not a plain file name"):
        read_dataset(root)
