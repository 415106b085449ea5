"""The benchmark harness runs on CPU (dry run) and writes the JSON the README tables come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.report import render
from tests.conftest import ROOT, cpu_env


def test_gpu_check_dry_run_writes_json(tmp_path):
    home = tmp_path / "home"  # torch's default extension cache is ~/.cache/torch_extensions
    env = cpu_env(OUT=str(tmp_path), HOME=str(home))
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU op comes from the environment's build (make setup), not a second one per user
    assert not (home / ".cache" / "torch_extensions").exists()
    step = json.loads((tmp_path / "model_step_dryrun.json").read_text())
    assert step["device"].startswith("cpu") and step["versions"]["torch"] and step["precision"]
    configs = {(r["config"], r["engine"]) for r in step["results"] if r["status"] == "ok"}
    assert {
        ("reference", "plain"),
        ("fused-split", "plain"),
        ("fused-split-mathattn-fp8", "plain"),
        ("fused-split", "deepspeed"),
        ("fused-split", "deepspeed no-overlap"),
    } <= configs
    assert any("vs reference" in k for k in step["ratios"])
    # a ratio pairs rows of one invocation: the appended DeepSpeed variant with the plain step measured beside it
    ds = next(r for r in step["results"] if r["engine"] == "deepspeed no-overlap")
    plain = next(
        r for r in step["results"] if r["engine"] == "plain" and r["config"] == "fused-split" and r["run"] == ds["run"]
    )
    assert ds["run"] == 2 and {r["run"] for r in step["results"]} == {1, 2}
    key = "deepmim_vit_test_patch4/clip/fused-split deepspeed no-overlap step time / plain"
    assert step["ratios"][key] == plain["img_per_s"] / ds["img_per_s"]
    for r in step["results"]:
        assert r["batch"] == 8 and r["img_per_s"] > 0 and r["gflop_per_img"] > 0
    data = json.loads((tmp_path / "data_dryrun.json").read_text())
    assert {r["loader"] for r in data["results"]} == {"dali", "torch"} and all(
        r["img_per_s"] > 0 for r in data["results"]
    )
    table = render([str(tmp_path / "model_step_dryrun.json"), str(tmp_path / "data_dryrun.json")])
    assert "| model | target | path |" in table and "fused-split-mathattn-fp8" in table


def test_data_pipeline_benchmark(tmp_path, demo_shards):
    out = tmp_path / "dp.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.data_pipeline",
            "--shards",
            str(demo_shards),
            "--threads",
            "1",
            "--batch",
            "8",
            "--batches",
            "3",
            "--img-size",
            "32",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert {r["loader"] for r in d["results"]} == {"dali", "torch"}
    assert all(r["img_per_s"] > 0 and r["images"] == 24 for r in d["results"])
    assert "dali/torch at 1 threads" in d["ratios"]


def test_committed_results_render():
    """The committed JSON files parse and name their device: the GPU runs an H100, the data-plan and
    object-storage files (measured on CPU) the CPU."""
    results = ROOT / "bench" / "results"
    files = sorted(str(p) for p in results.glob("*.json"))
    assert files, "no committed benchmark results"
    for f in files:
        device = json.loads(Path(f).read_text())["device"]
        assert ("cpu" in device) if f.endswith("_cpu.json") else ("H100" in device), (f, device)
    table = render(files)
    assert "H100" in table and "Epoch plan of one rank" in table and "Local shards vs object storage" in table
    assert os.path.exists(results / "README.md")


def test_data_plan_benchmark(tmp_path):
    """Small sizes: both orders produce a rank's first batch; the global order above its limit is reported."""
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "bench.data_plan", "--sizes", "20000,300000", "--ranks", "8", "--shard-size", "500"]
    cmd += ["--exclusions", "100", "--global-limit", "100000", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["order"], r["samples"]): r for r in json.loads(out.read_text())["results"]}
    assert rows[("global", 300000)]["status"] == "not run" and "GB per rank" in rows[("global", 300000)]["note"]
    for key in (("global", 20000), ("block", 20000), ("block", 300000)):
        r = rows[key]
        assert r["status"] == "ok" and r["plan_s"] > 0 and r["rank_rows_left"] > 0 and 0 <= r["first_row"] < key[1]
    assert "Epoch plan of one rank" in render([str(out)])


def test_data_remote_benchmark(tmp_path):
    """Local shards, a cold and a warm cache of a local S3-compatible server: every setting reads the epoch."""
    out = tmp_path / "remote.json"
    cmd = [sys.executable, "-m", "bench.data_remote", "--per-class", "6", "--batch", "8", "--img-size", "32"]
    cmd += ["--step-ms", "5", "--shard-size-mb", "0.3", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    got = {(r["setting"], r["step_ms"]): r for r in d["results"]}
    assert set(got) == {(s, m) for s in ("local", "s3-cold", "s3-warm") for m in (0.0, 5.0)}
    assert all(r["images"] == d["images_per_epoch"] > 0 for r in got.values())
    assert got[("s3-cold", 5.0)]["fetched_mb"] > 0 and got[("s3-warm", 5.0)]["fetched_mb"] == 0


def test_data_meta_benchmark(tmp_path):
    """A node's metadata at scale stays near what its ranks read; the measured fetch equals the plan's."""
    out = tmp_path / "meta.json"
    cmd = [sys.executable, "-m", "bench.data_meta", "--samples", "2e7", "--measured-shards", "6", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    s, m = d["at_scale"], d["measured"]
    assert 1.0 <= s["ratio_to_read"] < 2.0 and s["whole_columns_gb"] > 10 * s["node_metadata_gb"]
    assert m["bytes_fetched"] == m["bytes_predicted_by_plan"] < m["bytes_whole_columns"]


def test_checkpoint_benchmark(tmp_path, demo_shards):
    """The save benchmark's three ways on 2 ranks, the restart's two start-ups and the goodput of a run
    killed after a checkpoint (the test preset: the code paths, not the numbers)."""
    out = tmp_path / "ckpt.json"
    cmd = [sys.executable, "-m", "bench.checkpoint", "--models", "tiny", "--repeats", "1", "--restart", "tiny"]
    cmd += ["--goodput", "--goodput-preset", "deepmim_test_pixel", "--shards", str(demo_shards), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert sorted(r["mode"] for r in d["results"]) == ["async", "before", "sync"]
    assert all(r["blocking_s"] > 0 and r["checkpoint_gb"] > 0 for r in d["results"])
    assert set(d["ratios"]) == {"tiny sync / before", "tiny async / before"} and d["resume"][0]["verified"]
    r = d["restart"]
    assert r["fresh_startup_s"] > 0 and "checkpoint load" in r["resume_parts"]
    g = d["goodput"]
    assert g["killed_exit"] == -9 and g["summary"]["attempts"] == 2 and g["summary"]["steps_redone"] >= 1
    assert [a["outcome"] for a in g["attempts"]] == ["running", "done"]
    assert 0 < g["summary"]["goodput"] < 1
