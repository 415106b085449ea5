"""The training loop, for any task. ``Trainer.train()`` owns the order (build, resume, loop, save);
a micro-step is ``task.forward`` + backward + the engine's step; build steps are small named
methods, and every attribute of the trainer is declared in ``__init__``.

Fault handling lives here because it is about the order of things: resuming exactly (loader,
RNG and task states of every rank are in the checkpoint), reacting to the guard's lagged flags
(roll back after K non-finite steps, stop cleanly on SIGTERM/SIGUSR1/SIGINT), refusing to resume
under an incompatible config, and not waiting forever for a stalled rank.

The engine comes from a factory (``engine.loop.engines``): DeepSpeed for runs, a local
single-process engine for the in-process test tier; fault drills come from an injector that is a
no-op in real runs (``engine.loop.faults``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.dataset.locations import remote_spec
from data_pipeline.loaders import preflight
from data_pipeline.loaders.base import EpochLoader, LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.loaders.identity import check_data_change, data_identity
from data_pipeline.loaders.source import DatasetView, read_dataset
from data_pipeline.order.select import resolve_order
from engine.config import Config, RunPlan, fingerprint, plan_run, resolved, to_dict
from engine.disk import writing
from engine.errors import CheckpointError, DataError, NonFiniteError, RunFolderBusy, TransientError
from engine.loop import to_universal
from engine.loop.checkpointing import Checkpointer
from engine.loop.dist import DistInfo, all_gather_objects, any_rank, barrier
from engine.loop.ds_setup import native_cpu_bf16, resolve_ds_config, resolve_precision
from engine.loop.engines import EngineFactory, deepspeed_engine
from engine.loop.faults import NoFaults, fault_injector
from engine.loop.guard import NonFiniteGuard
from engine.loop.resume import check_config, choose_resume, find_resume, resume_marker
from engine.loop.rng import rng_state, seed_everything, set_rng_state
from engine.loop.runlock import RunLock
from engine.loop.schedule import lr_at
from engine.loop.signals import StopRequest, StopSignals
from engine.loop.syncs import SyncSpy, sync_counter
from engine.loop.task import Task, TaskContext
from engine.loop.watchdog import Watchdog
from engine.loop.zero_adapter import adapter_for
from engine.models.flops import peak_flops
from engine.observe.goodput import GoodputAccount, StartupClock
from engine.observe.monitor import KeyAudit, RunMonitor
from engine.observe.telemetry import MetricMeter, PhaseTimer, peak_memory_gb
from engine.run_folder import checkpoints as ckpt

log = logging.getLogger(__name__)


class VoidSteps(Exception):
    """Raised inside the loop when steps from guard step ``first`` on were stand-ins on some rank."""

    def __init__(self, first: int):
        super().__init__(first)
        self.first = first


class Trainer:
    def __init__(
        self,
        cfg: Config,
        dist: DistInfo,
        task: Task,
        engine_factory: EngineFactory = deepspeed_engine,
        faults: NoFaults | None = None,
        stop: StopRequest | None = None,
        clock: StartupClock | None = None,
    ):
        self.cfg, self.dist, self.task = cfg, dist, task
        self.engine_factory = engine_factory
        self.faults = faults if faults is not None else fault_injector(cfg.debug)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.view_dir = self.run_dir / "data_view"
        self.lock = RunLock(self.run_dir)
        # start-up marks from the launch (the entry point's clock) or, in process, from now
        self.clock = clock if clock is not None else StartupClock(origin=time.time())
        self.goodput = GoodputAccount(self.run_dir, False, self.clock)  # rank 0's, opened under the lock in _train
        # set by signals (engine.loop.signals), read by the guard and the loop; an entry point that
        # installed its handlers at process start hands its request in, else train() installs them
        self.stop = stop if stop is not None else StopRequest()
        self.own_signals = stop is None
        # progress (checkpointed)
        self.step = 0  # optimizer steps done
        self.rollbacks = 0
        self.stale_flags_through = 0  # guard steps whose flags predate the last rollback
        self.flags_read = 0  # guard steps whose flags the loop has acted on
        self.last_save = 0  # the step of the newest checkpoint this process wrote or resumed from
        # per guard step g: the state before it (step count, loader position, RNG, task state), for the
        # few steps whose flags the lag has not shown yet: a transient stop sets every rank back to one
        self.snapshots: dict[int, tuple] = {}
        # built by build()
        self.built = False
        self.resume_from: Path | None = None
        self.verification: ckpt.Verification | None = None  # of resume_from's files, still running
        self.resume_marker: dict | None = None
        self.dataset: DatasetView | None = None
        self.bad_samples = 0
        self.plan: RunPlan | None = None
        self.ds_config: dict = {}
        self.engine: Any = None
        self.checkpoints: Checkpointer | None = None
        self.dtype = torch.float32
        self.guard: NonFiniteGuard | None = None
        self.compiled, self.compile_error = False, ""
        self.precision = "bf16"  # engine.precision as resolved in _build_engine (recorded in each checkpoint)
        self.peak: float | None = None
        # built by train()
        self.signals: StopSignals | None = None
        self.loader: EpochLoader | None = None
        self.keys: KeyAudit | None = None
        self.monitor: RunMonitor | None = None
        self.timer = PhaseTimer(dist.device)
        self.meter = MetricMeter()
        self.watchdog: Watchdog | None = None
        self.sync_check = cfg.log.sync_debug  # count host-device syncs on the steps that do not log
        self.syncs = sync_counter(dist.device, self.sync_check)

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        self._lock_run_dir()
        # the newest checkpoint's files are verified in the background while data, model and engine build
        self.resume_from, self.verification = choose_resume(self.cfg.checkpoint.resume, self.ckpt_dir, self.dist)
        if self.resume_from is not None:
            self.resume_marker = resume_marker(self.resume_from)
            if "config" in self.resume_marker:  # refuse an incompatible config before building anything
                check_config(self.resume_marker["config"], self.cfg)
        self.clock.mark("run folder and checkpoint choice")
        self._build_data()
        self.clock.mark("data checks and plan")
        self.task.setup(TaskContext(self.cfg, self.plan, self.dist, self.run_dir, self.resume_marker))
        self.plan = self.task.plan  # a task may refine it (a teacher's real width)
        if self.resume_marker is not None:
            self.task.check_resume(self.resume_marker)
        self.clock.mark("model")
        self._build_engine()
        self.clock.mark("engine")
        seed_everything(self.cfg.seed + self.dist.rank)
        self.built = True

    def _lock_run_dir(self) -> None:
        """One job per run folder (engine.loop.runlock): rank 0 holds the lock, every rank agrees."""
        error = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.lock.acquire()
            except RunFolderBusy as err:
                error = err
        if any_rank(error is not None, self.dist.device):
            raise RunFolderBusy(str(error or f"{self.run_dir.resolve()} is in use by another job"))
        if self.cfg.checkpoint.resume == "fresh":  # under the lock: no other job is using what moves
            if self.dist.is_main and ckpt.holds_run(self.run_dir):
                moved = ckpt.move_run_aside(self.run_dir)
                log.warning("--resume fresh: the run that was in %s is now in %s", self.run_dir, moved)
            barrier()

    def _build_data(self) -> None:
        """Preflight (shared by all ranks) -> the sample list every rank trains on -> the run plan."""
        d = self.cfg.data
        raw = read_dataset(d.shards, remote=remote_spec(d))
        self.order = resolve_order(d.order, d.shards, raw.total_samples)
        self.dataset = preflight.run(
            raw,
            self.cfg.fault.data_checks,
            self.view_dir,
            self.dist.rank,
            self.dist.world_size,
            lambda obj: all_gather_objects(obj, self.dist.world_size),
            barrier,
        )
        self.bad_samples = self.dataset.total_samples - self.dataset.num_samples
        if self.bad_samples:
            log.warning(
                "data: %d of %d samples skipped as unreadable (listed in %s)",
                self.bad_samples,
                self.dataset.total_samples,
                self.view_dir / "bad_samples.json",
            )
        preflight.check_threshold(self.dataset, self.cfg.fault.max_bad_sample_share, self.view_dir)
        if self.resume_marker is not None:
            self._check_data_change(self.resume_marker)
        classes = self.dataset.num_classes or None
        self.plan = plan_run(self.cfg, self.dist.world_size, self.dataset.num_samples, classes).require_complete()
        p = self.plan
        log.info(
            "data: %d samples in %d shards (%s); %d ranks x micro-batch %d x accumulation %d = global batch "
            "%d; %d steps/epoch (%d samples/epoch left out so ranks take equal steps); lr %.3g",
            self.dataset.num_samples,
            len(self.dataset.shards),
            "global order" if self.order == "global" else f"block order, {d.block_window} shards per window",
            p.world_size,
            p.micro_batch,
            p.grad_accum,
            p.global_batch,
            p.steps_per_epoch,
            p.dropped_per_epoch,
            p.lr,
        )

    def _check_data_change(self, marker: dict) -> None:
        """Other data or seed under a mid-epoch checkpoint: refused here (or noted, data.on_change)."""
        d = self.cfg.data
        identity = data_identity(self.dataset.table, self.cfg.seed, self.order, d.block_window)
        note = check_data_change(marker, identity, d.on_change)
        if note:
            log.warning("%s", note)

    def _build_engine(self) -> None:
        trained_in = (self.resume_marker or {}).get("precision")
        self.precision, why = resolve_precision(
            self.cfg.engine.precision, self.dist.device.type, trained_in, native_cpu_bf16()
        )
        if why and self.dist.is_main:
            log.warning("%s", why)
        self.ds_config = resolve_ds_config(self.cfg, self.plan, self.precision)
        if self.cfg.optim.name != "adamw":  # ZeRO-2 partitions any torch optimizer; DeepSpeed asks to be told
            self.ds_config["zero_allow_untested_optimizer"] = True
        if self._elastic():
            self.ds_config["checkpoint"] = {"load_universal": True}  # elastic resume, see resume()
        module = self.task.module
        module.to(self.dist.device)
        optimizer = self.task.make_optimizer(self.task.param_groups(), self.plan.lr)
        self.engine, self.dtype = self.engine_factory(module, optimizer, self.ds_config)
        self.checkpoints = Checkpointer(self.engine, self.dist, self.ckpt_dir, self.cfg.checkpoint, self.faults)
        lag = self.cfg.debug.flag_lag if self.cfg.debug.flag_lag >= 0 else None
        self.guard = NonFiniteGuard(adapter_for(self.engine.optimizer), self.dist.device, self.stop, lag=lag)
        self.task.to_device(self.dist.device, self.dtype)
        setting = str(self.cfg.engine.compile).lower()  # (configs saved before "auto" hold a bool)
        if setting == "true" or (setting == "auto" and self.dist.device.type == "cuda"):
            self.compiled, self.compile_error = self.task.compile(self.engine, self.dtype)
        if self.dist.device.type == "cuda":
            name = torch.cuda.get_device_name(self.dist.device)
            self.peak = peak_flops(name, self.cfg.engine.peak_tflops)
        f = self.plan.flops
        log.info(
            "model FLOPs per image: %.1f GFLOP (%s)",
            f.per_image / 1e9,
            ", ".join(f"{k} {v:.0%}" for k, v in f.shares().items()),
        )

    def _elastic(self) -> bool:
        return self.resume_marker is not None and self.resume_marker["world_size"] != self.dist.world_size

    def _loader_spec(self) -> LoaderSpec:
        d = self.cfg.data
        gpu = self.dist.device.type == "cuda"
        decode = "gpu" if (d.decode_device == "gpu" or (d.decode_device == "auto" and gpu)) else "cpu"
        if decode == "gpu" and not gpu:
            raise DataError("data.decode_device=gpu but no CUDA device is available; use auto or cpu")
        aug = self.task.augment()
        return LoaderSpec(
            shards=d.shards,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            micro_batch=self.plan.micro_batch,
            samples_per_rank_step=self.plan.micro_batch * self.plan.grad_accum,
            img_size=aug.img_size,
            seed=self.cfg.seed,
            num_threads=d.num_threads,
            decode_device=decode,
            device_id=self.dist.local_rank if gpu else None,
            crop_scale=aug.crop_scale,
            crop_ratio=aug.crop_ratio,
            rand_augment=aug.rand_augment,
            flip_prob=aug.flip_prob,
            excluded=self.dataset.excluded,
            view=str(self.view_dir),
            on_change=d.on_change,
            order=self.order,
            block_window=d.block_window,
            remote=remote_spec(d),
            labels=aug.labels,
            label_map=aug.label_map,
            keys=self.cfg.log.sample_keys,  # built per sample: only when they are recorded
        )

    # ------------------------------------------------------------------ state
    def _client_state(self) -> dict:
        """Everything besides weights and optimizer state; per-rank parts gathered to all ranks."""
        mine = {"loader": self.loader.state_dict(), "rng": rng_state(), "task": self.task.state_dict()}
        ranks = all_gather_objects(mine, self.dist.world_size)
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "train": {
                "step": self.step,
                "epoch": self.loader.epoch,
                "samples_into_epoch": self.loader.samples_consumed(),
                "steps_per_epoch": self.plan.steps_per_epoch,
                "grad_accum": self.plan.grad_accum,
                "skipped_updates": self.guard.state_dict()["skipped"],
                "rollbacks": self.rollbacks,
            },
            "config": to_dict(self.cfg),
            "config_fingerprint": fingerprint(self.cfg),
            **self.task.reference(),
            "world_size": self.dist.world_size,
            "precision": self.precision,
            "ranks": ranks,
        }

    def _check_finite_weights(self) -> None:
        norms = torch._foreach_norm([p.detach() for p in self.task.module.parameters()])
        if not bool(torch.isfinite(torch.stack(norms).float()).all()):  # one sync, at save time only
            raise NonFiniteError(f"weights are not finite at step {self.step}; not saving them")

    def save(self, keep: bool = False) -> Path:
        first = self._first_void()
        if first is not None:  # a step since the last flags read was stand-in data somewhere: not this state
            raise VoidSteps(first)
        t0 = time.perf_counter()
        with self.watchdog.held() if self.watchdog is not None else contextlib.nullcontext():
            path = self._save(keep)
        self.last_save = self.step
        self.goodput.add("checkpoint", time.perf_counter() - t0)
        self.goodput.write()
        return path

    def _save(self, keep: bool) -> Path:
        self._check_finite_weights()
        self.keys.flush()  # before the marker: a complete checkpoint never lacks its steps' keys
        info = {
            "step": self.step,
            "epoch": self.loader.epoch,
            "world_size": self.dist.world_size,
            "keep": keep,
            "precision": self.precision,  # what engine.precision=auto resolved to: a resume keeps it
            "data": self.loader.data_state(),
            # the config travels in the marker too, so a resume can refuse it before loading anything
            "config": to_dict(self.cfg),
            "config_fingerprint": fingerprint(self.cfg),
            **self.task.reference(),
        }
        return self.checkpoints.save(self.step, self._client_state(), info)

    def _wait_for_saves(self) -> None:
        """The checkpoint write in flight is complete on every rank (an asynchronous save)."""
        t0 = time.perf_counter()
        with self.watchdog.held("a checkpoint write") if self.watchdog is not None else contextlib.nullcontext():
            self.checkpoints.wait()
        self.goodput.add("checkpoint", time.perf_counter() - t0)

    def _collect_verification(self) -> None:
        """Before loading: every rank's share of the checkpoint's files verified. A damaged checkpoint
        is set aside and the newest one that verifies is used, when the run as built can load it (same
        world size, config and data); otherwise this start ends with exit code 75 and the same command
        resumes from it."""
        check, self.verification = self.verification, None
        problems = check.problems(lambda obj: all_gather_objects(obj, self.dist.world_size))
        if not problems:
            return
        damaged = self.resume_from
        if self.dist.is_main:
            ckpt.set_aside(damaged, problems)
        barrier()
        found = find_resume("auto", self.ckpt_dir, self.dist)
        if found is None:
            raise ckpt.no_checkpoint_verifies(self.ckpt_dir, ckpt.broken_checkpoints(self.ckpt_dir))
        marker = resume_marker(found)
        same = ("world_size", "precision")  # what the engine was built for (ZeRO layout, dtype)
        if any(marker.get(k) != self.resume_marker.get(k) for k in same):
            raise TransientError(
                f"checkpoint {damaged.name} is damaged ({'; '.join(problems[:2])}) and was set aside; the next one, "
                f"{found.name}, was written with other settings than this start was built for: the same command "
                "resumes from it"
            )
        if "config" in marker:
            check_config(marker["config"], self.cfg)
        self.task.check_resume(marker)
        self._check_data_change(marker)
        log.warning("resuming from %s instead of the newest checkpoint %s, which is damaged", found, damaged.name)
        self.resume_from, self.resume_marker = found, marker

    def resume(self) -> dict | None:
        """Load the checkpoint found at build time; returns this rank's loader state (or None)."""
        if self.verification is not None:
            self._collect_verification()
        path = self.resume_from
        if path is None:
            return None
        elastic = self._elastic()
        load_path = path
        if elastic:
            if self.dist.is_main:
                log.warning(
                    "elastic resume: %s was written by %d ranks, this run has %d; converting it to a universal "
                    "checkpoint",
                    path,
                    self.resume_marker["world_size"],
                    self.dist.world_size,
                )
                to_universal.convert(path, self.ckpt_dir / "universal")
            barrier()
            load_path = self.ckpt_dir / "universal" / path.name
        _, client = self.engine.load_checkpoint(
            str(load_path.parent), tag=load_path.name, load_lr_scheduler_states=False
        )
        if client is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        train = client["train"]
        self.step = train["step"]
        self.guard.load_state_dict({"skipped": train.get("skipped_updates", 0.0)})
        ranks = client["ranks"]
        if elastic:
            log.warning(
                "elastic resume: the global batch stays %d; accumulation %d (was %d); the samples of epoch %d not yet "
                "read are split over the %d ranks",
                self.cfg.data.global_batch,
                self.plan.grad_accum,
                train["grad_accum"],
                train["epoch"],
                self.dist.world_size,
            )
        mine = ranks[min(self.dist.rank, len(ranks) - 1)]  # the data plan in it is the same on every rank
        if not elastic:  # per-rank random states only mean something for the same rank
            set_rng_state(mine["rng"])
            self.task.load_state_dict(mine.get("task", {}))
        self.keys.truncate(self.step)
        # the same measure as the step lines (epochs done, fractional), not the loader's epoch index
        log.info("resumed from %s: step %d, epoch %.2f", path, self.step, self.step / self.plan.steps_per_epoch)
        return mine["loader"]

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: Any) -> None:
        """One micro-step: the task's forward, backward, and the optimizer at boundaries."""
        self.timer.start("fwd_bwd")
        out = self.task.forward(self.engine, batch, self.timer)
        # stand-in data (a rank that could not read in time) still runs forward and backward, to meet the
        # other ranks in the gradient collectives, but contributes nothing (the guard skips the update)
        loss = out.loss * 0.0 if getattr(batch, "void", False) else out.loss
        loss = self.faults.loss(self.step + 1, loss)
        self.guard.observe_loss(loss)
        self.engine.backward(loss)
        self.timer.stop("fwd_bwd")
        self.timer.start("optimizer")
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.guard.inject_grad = boundary and self.faults.poison_gradient(self.step + 1)
        self.engine.step()
        self.timer.stop("optimizer")
        self.meter.add(loss.detach(), out.metrics)

    def _set_lr(self) -> float:
        p = self.plan
        lr = lr_at(self.step, p.lr, p.warmup_steps, p.total_steps, self.cfg.schedule.min_lr)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def train(self) -> dict:
        if self.cfg.checkpoint.on_signal and self.own_signals:  # before the build: a stop now is a preemption
            self.signals = StopSignals(self.stop)
        try:
            return self._train()
        finally:
            if self.guard is not None:
                self.guard.close()
            if self.signals is not None:
                self.signals.restore()
            self.lock.release()

    def _train(self) -> dict:
        if not self.built:
            self.build()
        if self.dist.is_main:
            with writing(self.run_dir / "config.json"):
                (self.run_dir / "config.json").write_text(json.dumps(resolved(self.cfg, self.plan), indent=2))
        self.keys = KeyAudit(self.run_dir, self.dist.rank, self.cfg.log.sample_keys)
        self.goodput = GoodputAccount(self.run_dir, self.dist.is_main, self.clock)
        loader_state = self.resume()
        self.clock.mark("checkpoint load")
        stop = self.plan.stop_step
        if self.step >= stop:
            log.info("run already complete: step %d of %d; nothing to do", self.step, stop)
            return {"step": self.step, "complete": True}
        if any_rank(self.stop.requested, self.dist.device):  # stopped while starting: nothing new to save
            return self._preempted(saved=False)
        self.loader = make_loader(self.cfg.data.loader, self._loader_spec(), loader_state)
        if hasattr(self.engine, "micro_steps"):
            # DeepSpeed restores its step count but not its micro-step count: align its accumulation
            # boundaries with the loader's position (saves happen at boundaries: a multiple of it)
            self.engine.global_steps = self.step
            self.engine.micro_steps = self.loader.position
        self.monitor = RunMonitor(
            self.cfg, self.run_dir, self.dist.is_main, self.step, stop, self.plan.steps_per_epoch, self.task.name
        )
        f = self.cfg.fault
        self.watchdog = Watchdog(
            self.run_dir,
            self.dist.rank,
            self.dist.world_size,
            f.stall_factor,
            f.stall_min_s,
            f.stall_exit_s,
            f.heartbeat_s,
        )
        self.engine.train()
        self.clock.mark("loader")
        log.info("training from step %d to %d (%d total in the schedule)", self.step, stop, self.plan.total_steps)
        startup = self.goodput.loop_started(self.step, self.run_dir / "heartbeat")
        if self.dist.is_main:
            log.info("%s", startup)
        outcome = "error"
        try:
            try:
                outcome = self._loop(stop)
            except VoidSteps as void:
                outcome = self._stop_transient(void.first)
            if outcome == "preempted":
                result = {"step": self.step, "complete": False, "preempted": True}
            elif outcome == "transient":
                result = {"step": self.step, "complete": False, "transient": True}
            else:
                result = self._finish(stop)  # (an evaluation or figure overlaps the last write)
                self._wait_for_saves()
        finally:
            self.checkpoints.close()
            self.monitor.close()
            self.watchdog.close()
            self.goodput.write(outcome)
        if self.dist.is_main:
            log.info("summary\n%s", self.monitor.summary(result))
            log.info("%s (%s)", self.goodput.end_line(), self.goodput.path)
        return result

    def _finish(self, stop: int) -> dict:
        if self.dist.is_main:
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
            if self.cfg.log.reconstructions:
                self._save_figure(self.run_dir / "reconstructions.png")
        t0 = time.perf_counter()
        result = self.task.finish(
            self.engine, {"step": self.step, "epoch": self.loader.epoch, "complete": self.step >= stop}
        )
        self.goodput.add("evaluation", time.perf_counter() - t0)
        result.pop("epoch", None)  # (the loader's count stops short of a final epoch end)
        if "eval" in result:
            self.monitor.record_eval(
                {"step": self.step, "epoch": self.loader.epoch, "final": True, **result.pop("eval")}
            )
        return result

    def _preempted(self, saved: bool) -> dict:
        if self.dist.is_main:
            with writing(self.run_dir / "PREEMPTED"):
                (self.run_dir / "PREEMPTED").write_text(f"{self.step}\n")
        what = "checkpoint saved" if saved else "nothing new to save"
        log.warning("stopped by a signal at step %d; %s; exiting 0", self.step, what)
        return {"step": self.step, "complete": False, "preempted": True}

    def _loop(self, stop: int) -> str:
        self.last_save = self.step
        window_start, window_steps = time.perf_counter(), 0
        lr = self._set_lr()
        self._snapshot()
        if isinstance(self.syncs, SyncSpy):
            self.syncs.host.update(id(t) for t in self.guard.host_buffers())
        while self.step < stop:
            batches = iter(self.loader)
            while True:
                micro = self.loader.position + 1  # 1-based index of the micro-batch about to be taken
                boundary = micro % self.plan.grad_accum == 0
                logs = boundary and ((self.step + 1) % self.cfg.log.interval == 0 or self.step + 1 == stop)
                counted = self.sync_check and not logs  # the whole step, next(loader) included
                with self.syncs.window(counted):
                    fetch = time.perf_counter()
                    batch = next(batches, None)
                    if batch is not None:
                        waited = time.perf_counter() - fetch
                        self.timer.add_host("data_wait", waited)
                        self.goodput.add("data_wait", waited)
                        if batch.void:  # this rank could not read in time: every rank skips, then stops
                            self.guard.void = True
                        self.train_step(batch)
                        self.keys.record(self.step + 1, micro, batch.keys)
                if batch is None:
                    break  # the epoch ended
                if boundary:
                    with self.syncs.window(counted):
                        self.step += 1
                        window_steps += 1
                        self.faults.step_done(self.step)
                        self.watchdog.beat(self.step)
                        self.goodput.step_done(self.step)
                        self.monitor.step(self.step)
                    if logs:
                        self._log(lr, time.perf_counter() - window_start, window_steps)
                        window_start, window_steps = time.perf_counter(), 0
                    with self.syncs.window(counted):
                        action = self._react_to_flags()
                    if action == "preempt":
                        if self.last_save != self.step:
                            self.save()
                        self._wait_for_saves()
                        self._preempted(saved=True)
                        return "preempted"
                    every = self.cfg.log.figure_interval
                    if every and self.step % every == 0 and self.dist.is_main and not self.guard.void:
                        self._save_figure(self.run_dir / "figures" / f"step_{self.step:08d}.png")
                    if action == "rolled_back":
                        self.last_save = self.step
                    elif self.step % self.cfg.checkpoint.interval == 0 or self.step == stop:
                        self.save()
                    if self.step >= stop:
                        break
                    with self.syncs.window(counted):
                        lr = self._set_lr()
                        self._snapshot()
            if batch is None:  # (not a break at the last step)
                self._epoch_end()
                every = self.cfg.checkpoint.keep_every_epochs
                if every and self.loader.epoch % every == 0 and self.step < stop:
                    self.save(keep=True)
        if self.last_save != self.step:
            self.save()
        return "done"

    # ------------------------------------------------------------------ transient stops
    def _snapshot(self) -> None:
        """The state before the next step (guard step ``steps + 1``): a few dozen microseconds of host
        copies per step, no device sync. Kept for the steps whose flags the lag has not shown yet."""
        g = self.guard.steps + 1
        self.snapshots[g] = (self.step, self.loader.snapshot(), rng_state(), self.task.state_dict())
        for old in [k for k in self.snapshots if k < g - self.guard.RING]:
            del self.snapshots[old]

    def _first_void(self) -> int | None:
        """Before a save: the first guard step not yet acted on whose flags say some rank stood in
        empty data (read now, waiting for the device: saves are rare)."""
        start = max(self.flags_read, self.stale_flags_through) + 1
        for g in range(start, self.guard.steps + 1):
            flags = self.guard.flags_at(g)
            if flags is not None and flags.void:
                return g
        return None

    def _stop_transient(self, first: int) -> str:
        """Some rank could not read in time from guard step ``first`` on, and every rank skipped those
        updates: set the loader positions, RNG and task state back to the state before ``first``
        (the weights are still that state's), save it, and stop every rank alike (exit code 75)."""
        snap = self.snapshots.get(first)
        if snap is None:
            raise TransientError(f"stood in empty data since guard step {first}, whose state is no longer kept")
        voided = self.guard.steps - (first - 1)
        self.guard.skipped.sub_(voided)  # stand-ins, not non-finite steps
        self.goodput.lost_steps(voided)
        self.step, loader_state, rng, task_state = snap
        self.loader.restore_snapshot(loader_state)
        set_rng_state(rng)
        self.task.load_state_dict(task_state)
        self.flags_read = self.stale_flags_through = self.guard.steps
        self.guard.void = False
        self.meter = MetricMeter()
        if self.last_save != self.step:
            self.save()
        self._wait_for_saves()
        barrier()  # every rank's save is complete before any rank exits (the launcher stops the rest)
        if self.dist.is_main:
            with writing(self.run_dir / "PREEMPTED"):
                (self.run_dir / "PREEMPTED").write_text(f"{self.step}\ntransient\n")
        log.warning(
            "data could not be read in time on some rank (a condition of the moment outlasted "
            "data.fetch_patience_s; see its line above): %d step(s) of stand-ins undone on every rank, step %d "
            "saved, nothing recorded against the data; exiting 75: the same command continues once it clears",
            voided,
            self.step,
        )
        return "transient"

    def _epoch_end(self) -> None:
        t0 = time.perf_counter()
        with self.watchdog.held("an evaluation"):
            metrics = self.task.on_epoch_end(self.engine, self.loader.epoch)
        self.goodput.add("evaluation", time.perf_counter() - t0)
        self.engine.train()
        if metrics:
            self.monitor.record_eval({"step": self.step, "epoch": self.loader.epoch, **metrics})

    def _react_to_flags(self) -> str | None:
        """Act on the guard's flags of ``lag`` steps ago (identical on every rank)."""
        flags = self.guard.latest()
        if flags is None or flags.step <= self.stale_flags_through:
            return None  # (steps already answered by a rollback; a stop request is repeated by later steps)
        self.flags_read = max(self.flags_read, flags.step)
        if flags.void:
            raise VoidSteps(flags.step)
        if flags.bad:
            log.warning(
                "step %d: non-finite loss or gradient; update skipped (%d skipped so far, %d in a row)",
                flags.step,
                flags.skipped_total,
                flags.consecutive_bad,
            )
        if flags.consecutive_bad >= self.cfg.fault.max_bad_steps:
            self._rollback(flags.consecutive_bad)
            return "rolled_back"
        if flags.stop:
            return "preempt"
        return None

    def _rollback(self, bad: int) -> None:
        """Reload weights and optimizer state of the newest complete checkpoint; the data loader
        keeps its position, so the offending batches are stepped past, not replayed."""
        self._wait_for_saves()  # the newest checkpoint may still be being written
        path = ckpt.newest_complete(self.ckpt_dir)
        if path is None:
            raise NonFiniteError(
                f"{bad} consecutive non-finite steps at step {self.step} and no checkpoint to roll back to"
            )
        if ckpt.read_marker(path)["world_size"] != self.dist.world_size:
            raise NonFiniteError(
                f"{bad} consecutive non-finite steps; the newest checkpoint {path} is from another world size and "
                "cannot be rolled back to in this process"
            )
        if self.rollbacks >= self.cfg.fault.max_rollbacks:
            raise NonFiniteError(
                f"{bad} consecutive non-finite steps at step {self.step} after {self.rollbacks} rollbacks "
                f"(fault.max_rollbacks); stopping instead of training on"
            )
        with self.watchdog.held("a rollback"):
            _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        self.rollbacks += 1
        self.guard.reset_consecutive()
        # Flags of the steps run since the ones that triggered this (the lag) still count the bad
        # streak from before: acting on them would roll back again at once.
        self.stale_flags_through = self.guard.steps
        log.warning(
            "rolled back to %s after %d consecutive non-finite steps (rollback %d); data continues past the "
            "offending batches",
            path,
            bad,
            self.rollbacks,
        )
        self.goodput.lost_steps(self.step - client["train"]["step"])
        self.step = client["train"]["step"]
        self.meter = MetricMeter()  # the skipped steps' NaN losses are not part of any average

    # ------------------------------------------------------------------ logging and figures
    def _save_figure(self, path: Path) -> None:
        """A figure is a view of the run, never a reason to fail it: a problem is one warning line."""
        held = self.watchdog.held("a figure") if self.watchdog is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        try:
            with held, writing(path):
                written = self.task.figure(self.engine, path)
        except (DataError, TransientError) as err:  # the shards it reads (a full disk still stops the run)
            log.warning("no figure %s: %s", path.name, err.one_line())
            return
        finally:
            self.goodput.add("evaluation", time.perf_counter() - t0)
        if written:
            with writing(self.run_dir / "tensorboard"):
                self.monitor.figure(self.step, path)
            log.info("wrote %s", path)

    def _log(self, lr: float, seconds: float, steps: int) -> None:
        """One metrics line: the only place that reads values back from the device."""
        loss, parts = self.meter.mean_across_ranks()
        phases = self.timer.collect()
        seconds = max(seconds, 1e-9)
        rate = steps * self.cfg.data.global_batch / seconds
        share = {k: v / seconds for k, v in phases.items()}  # fraction of wall time per phase
        flags = self.guard.latest()
        per_image = self.plan.flops.per_image
        rec = {
            "step": self.step,
            "epoch": self.step / self.plan.steps_per_epoch,
            "lr": lr,
            "loss": loss,
            **dict(zip(self.task.metric_names, parts)),
            "img_per_s": rate,
            "mfu": rate * per_image / self.dist.world_size / self.peak if self.peak and per_image else None,
            **{f"time_{k}_s": v / max(steps, 1) for k, v in phases.items()},
            **{f"share_{k}": v for k, v in share.items()},
            "peak_mem_gb": peak_memory_gb(self.dist.device),
            "skipped_updates": flags.skipped_total if flags else 0,
            "rollbacks": self.rollbacks,
            "bad_samples": self.bad_samples,
        }
        if self.sync_check:
            rec["host_syncs_non_logging_steps"] = self.syncs.count
            rec["host_sync_sites"] = self.syncs.sites
        self.monitor.record(rec)
        self.goodput.write()
        part_txt = " ".join(f"{k.removeprefix('loss_')}={v:.4f}" for k, v in zip(self.task.metric_names, parts))
        mfu = f" mfu {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
        teacher = f" teacher {100 * share['teacher']:.0f}%" if "teacher" in share else ""  # runs that have one
        log.info(
            "step %d/%d ep %.2f lr %.3g loss %.4f%s %.1f img/s%s data %.0f%%%s",
            self.step,
            self.plan.stop_step,
            rec["epoch"],
            lr,
            loss,
            f" [{part_txt}]" if part_txt else "",
            rate,
            mfu,
            100 * share.get("data_wait", 0.0),
            teacher,
        )
