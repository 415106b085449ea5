"""The training loop, for any task. ``Trainer.train()`` owns the order (build, resume, loop, save);
a micro-step is ``task.forward`` + backward + the engine's step; every attribute of the trainer is
declared in ``__init__``.

The trainer wires components that own their state: the data and plan (``engine.loop.data_build``),
the saves (``engine.loop.checkpointing``), the choice and load of a checkpoint to resume
(``engine.loop.resume``), the reactions to the guard's lagged flags: rollbacks, preemption, undone
stand-in steps (``engine.loop.recovery``), the metrics line (``engine.observe.step_log``) and the
goodput account (``engine.observe.goodput``). What stays here is the order of things.

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

from data_pipeline.loaders.base import EpochLoader
from data_pipeline.loaders.factory import make_loader
from engine.config import Config, RunPlan, resolved
from engine.disk import writing
from engine.errors import DataError, NonFiniteError, TransientError
from engine.loop.checkpointing import Checkpointer, run_state
from engine.loop.data_build import RunData, build_data, check_against, loader_spec
from engine.loop.dist import DistInfo, any_rank, barrier
from engine.loop.ds_setup import native_cpu_bf16, precision_reason, resolve_ds_config, resolve_precision
from engine.loop.engines import EngineFactory, align_step_counts, build_engine, deepspeed_engine
from engine.loop.faults import NoFaults, fault_injector
from engine.loop.guard import NonFiniteGuard
from engine.loop.recovery import Recovery, VoidSteps
from engine.loop.resume import check_config, choose_resume, load_resumed, resume_marker, settle_verification
from engine.loop.rng import seed_everything, set_rng_state
from engine.loop.runlock import RunLock, lock_run_folder
from engine.loop.schedule import lr_at
from engine.loop.signals import StopRequest, StopSignals
from engine.loop.syncs import SyncSpy, sync_counter
from engine.loop.task import Task, TaskContext
from engine.loop.watchdog import Watchdog
from engine.loop.zero_adapter import adapter_for
from engine.models.flops import peak_flops
from engine.observe.goodput import GoodputAccount, StartupClock
from engine.observe.monitor import KeyAudit, RunMonitor
from engine.observe.step_log import StepLog
from engine.run_folder import checkpoints as ckpt

log = logging.getLogger(__name__)


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
        self.last_save = 0  # the step of the newest checkpoint this process wrote or resumed from
        # built by build()
        self.built = False
        self.resume_from: Path | None = None
        self.verification: ckpt.Verification | None = None  # of resume_from's files, still running
        self.resume_marker: dict | None = None
        self.data: RunData | None = None
        self.plan: RunPlan | None = None
        self.ds_config: dict = {}
        self.engine: Any = None
        self.checkpoints: Checkpointer | None = None
        self.dtype = torch.float32
        self.guard: NonFiniteGuard | None = None
        self.recovery: Recovery | None = None
        self.compiled, self.compile_error = False, ""
        self.precision = "bf16"  # engine.precision as resolved in _build_engine (recorded in each checkpoint)
        self.peak: float | None = None
        # built by train()
        self.signals: StopSignals | None = None
        self.loader: EpochLoader | None = None
        self.keys: KeyAudit | None = None
        self.monitor: RunMonitor | None = None
        self.steplog = StepLog(dist.device, cfg.data.global_batch, dist.world_size)
        self.watchdog: Watchdog | None = None
        self.sync_check = cfg.log.sync_debug  # count host-device syncs on the steps that do not log
        self.syncs = sync_counter(dist.device, self.sync_check)

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        lock_run_folder(self.lock, self.run_dir, self.dist, self.cfg.checkpoint.resume)
        # the newest checkpoint's files are verified in the background while data, model and engine build
        self.resume_from, self.verification = choose_resume(self.cfg.checkpoint.resume, self.ckpt_dir, self.dist)
        if self.resume_from is not None:
            self.resume_marker = resume_marker(self.resume_from)
            if "config" in self.resume_marker:  # refuse an incompatible config before building anything
                check_config(self.resume_marker["config"], self.cfg)
        self.clock.mark("run folder and checkpoint choice")
        self.data = build_data(self.cfg, self.dist, self.view_dir, self.resume_marker)
        self.plan = self.data.plan
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

    def _build_engine(self) -> None:
        trained_in = (self.resume_marker or {}).get("precision")
        decision = (self.cfg.engine.precision, self.dist.device.type, trained_in, native_cpu_bf16())
        self.precision, why = resolve_precision(*decision)
        if self.dist.is_main:
            log.info("precision %s (%s)", self.precision, precision_reason(*decision))
            if why:
                log.warning("%s", why)
        self.ds_config = resolve_ds_config(self.cfg, self.plan, self.precision)
        if self.cfg.optim.name != "adamw":  # ZeRO-2 partitions any torch optimizer; DeepSpeed asks to be told
            self.ds_config["zero_allow_untested_optimizer"] = True
        if self._elastic():
            self.ds_config["checkpoint"] = {"load_universal": True}  # elastic resume, see resume()
        module = self.task.module
        module.to(self.dist.device)
        optimizer = self.task.make_optimizer(self.task.param_groups(), self.plan.lr)
        self.engine, self.dtype = build_engine(self.engine_factory, module, optimizer, self.ds_config)
        self.checkpoints = Checkpointer(self.engine, self.dist, self.ckpt_dir, self.cfg.checkpoint, self.faults)
        lag = self.cfg.debug.flag_lag if self.cfg.debug.flag_lag >= 0 else None
        self.guard = NonFiniteGuard(adapter_for(self.engine.optimizer), self.dist.device, self.stop, lag=lag)
        self.recovery = Recovery(self.cfg.fault, self.guard)
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

    # ------------------------------------------------------------------ saves
    def _check_finite_weights(self) -> None:
        norms = torch._foreach_norm([p.detach() for p in self.task.module.parameters()])
        if not bool(torch.isfinite(torch.stack(norms).float()).all()):  # one sync, at save time only
            raise NonFiniteError(f"weights are not finite at step {self.step}; not saving them")

    def save(self, keep: bool = False) -> Path:
        first = self.recovery.first_void()
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
        progress = {"step": self.step, "skipped_updates": self.guard.state_dict()["skipped"]}
        progress["rollbacks"] = self.recovery.rollbacks
        client, info = run_state(self.cfg, self.dist, self.plan, self.loader, self.task, self.precision, progress, keep)
        return self.checkpoints.save(self.step, client, info)

    def _wait_for_saves(self) -> None:
        """The checkpoint write in flight is complete on every rank (an asynchronous save)."""
        t0 = time.perf_counter()
        with self.watchdog.held("a checkpoint write") if self.watchdog is not None else contextlib.nullcontext():
            self.checkpoints.wait()
        self.goodput.add("checkpoint", time.perf_counter() - t0)

    def resume(self) -> dict | None:
        """Load the checkpoint chosen at build time; returns this rank's loader state (or None)."""
        if self.verification is not None:
            check, self.verification = self.verification, None
            older = settle_verification(check, self.resume_marker, self.ckpt_dir, self.dist)
            if older is not None:  # the newest was damaged: the one before, checked as the build checked it
                self.resume_from, self.resume_marker = older
                if "config" in self.resume_marker:
                    check_config(self.resume_marker["config"], self.cfg)
                self.task.check_resume(self.resume_marker)
                check_against(self.cfg, self.data, self.resume_marker)
        path = self.resume_from
        if path is None:
            return None
        elastic = self._elastic()
        client = load_resumed(self.engine, path, self.resume_marker, self.ckpt_dir, self.dist)
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
        timer = self.steplog.timer
        timer.start("fwd_bwd")
        out = self.task.forward(self.engine, batch, timer)
        # stand-in data (a rank that could not read in time) still runs forward and backward, to meet the
        # other ranks in the gradient collectives, but contributes nothing (the guard skips the update)
        loss = out.loss * 0.0 if getattr(batch, "void", False) else out.loss
        loss = self.faults.loss(self.step + 1, loss)
        self.guard.observe_loss(loss)
        self.engine.backward(loss)
        timer.stop("fwd_bwd")
        timer.start("optimizer")
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.guard.inject_grad = boundary and self.faults.poison_gradient(self.step + 1)
        self.engine.step()
        timer.stop("optimizer")
        self.steplog.meter.add(loss.detach(), out.metrics)

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
        spec = loader_spec(self.cfg, self.dist, self.data, self.task, self.view_dir)
        self.loader = make_loader(self.cfg.data.loader, spec, loader_state)
        align_step_counts(self.engine, self.step, self.loader.position)
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
        startup = self.goodput.loop_started(self.step)
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
        lr = self._set_lr()
        self.recovery.snapshot(self.step, self.loader, self.task)
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
                        self.steplog.timer.add_host("data_wait", waited)
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
                        self.steplog.step_done()
                        self.faults.step_done(self.step)
                        self.watchdog.beat(self.step)
                        self.goodput.step_done(self.step)
                        self.monitor.step(self.step)
                    if logs:
                        self._log(lr)
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
                        self.recovery.snapshot(self.step, self.loader, self.task)
            if batch is None:  # (not a break at the last step)
                self._epoch_end()
                every = self.cfg.checkpoint.keep_every_epochs
                if every and self.loader.epoch % every == 0 and self.step < stop:
                    self.save(keep=True)
        if self.last_save != self.step:
            self.save()
        return "done"

    # ------------------------------------------------------------------ recovery
    def _stop_transient(self, first: int) -> str:
        """Some rank could not read in time from guard step ``first`` on, and every rank skipped those
        updates: go back to the state before ``first``, save it, and stop every rank alike (exit 75)."""
        self.step, voided = self.recovery.undo_void(first, self.loader, self.task)
        self.goodput.lost_steps(voided)
        self.steplog.forget_losses()
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
        action = self.recovery.react()
        if action is None:
            return None
        what, bad = action
        if what == "preempt":
            return "preempt"
        self._wait_for_saves()  # the newest checkpoint may still be being written
        with self.watchdog.held("a rollback"):
            _, step = self.recovery.rollback(bad, self.step, self.engine, self.ckpt_dir, self.dist.world_size)
        self.goodput.lost_steps(self.step - step)
        self.step = step
        self.steplog.forget_losses()  # the skipped steps' NaN losses are not part of any average
        return "rolled_back"

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

    def _log(self, lr: float) -> None:
        """One metrics line: the only place that reads values back from the device."""
        flags = self.guard.latest()
        extra = {
            "skipped_updates": flags.skipped_total if flags else 0,
            "rollbacks": self.recovery.rollbacks,
            "bad_samples": self.data.bad_samples,
        }
        if self.sync_check:
            extra["host_syncs_non_logging_steps"] = self.syncs.count
            extra["host_sync_sites"] = self.syncs.sites
        p = self.plan
        rec = self.steplog.line(
            self.step, p.steps_per_epoch, p.stop_step, lr, extra, self.peak, p.flops.per_image, self.task.metric_names
        )
        self.monitor.record(rec)
        self.goodput.write()
