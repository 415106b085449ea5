"""The training loop. ``Trainer.train()`` owns the order (build, resume, loop, save);
``train_step`` is short and returns tensors; build steps are small named methods.

Fault handling lives here too, because it is about the order of things: resuming exactly (the
loader, RNG and mask-generator states of every rank are in the checkpoint), reacting to the
guard's lagged flags (roll back after K non-finite steps, stop cleanly on SIGTERM/SIGUSR1), and
refusing to resume under an incompatible config.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import warnings
from pathlib import Path

import torch

from data_pipeline import preflight
from data_pipeline.eval_reader import center_crop, iter_raw
from data_pipeline.loader import LoaderSpec, make_loader, read_dataset
from engine import checkpoint as ckpt
from engine.compile import try_compile
from engine.config import Config, Derived, compare_for_resume, derive, fingerprint, from_dict, to_dict
from engine.dist import DistInfo, all_gather_objects, any_rank, barrier
from engine.ds_setup import initialize, model_dtype, resolve_ds_config
from engine.flops import FlopCount, flops_for_model, peak_flops
from engine.guard import NonFiniteGuard
from engine.model import DeepMIM, build_model, random_masking, resolve_img_size, resolve_taps
from engine.monitor import KeyAudit, RunMonitor
from engine.optim import build_optimizer
from engine.registry import get_variant
from engine.rng import rng_state, seed_everything, set_rng_state
from engine.schedule import lr_at
from engine.targets import build_target
from engine.telemetry import LossMeter, PhaseTimer, peak_memory_gb
from engine.visualize import save_reconstructions

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training cannot continue without NaN/inf weights; it stops instead of continuing silently."""


class Trainer:
    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0  # optimizer steps done
        self.rollbacks = 0
        self.stale_flags_through = 0  # guard steps whose flags predate the last rollback
        self.derived: Derived | None = None
        self.built = False
        self.resume_from: Path | None = None
        self.resume_world: int | None = None
        self.loader = None

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        self._find_resume()
        self._build_data()
        self._build_target()
        self._build_model()
        self._build_engine()
        self.mask_gen = torch.Generator(device=self.dist.device)
        self.mask_gen.manual_seed(self.cfg.seed * 1_000_003 + 7 * self.dist.rank + 1)
        seed_everything(self.cfg.seed + self.dist.rank)
        self.built = True

    def _find_resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return
        if mode == "auto":
            self.resume_from = ckpt.newest_complete(self.ckpt_dir)
        else:
            path = Path(mode)
            if not (path / ckpt.MARKER).is_file():
                raise ckpt.CheckpointError(f"checkpoint.resume={mode!r}: not a complete checkpoint (no {ckpt.MARKER})")
            self.resume_from = path
        if self.resume_from is not None:
            marker = ckpt.read_marker(self.resume_from)
            self.resume_world = marker["world_size"]
            self.resume_marker = marker
            if "config" in marker:  # refuse an incompatible config before building anything
                self._check_config(from_dict(marker["config"]))

    def _build_data(self) -> None:
        """Preflight (shared by all ranks) -> the sample list every rank trains on -> batch maths."""
        raw = read_dataset(self.cfg.data.shards)
        view_dir = self.run_dir / "data_view"
        self.dataset = preflight.run(
            raw, self.cfg.fault.data_checks, view_dir, self.dist.rank, self.dist.world_size,
            lambda obj: all_gather_objects(obj, self.dist.world_size), barrier,
        )  # fmt: skip
        self.bad_samples = self.dataset.total_samples - self.dataset.num_samples
        if self.bad_samples:
            log.warning("data: %d of %d samples skipped as unreadable (listed in %s)", self.bad_samples,
                        self.dataset.total_samples, view_dir / "bad_samples.json")  # fmt: skip
        preflight.check_threshold(self.dataset, self.cfg.fault.max_bad_sample_share, view_dir)
        self.view_dir = view_dir
        self.derived = derive(self.cfg, self.dist.world_size, self.dataset.num_samples)
        d = self.derived
        log.info(
            "data: %d samples in %d shards; %d ranks x micro-batch %d x accumulation %d = global batch %d; "
            "%d steps/epoch (%d samples/epoch left out so ranks take equal steps); lr %.3g",
            self.dataset.num_samples, len(self.dataset.shards), d.world_size, self.cfg.data.micro_batch,
            d.grad_accum, self.cfg.data.global_batch, d.steps_per_epoch, d.dropped_per_epoch, d.lr,
        )  # fmt: skip

    def _build_target(self) -> None:
        """Targets first: a teacher's width decides the decoders' prediction width."""
        self.spec = get_variant(self.cfg.model.arch)
        self.img_size = resolve_img_size(self.cfg, self.spec)
        num_taps = len(resolve_taps(self.cfg, self.spec))
        self.target, self.pred_dim, self.target_ref = build_target(self.cfg, self.spec, self.img_size, num_taps)
        if self.target_ref["kind"] != "pixel":
            log.info("target %s from %s (sha256 %s...)", self.target_ref["kind"], self.target_ref["path"],
                     self.target_ref["sha256"][:12])  # fmt: skip
        if self.resume_from is not None and "target" in self.resume_marker:
            self._check_target(self.resume_marker["target"])

    def _build_model(self) -> None:
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank
        self.model: DeepMIM = build_model(self.cfg, self.pred_dim)
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("model %s taps %s: %.2fM trainable parameters", self.cfg.model.arch, self.model.taps, n_params / 1e6)

    def _build_engine(self) -> None:
        self.ds_config = resolve_ds_config(self.cfg, self.derived)
        if self.resume_world is not None and self.resume_world != self.dist.world_size:
            self.ds_config["checkpoint"] = {"load_universal": True}  # elastic resume, see resume()
        self.dtype = model_dtype(self.ds_config)
        self.model.to(self.dist.device)
        o = self.cfg.optim
        optimizer = build_optimizer(self.model, self.derived.lr, o.weight_decay, o.betas, o.eps)
        self.engine = initialize(self.model, optimizer, self.ds_config)
        lag = self.cfg.debug.flag_lag if self.cfg.debug.flag_lag >= 0 else None
        self.guard = NonFiniteGuard(self.engine.optimizer, self.dist.device, lag=lag)
        teacher = getattr(self.target, "module", None)
        if teacher is not None:  # frozen, outside the optimizer and ZeRO; same device, engine dtype
            teacher.to(self.dist.device, self.dtype)
        self.compiled, self.compile_error = False, ""
        if self.cfg.engine.compile:
            self._compile()
        self.flops = self._count_flops()
        on_gpu = self.dist.device.type == "cuda"
        self.peak = (
            peak_flops(torch.cuda.get_device_name(self.dist.device), self.cfg.engine.peak_tflops) if on_gpu else None
        )
        log.info("model FLOPs per image: %.1f GFLOP (%s)", self.flops.per_image / 1e9,
                 ", ".join(f"{k} {v:.0%}" for k, v in self.flops.shares().items()))  # fmt: skip

    def _compile(self) -> None:
        """Regional torch.compile of student and teacher blocks, probed on a batch of the real shape."""
        e, n = self.cfg.engine, self.cfg.data.micro_batch
        dev = self.dist.device
        imgs = torch.randn(n, 3, self.img_size, self.img_size, device=dev, dtype=self.dtype, requires_grad=True)
        masks = random_masking(n, self.model.num_patches, self.cfg.mask.ratio, torch.Generator(dev).manual_seed(0), dev)
        modules = [self.model] + ([self.target.module] if getattr(self.target, "module", None) is not None else [])

        def step() -> torch.Tensor:
            targets = self.target(imgs.detach().float(), masks)
            return self.model(imgs, masks, targets)[0]

        self.compiled, self.compile_error = try_compile(modules, e.compile_backend, e.compile_mode, step, imgs)

    def _count_flops(self) -> FlopCount:
        f = flops_for_model(self.model, self.cfg.mask.ratio, self.target_ref, self.img_size)
        if self.target_ref["kind"] == "mixed":  # the generator: one MAE forward, no backward
            g = flops_for_model(self.target.module, self.cfg.mask.ratio, None, self.img_size)
            f = FlopCount(f.encoder_macs, f.decoder_macs, g.encoder_macs + g.decoder_macs)
        return f

    def _loader_spec(self) -> LoaderSpec:
        d = self.cfg.data
        gpu = self.dist.device.type == "cuda"
        decode = "gpu" if (d.decode_device == "gpu" or (d.decode_device == "auto" and gpu)) else "cpu"
        if decode == "gpu" and not gpu:
            raise ValueError("data.decode_device=gpu but no CUDA device is available; use auto or cpu")
        return LoaderSpec(
            shards=d.shards,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            micro_batch=d.micro_batch,
            micro_steps_per_epoch=self.derived.micro_steps_per_epoch,
            img_size=self.img_size,
            seed=self.cfg.seed,
            num_threads=d.num_threads,
            decode_device=decode,
            device_id=self.dist.local_rank if gpu else None,
            crop_scale=(d.crop_scale[0], d.crop_scale[1]),
            crop_ratio=(d.crop_ratio[0], d.crop_ratio[1]),
            shuffle_buffer=d.shuffle_buffer,
            view=str(self.view_dir),
        )

    # ------------------------------------------------------------------ state
    def _client_state(self) -> dict:
        """Everything besides weights and optimizer state; per-rank parts gathered to all ranks."""
        mine = {"loader": self.loader.state_dict(), "rng": rng_state(), "mask_gen": self.mask_gen.get_state()}
        ranks = all_gather_objects(mine, self.dist.world_size)
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "train": {
                "step": self.step,
                "epoch": self.loader.epoch,
                "position": self.loader.position,
                "steps_per_epoch": self.derived.steps_per_epoch,
                "grad_accum": self.derived.grad_accum,
                "skipped_updates": self.guard.state_dict()["skipped"],
                "rollbacks": self.rollbacks,
            },
            "config": to_dict(self.cfg),
            "config_fingerprint": fingerprint(self.cfg),
            "target": self.target_ref,
            "world_size": self.dist.world_size,
            "ranks": ranks,
        }

    def _check_finite_weights(self) -> None:
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        if not bool(torch.isfinite(torch.stack(norms).float()).all()):  # one sync, at save time only
            raise NonFiniteError(f"weights are not finite at step {self.step}; not saving them")

    def save(self, keep: bool = False) -> Path:
        self._check_finite_weights()
        self.keys.flush()  # before the marker: a complete checkpoint never lacks its steps' keys
        tag = ckpt.tag_for(self.step)
        state = self._client_state()
        t0 = time.perf_counter()
        error = None
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state, save_latest=False)
        except Exception as err:  # disk full, permissions, a file in the way: never half-succeed
            error = err
        if any_rank(error is not None, self.dist.device):
            raise ckpt.CheckpointError(
                f"saving checkpoint {tag} failed ({error or 'on another rank'}); the earlier checkpoints in "
                f"{self.ckpt_dir} are untouched and the newest complete one is used on resume"
            ) from error
        path = self.ckpt_dir / tag
        if self.cfg.debug.pause_before_marker_s:
            time.sleep(self.cfg.debug.pause_before_marker_s)  # fault drill: a window to kill a save in
        if self.dist.is_main:
            info = {"step": self.step, "epoch": self.loader.epoch, "world_size": self.dist.world_size, "keep": keep}
            # the config travels in the marker too, so a resume can refuse it before loading anything
            info.update(config=to_dict(self.cfg), config_fingerprint=fingerprint(self.cfg), target=self.target_ref)
            ckpt.mark_complete(path, info)
            ckpt.apply_retention(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        barrier()
        log.info("saved checkpoint %s in %.1fs%s", path, time.perf_counter() - t0, " (kept)" if keep else "")
        return path

    def resume(self) -> dict | None:
        """Load the checkpoint found at build time; returns this rank's loader state (or None)."""
        path = self.resume_from
        if path is None:
            return None
        elastic = self.resume_world != self.dist.world_size
        load_path = path
        if elastic:
            if self.dist.is_main:
                log.warning("elastic resume: %s was written by %d ranks, this run has %d; converting it to a "
                            "universal checkpoint", path, self.resume_world, self.dist.world_size)  # fmt: skip
                ckpt.to_universal(path, self.ckpt_dir / "universal")
            barrier()
            load_path = self.ckpt_dir / "universal" / path.name
        _, client = self.engine.load_checkpoint(
            str(load_path.parent), tag=load_path.name, load_lr_scheduler_states=False
        )
        if client is None:
            raise ckpt.CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        train = client["train"]
        self.step = train["step"]
        self.guard.load_state_dict({"skipped": train.get("skipped_updates", 0.0)})
        ranks = client["ranks"]
        if elastic:
            loader_state = self._elastic_loader_state(train)
            if self.dist.rank < len(ranks):
                set_rng_state(ranks[self.dist.rank]["rng"])
        else:
            mine = ranks[self.dist.rank]
            set_rng_state(mine["rng"])
            self.mask_gen.set_state(mine["mask_gen"])
            loader_state = mine["loader"]
        self.keys.truncate(self.step)
        log.info("resumed from %s: step %d, epoch %d, position %d", path, self.step, train["epoch"], train["position"])
        return loader_state

    def _elastic_loader_state(self, train: dict) -> dict:
        """Same epoch and the same number of optimizer steps into it; the remaining samples of
        this one epoch come in another order (the ranks' slices changed)."""
        steps_in_epoch = train["position"] // train["grad_accum"]
        position = min(steps_in_epoch, self.derived.steps_per_epoch) * self.derived.grad_accum
        log.warning("elastic resume: epoch %d continues at step %d of %d with accumulation %d (was %d)",
                    train["epoch"], steps_in_epoch, self.derived.steps_per_epoch, self.derived.grad_accum,
                    train["grad_accum"])  # fmt: skip
        return {"kind": "none", "epoch": train["epoch"], "position": position}

    def _check_config(self, saved: Config) -> None:
        errors, changes, harmless = compare_for_resume(saved, self.cfg)
        if errors:
            raise ckpt.CheckpointError(
                "cannot resume: incompatible config change(s): " + "; ".join(errors) + " (start a new run_dir instead)"
            )
        for line in changes:
            log.warning("resuming with a changed setting that alters training: %s", line)
        for line in harmless:
            log.info("resuming with a changed setting: %s", line)

    def _check_target(self, saved: dict) -> None:
        now = self.target_ref
        if saved.get("sha256") != now.get("sha256"):
            raise ckpt.CheckpointError(
                f"cannot resume: the {now['kind']} teacher changed (checkpoint: {saved.get('path')} sha256 "
                f"{str(saved.get('sha256'))[:12]}; now: {now.get('path')} sha256 {str(now.get('sha256'))[:12]})"
            )

    # ------------------------------------------------------------------ loop
    def train_step(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-step: mask, targets, forward+backward, and the optimizer at boundaries."""
        n = imgs.shape[0]
        masks = random_masking(n, self.model.num_patches, self.cfg.mask.ratio, self.mask_gen, imgs.device)
        self.timer.start("teacher")
        targets = self.target(imgs, masks)
        self.timer.stop("teacher")
        self.timer.start("fwd_bwd")
        loss, taps, _ = self.engine(imgs.to(self.dtype), masks, targets)
        if self.step + 1 in self._nan_loss_pending:  # fault drill (once per step number)
            loss = loss * float("nan")
        self.guard.observe_loss(loss)
        self.engine.backward(loss)
        self.timer.stop("fwd_bwd")
        self.timer.start("optimizer")
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.guard.inject_grad = boundary and self.step + 1 in self._nan_grad_pending
        self.engine.step()
        if boundary:
            self._nan_loss_pending.discard(self.step + 1)
            self._nan_grad_pending.discard(self.step + 1)
        self.timer.stop("optimizer")
        return loss.detach(), taps.detach()

    def _train_step_counting_syncs(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """train_step under CUDA's sync debug mode; synchronizing calls are counted, not fatal."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = self.train_step(imgs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        self.sync_count += len(syncs)
        if syncs and not self.sync_examples:
            self.sync_examples = [f"{w.filename}:{w.lineno}" for w in syncs[:5]]
        return out

    def _set_lr(self) -> float:
        d = self.derived
        lr = lr_at(self.step, d.lr, d.warmup_steps, d.total_steps, self.cfg.schedule.min_lr)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train(self) -> dict:
        if not self.built:
            self.build()
        if self.dist.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        self.keys = KeyAudit(self.run_dir, self.dist.rank, self.cfg.log.sample_keys)
        loader_state = self.resume()
        stop = self.derived.stop_step
        if self.step >= stop:
            log.info("run already complete: step %d of %d; nothing to do", self.step, stop)
            return {"step": self.step, "complete": True}
        self.loader = make_loader(self.cfg.data.loader, self._loader_spec(), loader_state)
        self.monitor = RunMonitor(
            self.cfg, self.run_dir, self.dist.is_main, self.step, stop, self.derived.steps_per_epoch
        )
        self.timer = PhaseTimer(self.dist.device)
        self.meter = LossMeter()
        self.sync_check = self.cfg.log.sync_debug and self.dist.device.type == "cuda"
        self.sync_count, self.sync_examples = 0, []
        self._nan_loss_pending = set(self.cfg.debug.nan_loss_steps)
        self._nan_grad_pending = set(self.cfg.debug.nan_grad_steps)
        self._install_signal_handlers()
        self.engine.train()
        log.info("training from step %d to %d (%d total in the schedule)", self.step, stop, self.derived.total_steps)
        try:
            outcome = self._loop(stop)
            if outcome == "preempted":
                result = {"step": self.step, "complete": False, "preempted": True}
            else:
                if self.dist.is_main:
                    (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
                    if self.cfg.log.reconstructions:
                        self._save_figure(self.run_dir / "reconstructions.png")
                result = {"step": self.step, "complete": self.step >= stop}
        finally:
            self.monitor.close()
        if self.dist.is_main:
            log.info("summary\n%s", self.monitor.summary(result))
        return result

    def _loop(self, stop: int) -> str:
        last_save = self.step
        window_start, window_steps = time.perf_counter(), 0
        lr = self._set_lr()
        while self.step < stop:
            fetch = time.perf_counter()
            for batch in self.loader:
                self.timer.add_host("data_wait", time.perf_counter() - fetch)
                micro = self.loader.position  # 1-based index of this micro-batch in the epoch
                boundary = micro % self.derived.grad_accum == 0
                logs = boundary and ((self.step + 1) % self.cfg.log.interval == 0 or self.step + 1 == stop)
                if self.sync_check and not logs:
                    loss, taps = self._train_step_counting_syncs(batch.img)
                else:
                    loss, taps = self.train_step(batch.img)
                self.meter.add(loss, taps)
                self.keys.record(self.step + 1, micro, batch.keys)
                if boundary:
                    self.step += 1
                    window_steps += 1
                    self.monitor.step(self.step)
                    if self.cfg.debug.step_sleep_s:
                        time.sleep(self.cfg.debug.step_sleep_s)
                    if logs:
                        self._log(lr, time.perf_counter() - window_start, window_steps)
                        window_start, window_steps = time.perf_counter(), 0
                    action = self._react_to_flags()
                    if action == "preempt":
                        if last_save != self.step:
                            self.save()
                        if self.dist.is_main:
                            (self.run_dir / "PREEMPTED").write_text(f"{self.step}\n")
                        log.warning("stopped by a signal at step %d; checkpoint saved; exiting 0", self.step)
                        return "preempted"
                    every = self.cfg.log.figure_interval
                    if every and self.step % every == 0 and self.dist.is_main:
                        self._save_figure(self.run_dir / "figures" / f"step_{self.step:08d}.png")
                    if action == "rolled_back":
                        last_save = self.step
                    elif self.step % self.cfg.checkpoint.interval == 0 or self.step == stop:
                        self.save()
                        last_save = self.step
                    if self.step >= stop:
                        break
                    lr = self._set_lr()
                fetch = time.perf_counter()
            else:  # the epoch ended
                every = self.cfg.checkpoint.keep_every_epochs
                if every and self.loader.epoch % every == 0 and self.step < stop:
                    self.save(keep=True)
                    last_save = self.step
        if last_save != self.step:
            self.save()
        return "done"

    def _react_to_flags(self) -> str | None:
        """Act on the guard's flags of ``lag`` steps ago (identical on every rank)."""
        flags = self.guard.latest()
        if flags is None or flags.step <= self.stale_flags_through:
            return None  # (steps already answered by a rollback; a stop request is repeated by later steps)
        if flags.bad:
            log.warning("step %d: non-finite loss or gradient; update skipped (%d skipped so far, %d in a row)",
                        flags.step, flags.skipped_total, flags.consecutive_bad)  # fmt: skip
        if flags.consecutive_bad >= self.cfg.fault.max_bad_steps:
            self._rollback(flags.consecutive_bad)
            return "rolled_back"
        if flags.stop:
            return "preempt"
        return None

    def _rollback(self, bad: int) -> None:
        """Reload weights and optimizer state of the newest complete checkpoint; the data loader
        keeps its position, so the offending batches are stepped past, not replayed."""
        path = ckpt.newest_complete(self.ckpt_dir)
        if path is None:
            raise NonFiniteError(
                f"{bad} consecutive non-finite steps at step {self.step} and no checkpoint to roll back to"
            )
        if ckpt.read_marker(path)["world_size"] != self.dist.world_size:
            raise NonFiniteError(f"{bad} consecutive non-finite steps; the newest checkpoint {path} is from another "
                                 "world size and cannot be rolled back to in this process")  # fmt: skip
        if self.rollbacks >= self.cfg.fault.max_rollbacks:
            raise NonFiniteError(
                f"{bad} consecutive non-finite steps at step {self.step} after {self.rollbacks} rollbacks "
                f"(fault.max_rollbacks); stopping instead of training on"
            )
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        self.rollbacks += 1
        self.guard.reset_consecutive()
        # Flags of the steps run since the ones that triggered this (the lag) still count the bad
        # streak from before: acting on them would roll back again at once.
        self.stale_flags_through = self.guard.steps
        log.warning("rolled back to %s after %d consecutive non-finite steps (rollback %d); data continues past "
                    "the offending batches", path, bad, self.rollbacks)  # fmt: skip
        self.step = client["train"]["step"]
        self.meter = LossMeter()  # the skipped steps' NaN losses are not part of any average

    def _install_signal_handlers(self) -> None:
        if not self.cfg.checkpoint.on_signal:
            return

        def handler(signum, _frame) -> None:
            if not self.guard.stop_requested:
                log.warning(
                    "received %s: finishing the current step, then saving and exiting", signal.Signals(signum).name
                )
            self.guard.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    # ------------------------------------------------------------------ logging and figures
    def _save_figure(self, path: Path, count: int = 6) -> None:
        """Reconstructions (pixel, mixed) or similarity maps (CLIP) of one center-cropped image of
        each of the first classes; rank 0 only, no collectives (ZeRO-2 keeps full weights per rank)."""
        picked, seen = [], set()
        for _, label, data in iter_raw(self.cfg.data.shards):
            if label not in seen:
                seen.add(label)
                picked.append(center_crop(data, self.img_size))
            if len(picked) == count:
                break
        imgs = torch.stack(picked).to(self.dist.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_reconstructions(
            self.model, imgs, self.cfg.mask.ratio, self.cfg.target.norm_pix, path, self.cfg.seed, self.target
        )
        self.monitor.figure(self.step, path)
        log.info("wrote %s", path)

    def _log(self, lr: float, seconds: float, steps: int) -> None:
        """One metrics line: the only place that reads values back from the device."""
        loss, taps = self.meter.mean_across_ranks()
        phases = self.timer.collect()
        seconds = max(seconds, 1e-9)
        rate = steps * self.cfg.data.global_batch / seconds
        share = {k: v / seconds for k, v in phases.items()}  # fraction of wall time per phase
        flags = self.guard.latest()
        rec = {
            "step": self.step,
            "epoch": self.step / self.derived.steps_per_epoch,
            "lr": lr,
            "loss": loss,
            **{f"loss_tap{t}": v for t, v in zip(self.model.taps, taps)},
            "img_per_s": rate,
            "mfu": rate * self.flops.per_image / self.dist.world_size / self.peak if self.peak else None,
            **{f"time_{k}_s": v / max(steps, 1) for k, v in phases.items()},
            **{f"share_{k}": v for k, v in share.items()},
            "peak_mem_gb": peak_memory_gb(self.dist.device),
            "skipped_updates": flags.skipped_total if flags else 0,
            "rollbacks": self.rollbacks,
            "bad_samples": self.bad_samples,
        }
        if self.sync_check:
            rec["host_syncs_non_logging_steps"] = self.sync_count
            rec["host_sync_sites"] = self.sync_examples
        self.monitor.record(rec)
        tap_txt = " ".join(f"t{t}={v:.4f}" for t, v in zip(self.model.taps, taps))
        mfu = f" mfu {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
        log.info(
            "step %d/%d ep %.2f lr %.3g loss %.4f [%s] %.1f img/s%s data %.0f%% teacher %.0f%%",
            self.step, self.derived.stop_step, rec["epoch"], lr, loss, tap_txt, rate, mfu,
            100 * share.get("data_wait", 0.0), 100 * share.get("teacher", 0.0),
        )  # fmt: skip
