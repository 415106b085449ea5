"""Benchmark: how long a checkpoint holds training, and how long a restart takes, old path against new.

    python -m bench.checkpoint [--models tiny,vit_b16,vit_l16] [--repeats 2] [--restart vit_b16] \
        [--goodput] [--shards DIR] --json OUT

**Saves** (``--models``): each model (the DeepMIM pixel presets; images of 32 px, so a step is cheap
and the state is the real one: weights, decoders, AdamW moments) trains a few steps under DeepSpeed
ZeRO-2 in bf16 on 2 CPU ranks, then saves ``--repeats`` times in each of three ways, interleaved:

* ``before``: DeepSpeed's own checkpoint engine, then rank 0 reads every rank's files back to checksum
  them for the marker, and deletes the checkpoint beyond ``keep_last`` before training goes on (what a
  save was until issue 27);
* ``sync``: the files checksummed by the rank that writes them while it writes them and fsynced, the
  marker from those records, old checkpoints deleted in a thread of their own;
* ``async``: the state copied to host memory, written by a background thread while training goes on.

``blocking_s`` is the time the training thread spends in the save (the slowest rank); for ``async``,
``slowdown_s`` is what the steps run while the write is in flight took beyond the median step: on
these 2 cores the writer competes with the training for the CPU, which on a GPU it does not.
The same run times the resume's read of the newest checkpoint: verifying its files against the
marker, and DeepSpeed's load.

**Restart** (``--restart MODEL``): ``launchers/pretrain.sh`` runs the preset at its real image size one
step from scratch (saving it), then resumes it for a second step; the start-up of each (launch to the
first step, from the run's goodput account) and its parts.

**Goodput** (``--goodput``): the quickstart's preset on the demo shards, killed (SIGKILL to the whole
job) after its first checkpoint, then started again with the same command to the end; the run's
goodput account.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import answer_help_early

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": "deepmim_test_pixel", "vit_b16": "deepmim_vit_b16_pixel", "vit_l16": "deepmim_vit_l16_pixel"}
MODES = ("before", "sync", "async")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,vit_b16,vit_l16", help=f"of {', '.join(PRESETS)}; empty: none")
    ap.add_argument("--repeats", type=int, default=2, help="saves per way and model (default 2)")
    ap.add_argument("--restart", default="", help="model whose fresh start and resume are timed (e.g. vit_b16)")
    ap.add_argument("--goodput", action="store_true", help="the quickstart killed once and resumed")
    ap.add_argument("--goodput-preset", default="deepmim_tiny_pixel", help="preset of the --goodput run")
    ap.add_argument("--shards", help="training shards for --restart/--goodput (default: demo shards made here)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # a rank of the save benchmark
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return ap


if __name__ == "__main__":
    answer_help_early(build_parser)


# ------------------------------------------------------------------------------ one rank of a save run
def worker(model: str, repeats: int, out: str) -> None:
    import torch

    from engine.config import apply_overrides, plan_run, to_dict, validate
    from engine.config.schema import CheckpointConfig
    from engine.loop.checkpointing import Checkpointer
    from engine.loop.dist import all_gather_objects, any_rank, barrier, setup_distributed
    from engine.loop.ds_setup import resolve_ds_config
    from engine.loop.engines import deepspeed_engine
    from engine.loop.faults import NO_FAULTS
    from engine.loop.task import TaskContext
    from engine.observe.telemetry import PhaseTimer
    from engine.presets import get_preset
    from engine.run_folder import checkpoints as ckpt
    from engine.tasks.masked_modeling import PretrainTask
    from engine.weights.safe_load import load_guard

    dist = setup_distributed()
    root = Path(out).parent / "checkpoints"
    cfg = get_preset(PRESETS[model])
    micro = 2
    apply_overrides(
        cfg,
        [
            "model.img_size=32",
            f"data.global_batch={micro * dist.world_size}",
            f"data.micro_batch={micro}",
            f"run_dir={root.parent}",
            "engine.compile=false",
        ],
    )
    validate(cfg)
    plan = plan_run(cfg, dist.world_size, 10_000)
    task = PretrainTask()
    task.setup(TaskContext(cfg, plan, dist, root.parent, None))
    plan = task.plan
    engine, dtype = deepspeed_engine(
        task.module, task.make_optimizer(task.param_groups(), plan.lr), resolve_ds_config(cfg, plan, "bf16")
    )
    task.to_device(dist.device, dtype)
    original_engine = engine.checkpoint_engine
    timer = PhaseTimer(dist.device)

    class Batch:
        img = torch.randn(micro, 3, 32, 32)
        void = False

    def step() -> float:
        t0 = time.perf_counter()
        out = task.forward(engine, Batch, timer)
        engine.backward(out.loss)
        engine.step()
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    median = statistics.median(step() for _ in range(5))
    client = {"train": {"step": 0}, "config": to_dict(cfg)}
    keep = CheckpointConfig(keep_last=1, async_save=False)
    savers = {
        "sync": Checkpointer(engine, dist, root, keep, NO_FAULTS),
        "async": Checkpointer(engine, dist, root, CheckpointConfig(keep_last=1, async_save=True), NO_FAULTS),
    }
    rows: list[dict] = []
    tag = 0
    for _ in range(repeats):
        for mode in MODES:
            tag += 1
            info = {"step": tag, "world_size": dist.world_size, "keep": False}
            barrier()
            t0 = time.perf_counter()
            slowdown, steps_while_writing, write_s = 0.0, 0, None
            if mode == "before":
                engine.checkpoint_engine = original_engine
                engine.save_checkpoint(str(root), tag=ckpt.tag_for(tag), client_state=client, save_latest=False)
                barrier()
                if dist.is_main:
                    ckpt.mark_complete(root / ckpt.tag_for(tag), info)  # reads every rank's files back
                    ckpt.write_latest(root, ckpt.tag_for(tag))
                    ckpt.apply_retention(root, 1)
                barrier()
                blocked = time.perf_counter() - t0
            else:
                saver = savers[mode]
                engine.checkpoint_engine = saver.writer
                saver.save(tag, client, info)
                blocked = time.perf_counter() - t0
                while any_rank(saver.writer.writing, dist.device):  # (every rank steps alike)
                    slowdown += max(0.0, step() - median)
                    steps_while_writing += 1
                t1 = time.perf_counter()
                saver.wait()
                blocked += time.perf_counter() - t1
                write_s = saver.writer.write_s
            size = sum(f.stat().st_size for f in (root / ckpt.tag_for(tag)).rglob("*") if f.is_file())
            every = all_gather_objects({"blocked": blocked, "slowdown": slowdown}, dist.world_size)
            rows.append(
                {
                    "model": model,
                    "mode": mode,
                    "blocking_s": max(r["blocked"] for r in every),
                    "slowdown_s": max(r["slowdown"] for r in every) if mode == "async" else None,
                    "steps_while_writing": steps_while_writing if mode == "async" else None,
                    "background_write_s": write_s if mode == "async" else None,
                    "checkpoint_gb": size / 1e9,
                    "step_s": median,
                }
            )
    newest = ckpt.newest_complete(root)
    barrier()
    t0 = time.perf_counter()
    problems = ckpt.verify(newest, dist.rank, dist.world_size, lambda o: all_gather_objects(o, dist.world_size))
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with load_guard():
        engine.load_checkpoint(str(root), tag=newest.name, load_lr_scheduler_states=False)
    load_s = time.perf_counter() - t0
    barrier()
    if dist.is_main:
        resume = {"model": model, "verify_s": verify_s, "load_s": load_s, "verified": not problems}
        Path(out).write_text(json.dumps({"saves": rows, "resume": resume, "params": plan.trainable_params}))


# ------------------------------------------------------------------------------ the driver
def cpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return env


def saves(model: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        out = Path(tmp) / "result.json"
        deepspeed = Path(sys.executable).parent / "deepspeed"
        cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()), "--log_level", "warning"]
        cmd += ["--module", "bench.checkpoint", "--worker", model, "--repeats", str(repeats), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"save benchmark of {model} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def demo_shards(where: Path) -> Path:
    py, opts = sys.executable, {"cwd": ROOT, "check": True, "capture_output": True}
    subprocess.run([py, "-m", "data_pipeline.demo_data", str(where / "demo")], **opts)
    make = [py, "-m", "data_pipeline.make_shards", str(where / "demo"), str(where / "shards")]
    subprocess.run([*make, "--shard-size-mb", "0.25", "--no-progress"], **opts)
    return where / "shards"


def launch(run: Path, preset: str, shards: Path, *sets: str, kill_after_checkpoint: bool = False) -> int:
    args = ["--preset", preset, "--run-dir", str(run), "--set", f"data.shards={shards}"]
    for s in sets:
        args += ["--set", s]
    cmd = ["bash", str(ROOT / "launchers" / "pretrain.sh"), "--gpus", "2", "--", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    if kill_after_checkpoint:  # once the run has trained steps past a checkpoint: the restart redoes them
        while proc.poll() is None:
            time.sleep(0.2)
            if _reached_step(run) <= _checkpoint_step(run):
                continue
            # Frozen, the run cannot finish another checkpoint between the look and the kill (with
            # a short interval it did, and the restart then had nothing to redo).
            tree = [*_descendants(proc.pid), proc.pid]  # ranks, launcher, script: as a node failure would
            _signal(tree, signal.SIGSTOP)
            if _reached_step(run) > _checkpoint_step(run):
                _signal(tree, signal.SIGKILL)
                break
            _signal(tree, signal.SIGCONT)
    _, err = proc.communicate()
    if not kill_after_checkpoint and proc.returncode != 0:
        raise RuntimeError(f"{preset} run failed ({proc.returncode}): {err[-3000:]}")
    return proc.returncode


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, deepest first (the launcher runs in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out: list[int] = []

    def walk(p: int) -> None:
        for c in children.get(p, []):
            walk(c)
            out.append(c)

    walk(pid)
    return out


def _checkpoint_step(run: Path) -> int:
    from engine.run_folder.checkpoints import list_checkpoints, step_of

    found = list_checkpoints(run / "checkpoints")
    return step_of(found[-1].name) if found else 1 << 30


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reached_step(run: Path) -> int:
    """The furthest step the ranks report (heartbeats), or the account records."""
    steps = [0]
    for f in [run / "goodput.json", *(run / "heartbeat").glob("rank*.json")]:
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError, TypeError):
            doc = json.loads(f.read_text())
            steps.append(int((doc["attempts"][-1]["step_to"] if "attempts" in doc else doc["step"]) or 0))
    return max(steps)


def restart(model: str, shards: Path) -> dict:
    from engine.run_folder.checkpoints import newest_complete

    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        run = Path(tmp) / "run"
        base = ("data.global_batch=2", "data.micro_batch=1", "log.reconstructions=false", "checkpoint.interval=1")
        launch(run, PRESETS[model], shards, *base, "schedule.max_steps=1")
        size = sum(f.stat().st_size for f in newest_complete(run / "checkpoints").rglob("*") if f.is_file())
        launch(run, PRESETS[model], shards, *base, "schedule.max_steps=2")
        fresh, resumed = json.loads((run / "goodput.json").read_text())["attempts"]
    return {
        "model": model,
        "checkpoint_gb": size / 1e9,
        "fresh_startup_s": fresh["seconds"]["startup"],
        "resume_startup_s": resumed["seconds"]["startup"],
        "fresh_parts": fresh["startup_parts"],
        "resume_parts": resumed["startup_parts"],
    }


def goodput_of_a_killed_quickstart(shards: Path, preset: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-goodput-") as tmp:
        run = Path(tmp) / "run"
        code = launch(run, preset, shards, "log.reconstructions=false", kill_after_checkpoint=True)
        launch(run, preset, shards, "log.reconstructions=false")
        doc = json.loads((run / "goodput.json").read_text())
    return {"preset": preset, "killed_exit": code, "summary": doc["summary"], "attempts": doc["attempts"]}


def ratios(rows: list[dict]) -> dict:
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        med = {
            m: statistics.median(r["blocking_s"] for r in rows if r["model"] == model and r["mode"] == m) for m in MODES
        }
        out[f"{model} sync / before"] = med["sync"] / med["before"]
        out[f"{model} async / before"] = med["async"] / med["before"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args.worker, args.repeats, args.out)
        return 0
    import logging

    from bench.common import header, write_json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench.checkpoint: %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("bench.checkpoint")
    result = header("checkpoint", ranks=2, repeats=args.repeats, results=[], resume=[])
    for model in [m for m in args.models.split(",") if m]:
        got = saves(model, args.repeats)
        result["results"] += got["saves"]
        result["resume"].append({**got["resume"], "params": got["params"]})
        result["ratios"] = ratios(result["results"])
        for r in got["saves"]:
            log.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
        log.info("%s", got["resume"])
        write_json(args.json, result)
    for k, v in result.get("ratios", {}).items():
        log.info("ratio %s: %.3f", k, v)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        shards = Path(args.shards) if args.shards else None
        if (args.restart or args.goodput) and shards is None:
            shards = demo_shards(Path(tmp))
        if args.restart:
            r = restart(args.restart, shards)
            r["resume_over_fresh"] = r["resume_startup_s"] / r["fresh_startup_s"]
            result["restart"] = r
            log.info("restart: %s", r)
            write_json(args.json, result)
        if args.goodput:
            g = goodput_of_a_killed_quickstart(shards, args.goodput_preset)
            result["goodput"] = g
            log.info("goodput of the killed and resumed quickstart: %s", g["summary"])
            write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
