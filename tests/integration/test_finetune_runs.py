"""Fine-tuning and linear probing on the pretraining loop: initialization from every kind of source,
exact resume, export to timm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from engine.config import Config
from engine.run_folder.checkpoints import MARKER, list_checkpoints
from tests.conftest import ROOT, cpu_env, run_deepspeed, run_single

TEST_ARCH = "deepmim_vit_test_patch4"  # ViT-test/4 at 16 px, depth 4, width 32


def finetune_args(
    run: Path, train: Path, val: Path, init: Path | str, steps: int, preset: str = "finetune_test", *extra: str
) -> list[str]:
    return [
        "--preset",
        preset,
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={train}",
        "--set",
        f"data.val_shards={val}",
        "--set",
        f"init.pretrained={init}",
        "--set",
        f"schedule.max_steps={steps}",
        *extra,
    ]


def run_finetune(nprocs: int, *args: str, check: bool = True, **kw):
    return run_deepspeed(nprocs, *args, module="engine.finetune", check=check, **kw)


@pytest.fixture(scope="session")
def val_shards(demo_val_shards) -> Path:
    return demo_val_shards


@pytest.fixture(scope="module")
def pretrained(demo_shards, tmp_path_factory) -> Path:
    """A 2-step pretraining run of the test variant (world of one) and its export."""
    run = tmp_path_factory.mktemp("pre") / "run"
    proc = run_single(
        "--preset",
        "deepmim_test_pixel",
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={demo_shards}",
        "--set",
        "schedule.max_steps=2",
        "--set",
        "log.reconstructions=false",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from engine.tools.export import export

    export(run, run.parent / "export")
    return run


def test_init_from_a_run_a_checkpoint_and_an_export_is_the_same(pretrained):
    from engine.config import plan_run
    from engine.models.classifier import build_classifier, load_encoder
    from engine.weights.sources import encoder_weights

    ckpt = list_checkpoints(pretrained / "checkpoints")[-1]
    states = [encoder_weights(s).state for s in (pretrained, ckpt, pretrained.parent / "export")]
    assert all(a.keys() == states[0].keys() and all(torch.equal(a[k], states[0][k]) for k in a) for a in states)
    cfg = Config()
    cfg.task, cfg.model.arch = "finetune", TEST_ARCH
    model = build_classifier(cfg, plan_run(cfg), 9)
    report = load_encoder(model, states[0], "test")
    assert report["dropped"] == ["norm.bias", "norm.weight"]
    assert report["new"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert torch.equal(model.blocks[3].mlp.fc2.weight, states[0]["blocks.3.mlp.fc2.weight"])
    cfg.finetune.global_pool, cfg.finetune.head_norm = "token", "batchnorm"
    probe = build_classifier(cfg, plan_run(cfg), 9)
    assert load_encoder(probe, states[0], "test")["dropped"] == []  # the cls token keeps the pretrained norm


def final_state(run: Path) -> tuple[dict, list[torch.Tensor]]:
    from tests.helpers import final_state as fs

    return fs(run)


@pytest.mark.launcher
def test_finetune_trains_evaluates_and_resumes_bit_identically(pretrained, demo_shards, val_shards, tmp_path):
    """2 ranks, DALI with RandAugment, random erasing, mixup/cutmix: straight 12 steps vs 4 steps,
    SIGKILL, resume to 12. The same weights, optimizer state and sample keys, bit for bit."""
    from tests.conftest import deepspeed_cmd
    from tests.helpers import wait_for

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    opts = ("--set", "checkpoint.interval=4", "--set", "log.sample_keys=true")
    n = 12  # an epoch is 9 steps: an evaluation at its end, and a final one at step 12
    out = run_finetune(2, *finetune_args(straight, demo_shards, val_shards, pretrained, n, "finetune_test", *opts))
    text = out.stdout + out.stderr
    assert "encoder keys not used ['norm.bias', 'norm.weight']" in text
    assert "new ['fc_norm.bias', 'fc_norm.weight'" in text and "other keys of the file left out (decoder" in text
    evals = [json.loads(x) for x in (straight / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e.get("final", False)) for e in evals] == [(9, False), (12, True)]
    assert all(e["val_samples"] == 36 for e in evals)
    assert all(0 <= e["top1"] <= e["top5"] <= 100 for e in evals)
    assert "validation: top-1" in text and "best top-1" in text
    for noise in ("regular DALI operator", "Checkpointing enabled in a pipeline", "Processing zero checkpoint"):
        assert noise not in text, noise  # DALI's and zero_to_fp32's chatter, once per rank

    cmd = deepspeed_cmd(
        2,
        *finetune_args(
            killed, demo_shards, val_shards, pretrained, n, "finetune_test", *opts, "--set", "debug.step_sleep_s=0.3"
        ),
        module="engine.finetune",
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_for(lambda: (killed / "checkpoints" / "step_00000004" / MARKER).is_file())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "checkpoints" / "step_00000012").exists()
    run_finetune(2, *finetune_args(killed, demo_shards, val_shards, pretrained, n, "finetune_test", *opts))
    m1, o1 = final_state(straight)
    m2, o2 = final_state(killed)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert len(o1) == len(o2) and all(torch.equal(a, b) for a, b in zip(o1, o2))
    keys = lambda r: {p.name: p.read_text() for p in sorted((r / "sample_keys").glob("*.tsv"))}
    assert keys(straight) == keys(killed)

    # the export loads strictly into timm and gives our model's logits
    from engine.tools.export import export, load_exported
    from engine.weights.sources import consolidated_state

    meta = export(straight, tmp_path / "export")
    assert meta["kind"] == "classifier" and meta["timm_kwargs"]["num_classes"] == 9
    timm_model = load_exported(tmp_path / "export")
    ours = _our_classifier(straight, consolidated_state(list_checkpoints(straight / "checkpoints")[-1]))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(timm_model(x), ours(x), atol=1e-5)


def _our_classifier(run: Path, state: dict):
    from engine.config import from_dict, plan_run
    from engine.models.classifier import build_classifier

    cfg = from_dict(json.loads((run / "config.json").read_text())["config"])
    model = build_classifier(cfg, plan_run(cfg), 9)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


@pytest.mark.launcher
def test_linear_probe_trains_only_the_head_and_exports_a_folded_head(pretrained, demo_shards, val_shards, tmp_path):
    run = tmp_path / "probe"
    out = run_finetune(
        2,
        *finetune_args(
            run, demo_shards, val_shards, pretrained.parent / "export", 4, "linprobe_test", "--set", "data.loader=torch"
        ),
    )
    assert "frozen encoder" in out.stdout + out.stderr
    from engine.tools.export import export, load_exported
    from engine.weights.sources import consolidated_state, encoder_weights

    state = consolidated_state(list_checkpoints(run / "checkpoints")[-1])
    enc = encoder_weights(pretrained).state
    # the encoder did not move (frozen parameters stay in the engine's bf16: compare at that precision)
    assert all(torch.equal(state[k].float(), enc[k].to(torch.bfloat16).float()) for k in enc)
    assert not torch.equal(state["head.1.weight"], torch.zeros_like(state["head.1.weight"]))
    export(run, tmp_path / "export")
    timm_model = load_exported(tmp_path / "export")  # a plain linear head: the BatchNorm folded into it
    ours = _our_classifier(run, state)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(timm_model(x), ours(x), atol=1e-4)
    # the export says what it is: our model, its classes, none of timm's defaults for another model
    conf = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    assert "tag" not in conf and "license" not in conf and "DeepMIM linprobe classifier" in conf["description"]
    assert conf["label_names"] == json.loads((tmp_path / "export" / "export.json").read_text())["label_names"]
    # the fine-tuned model evaluated on its own, from the run and from the export: the same numbers
    from engine.tools.evaluate import main as evaluate_main

    results = []
    for src in (run, tmp_path / "export"):
        out_json = tmp_path / f"eval_{len(results)}.json"
        assert evaluate_main(["--classifier", str(src), "--val-shards", str(val_shards), "--json", str(out_json)]) == 0
        results.append(json.loads(out_json.read_text()))
    assert results[0] == results[1] and results[0]["val_samples"] == 36
    final = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()][-1]
    assert abs(results[0]["top1"] - final["top1"]) <= 100 / 36 + 1e-9  # bf16 engine vs fp32 weights: one image


def test_bf16_finetune_starts_from_the_exact_weights_it_was_given(pretrained, demo_shards, val_shards, tmp_path):
    """2 ranks, ZeRO-2, bf16, one step at learning rate 1e-30 (0 is refused; an update that small is
    below half an fp32 ulp of every weight, so it changes none): the fp32 master weights DeepSpeed saves for
    the encoder equal the file's float32 tensors bit for bit (DeepSpeed alone builds them from the
    bf16-rounded module: off by up to one bf16 ulp)."""
    from engine.weights.sources import consolidated_state, encoder_weights

    export = pretrained.parent / "export"
    given = encoder_weights(export).state
    assert any(not torch.equal(v, v.bfloat16().float()) for v in given.values())  # rounding would show
    run = tmp_path / "ft"
    opts = ("--set", "engine.precision=bf16", "--set", "optim.lr=1e-30", "--set", "schedule.min_lr=0")
    opts += ("--set", "checkpoint.interval=1")
    run_finetune(2, *finetune_args(run, demo_shards, val_shards, export, 1, "finetune_test", *opts))
    saved = consolidated_state(list_checkpoints(run / "checkpoints")[-1])  # zero_to_fp32 of the partitions
    masters = {
        k.split(".", 1)[1] if k.split(".", 1)[0] in ("module", "model", "vit") else k: v for k, v in saved.items()
    }
    shared = sorted(set(given) & set(masters))
    assert len(shared) >= len(given) - 2  # the encoder's tensors (norm.* is replaced by fc_norm.*)
    different = [k for k in shared if not torch.equal(given[k], masters[k])]
    assert not different, different[:5]
