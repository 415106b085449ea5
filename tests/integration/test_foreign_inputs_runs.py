"""Real launches on what users bring: an img2dataset-style shard collection indexed in place, and
an official MAE weights file as the start of fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.shards.index_shards import main as index_main
from engine.models.mim import DeepMIM
from engine.models.registry import get_variant
from tests.conftest import deepspeed_cmd, run_deepspeed, start_job
from tests.helpers import kill_group, make_img2dataset, wait_for

pytestmark = pytest.mark.launcher


@pytest.fixture(scope="module")
def indexed(demo_tree, tmp_path_factory) -> Path:
    src = make_img2dataset(tmp_path_factory.mktemp("img2dataset"), demo_tree)
    out = tmp_path_factory.mktemp("index") / "train"
    assert index_main([str(src), str(out), "--label", "json:label", "--workers", "1"]) == 0
    return out


def keys_per_step(run: Path) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for f in (run / "sample_keys").glob("rank*.tsv"):
        for line in f.read_text().splitlines():
            step, _micro, ks = line.split("\t")
            steps.setdefault(int(step), []).extend(ks.split(","))
    return steps


def test_pretraining_on_indexed_shards_is_killed_and_resumes_every_key_once(indexed, tmp_path):
    """18 usable samples, 2 ranks x 4: 2 steps per epoch (16 samples, 2 left out). SIGKILL after the
    step-4 checkpoint, resume to step 8: every epoch reads 16 distinct samples, none twice."""
    run = tmp_path / "run"
    args = [
        "--preset",
        "deepmim_test_pixel",
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={indexed}",
        "--set",
        "schedule.epochs=4",
        "--set",
        "checkpoint.interval=2",
        "--set",
        "log.sample_keys=true",
        "--set",
        "log.reconstructions=false",
    ]
    proc = start_job(deepspeed_cmd(2, *args, "--set", "debug.step_sleep_s=0.3"))
    wait_for(lambda: (run / "checkpoints" / "step_00000004" / "complete.json").is_file())
    kill_group(proc)
    assert not (run / "checkpoints" / "step_00000008" / "complete.json").is_file(), "finished before the kill"
    out = run_deepspeed(2, *args)
    assert "resumed from" in out.stdout + out.stderr
    steps = keys_per_step(run)
    assert sorted(steps) == list(range(1, 9))
    for epoch in range(4):
        seen = [k for s in (2 * epoch + 1, 2 * epoch + 2) for k in steps[s]]
        assert len(seen) == len(set(seen)) == 16, (epoch, seen)


def test_fine_tuning_from_an_official_mae_file_on_indexed_shards(indexed, tmp_path):
    torch.manual_seed(0)
    mae = DeepMIM(get_variant("deepmim_vit_test_patch4"), 16, [4], 32, 2, 2, pred_dim=48)
    encoder = {k[len("encoder.") :]: v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_test.pth")
    run = tmp_path / "ft"
    out = run_deepspeed(
        2,
        "--preset",
        "finetune_test",
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={indexed}",
        "--set",
        f"data.val_shards={indexed}",
        "--set",
        f"init.pretrained={tmp_path / 'mae_pretrain_vit_test.pth'}",
        "--set",
        "schedule.max_steps=2",
        module="engine.finetune",
    )
    text = out.stdout + out.stderr
    assert "an official MAE encoder: ViT width 32, 4 blocks, patch 4" in text
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["val_samples"] == 18 and 0 <= evals[-1]["top1"] <= 100
