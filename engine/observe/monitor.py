"""Watching a run: the rank-0 progress bar, metrics.jsonl, TensorBoard, periodic figures, the
exit summary, and the per-rank sample-key audit log.

Nothing here reads the device: the trainer hands over values it has already read on logging
steps, and the progress bar advances on the host clock alone.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from engine.disk import writing

log = logging.getLogger(__name__)

# metrics.jsonl field -> TensorBoard tag
TB_TAGS = {
    "loss": "loss/total",
    "lr": "optim/lr",
    "img_per_s": "speed/img_per_s",
    "mfu": "speed/mfu",
    "share_data_wait": "time/data_wait_share",
    "share_fwd_bwd": "time/fwd_bwd_share",
    "share_optimizer": "time/optimizer_share",
    "share_teacher": "time/teacher_share",
    "peak_mem_gb": "memory/peak_gb",
    "skipped_updates": "faults/skipped_updates",
    "rollbacks": "faults/rollbacks",
    "bad_samples": "faults/bad_samples",
}


class RunMonitor:
    def __init__(
        self,
        cfg,
        run_dir: Path,
        is_main: bool,
        start_step: int,
        stop_step: int,
        steps_per_epoch: int,
        desc: str = "train",
    ):
        self.cfg, self.run_dir, self.is_main = cfg, run_dir, is_main
        self.start_step, self.stop_step, self.steps_per_epoch = start_step, stop_step, steps_per_epoch
        self.t0 = time.time()
        self.last: dict = {}
        self.evals: list[dict] = []
        self.rates: list[float] = []
        self.bar = None
        self.tb = None
        self._redirect = None
        tty = sys.stderr.isatty()
        if is_main and (cfg.log.progress == "on" or (cfg.log.progress == "auto" and tty)):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # in a log file (progress=on), a line every 30 s instead of a redraw per step
            self.bar = tqdm(
                total=stop_step,
                initial=start_step,
                unit="step",
                desc=desc,
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.05,
                mininterval=0.1 if tty else 30.0,
            )
            # log lines are printed above the bar instead of being glued to it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        if is_main and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def record(self, rec: dict) -> None:
        """One logged step: metrics.jsonl, TensorBoard scalars, the bar's postfix."""
        self.last = rec
        self.rates.append(rec["img_per_s"])
        if not self.is_main:
            return
        path = self.run_dir / "metrics.jsonl"
        with writing(path), open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        step = rec["step"]
        if self.tb is not None:
            with writing(self.run_dir / "tensorboard"):
                for key, tag in TB_TAGS.items():
                    if rec.get(key) is not None:
                        self.tb.add_scalar(tag, rec[key], step)
                for key, value in rec.items():
                    if key.startswith("loss_tap"):
                        self.tb.add_scalar(f"loss/block{key[len('loss_tap') :]}", value, step)
                self.tb.flush()
        if self.bar is not None:
            post = {"epoch": f"{rec['epoch']:.2f}", "loss": f"{rec['loss']:.4f}", "img/s": f"{rec['img_per_s']:.0f}"}
            self.bar.set_postfix(post, refresh=False)

    def record_eval(self, rec: dict) -> None:
        """An evaluation (epoch end): eval.jsonl and TensorBoard's eval/ tags."""
        self.evals.append(rec)
        if not self.is_main:
            return
        path = self.run_dir / "eval.jsonl"
        with writing(path), open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            with writing(self.run_dir / "tensorboard"):
                for key, value in rec.items():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)):
                        self.tb.add_scalar(f"eval/{key}", value, rec["step"])
                self.tb.flush()

    def figure(self, step: int, png: Path) -> None:
        if self.tb is not None:
            from PIL import Image

            arr = np.asarray(Image.open(png).convert("RGB"))
            self.tb.add_image("figures/reconstructions", arr, step, dataformats="HWC")
            self.tb.flush()

    def summary(self, result: dict) -> str:
        minutes = (time.time() - self.t0) / 60
        rec = self.last
        lines = [
            f"run {self.run_dir}: step {result.get('step')} of {self.stop_step}"
            + (" (preempted; resume with the same command)" if result.get("preempted") else ""),
            f"  {result.get('step', 0) - self.start_step} steps in {minutes:.1f} min"
            + (f", median {np.median(self.rates):.1f} img/s" if self.rates else ""),
        ]
        if rec:
            parts = ", ".join(
                f"block {k[len('loss_tap') :]} {v:.4f}" for k, v in rec.items() if k.startswith("loss_tap")
            )
            lines.append(f"  last loss {rec['loss']:.4f}" + (f" ({parts})" if parts else ""))
            lines.append(
                f"  skipped updates {rec.get('skipped_updates', 0)}, rollbacks {rec.get('rollbacks', 0)}, "
                f"unreadable samples skipped {rec.get('bad_samples', 0)}"
            )
        if result.get("top1") is not None:
            best = result["best_epoch"]
            lines.append(
                f"  validation: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% (last); best top-1 "
                f"{result['best_top1']:.2f}% at {f'epoch {best}' if isinstance(best, int) else best}"
            )
        return "\n".join(lines)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


class KeyAudit:
    """Per-rank log of the sample keys of every micro-step (``log.sample_keys``): proof that a
    resumed run sees exactly the samples an uninterrupted one would."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "sample_keys" / f"rank{rank}.tsv"
        self.buf: list[str] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, micro: int, keys: list[str]) -> None:
        if self.enabled:
            self.buf.append(f"{step}\t{micro}\t{','.join(keys)}\n")

    def flush(self) -> None:
        if self.enabled and self.buf:
            with writing(self.path), open(self.path, "a") as f:
                f.writelines(self.buf)
            self.buf = []

    def truncate(self, step: int) -> None:
        """Drop lines of steps after the checkpoint: those steps are about to be redone."""
        if self.enabled and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines(keepends=True) if int(ln.split("\t", 1)[0]) <= step]
            self.path.write_text("".join(kept))
