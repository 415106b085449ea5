"""Classification on top of a pretrained encoder: fine-tuning and linear probing.

Fine-tuning owns the classifier (a timm ``VisionTransformer``, engine.models.classifier), timm's
layer-decay parameter groups, mixup/cutmix and random erasing on the device (timm's ``Mixup`` and
``RandomErasing`` on the batch), the loss (soft-target cross-entropy under mixup, label smoothing
otherwise) and the evaluation at every epoch end: top-1/top-5 over the validation shards, every
sample once across ranks. Linear probing is the same task with a frozen encoder, a BatchNorm head
and timm's LARS. The loop around it is the pretraining loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.dataset.labels import HeadLabels
from data_pipeline.dataset.locations import remote_spec
from data_pipeline.loaders.eval_loader import EvalLoader, EvalSpec
from data_pipeline.loaders.source import read_dataset
from engine.loop.task import AugmentSpec, StepOutput, Task, TaskContext, Timer
from engine.models.classifier import ProbeHead, build_classifier, check_encoder_fits, load_encoder, timm_args

log = logging.getLogger(__name__)


class FinetuneTask(Task):
    name = "finetune"

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 0
        self.head: HeadLabels | None = None  # the training labels as head outputs
        self.label_map: tuple[int, ...] | None = None  # stored validation label -> head output
        self.img_size = 0
        self.init: dict = {}
        self.mixup: Any = None
        self.erase: Any = None
        self.criterion: Any = None
        self.best: dict = {"top1": None, "top5": None, "epoch": None}
        self.dtype = torch.float32
        self._val: EvalLoader | None = None

    def setup(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        cfg, f = ctx.cfg, ctx.cfg.finetune
        self.name = cfg.task
        self.head, self.label_map = self._labels()
        self.num_classes = self.head.num_classes
        self.img_size = ctx.plan.img_size
        torch.manual_seed(cfg.seed)  # identical initial head on every rank
        self.module = build_classifier(cfg, ctx.plan, self.num_classes)
        self.init = self._load_pretrained()
        if cfg.engine.fp8:
            from engine.models.fp8 import convert_encoder_to_fp8

            convert_encoder_to_fp8(self.module)
        n_train = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        log.info(
            "%s: %s with %d classes, %.2fM trainable parameters (%s pooling%s)",
            self.name,
            cfg.model.arch,
            self.num_classes,
            n_train / 1e6,
            f.global_pool,
            ", frozen encoder" if f.freeze_encoder else "",
        )
        self.mixup = self._mixup()
        self.erase = self._random_erasing()
        self.criterion = self._criterion()
        self.best = {"top1": None, "top5": None, "epoch": None}
        self.dtype = torch.float32

    def _labels(self) -> tuple[HeadLabels, tuple[int, ...] | None]:
        """The head's outputs for the training labels, and the validation labels mapped onto them:
        decided now, not at the first epoch end (where a bad label would crash every attempt)."""
        from data_pipeline.dataset.labels import classifier_labels

        d = self.cfg.data
        train = read_dataset(d.shards, remote=remote_spec(d)).table
        val = read_dataset(d.val_shards).table
        head, val_map, notes = classifier_labels(train, val, self.cfg.finetune.num_classes, d.shards, d.val_shards)
        for note in notes:
            log.warning("%s", note)
        return head, tuple(int(v) for v in val_map) if val_map is not None else None

    def _load_pretrained(self) -> dict:
        src = self.cfg.init.pretrained
        if not src:
            log.warning("init.pretrained is empty: training from random initialization")
            return {"kind": "random"}
        from engine.weights.sources import encoder_weights

        w = encoder_weights(src)
        check_encoder_fits(w.shape, self.plan, f"init.pretrained={src}")
        report = load_encoder(self.module, w.state, f"init.pretrained={src}")
        dropped = sorted(set(report["dropped"]) | set(w.dropped))
        others = sorted(set(w.dropped) - set(report["dropped"]))
        log.info(
            "loaded the pretrained encoder from %s (%s%s); encoder keys not used %s; new %s; %d other keys of the "
            "file left out (%s)",
            w.origin["path"],
            w.origin["what"],
            f", step {w.origin['step']}" if w.origin["step"] is not None else "",
            sorted(report["dropped"]),
            report["new"],
            len(others),
            _summarize(others),
        )
        return {**w.origin, "dropped": dropped, "new": report["new"]}

    def _mixup(self):
        f = self.cfg.finetune
        if f.mixup <= 0 and f.cutmix <= 0:
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=f.mixup,
            cutmix_alpha=f.cutmix,
            prob=f.mixup_prob,
            switch_prob=f.mixup_switch_prob,
            mode="batch",
            label_smoothing=f.smoothing,
            num_classes=self.num_classes,
        )

    def _random_erasing(self):
        if self.cfg.finetune.reprob <= 0:
            return None
        from timm.data.random_erasing import RandomErasing

        return RandomErasing(self.cfg.finetune.reprob, mode="pixel", max_count=1, device=str(self.ctx.dist.device))

    def _criterion(self):
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        if self.cfg.finetune.smoothing > 0:
            return LabelSmoothingCrossEntropy(self.cfg.finetune.smoothing)
        return torch.nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ build
    def param_groups(self) -> list[dict]:
        """timm's layer-wise lr decay groups (MAE's rule: scale = decay ** (blocks above), the head
        at 1, no weight decay on 1-D parameters, position embedding and cls token)."""
        from timm.optim._param_groups import param_groups_layer_decay

        m, f = self.module, self.cfg.finetune
        return param_groups_layer_decay(
            m,
            weight_decay=self.cfg.optim.weight_decay,
            no_weight_decay_list=m.no_weight_decay(),
            layer_decay=f.layer_decay,
        )

    def make_optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "lars":
            from timm.optim import Lars

            # MAE's LARS: trust-ratio scaling for matrices only; 1-D parameters (the bias) are plain SGD
            groups = [{**g, "always_adapt": any(p.ndim > 1 for p in g["params"])} for g in groups]
            return Lars(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, fused=True)

    def augment(self) -> AugmentSpec:
        d = self.cfg.data
        return AugmentSpec(
            self.img_size,
            (d.crop_scale[0], d.crop_scale[1]),
            (d.crop_ratio[0], d.crop_ratio[1]),
            self.cfg.finetune.rand_augment,
            d.flip_prob,
            labels=True,
            label_map=self.head.lookup,
        )

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype
        if isinstance(self.module.head, ProbeHead):  # BatchNorm statistics stay float32 (no parameters)
            self.module.head[0].float()

    # ------------------------------------------------------------------ step
    def forward(self, engine: Any, batch: Any, timer: Timer) -> StepOutput:
        x, y = batch.img, batch.label
        if self.erase is not None:
            x = self.erase(x)  # per image, pixel noise in one box (DeiT/MAE), before mixing
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        logits = engine(x.to(self.dtype)).float()
        loss = self.criterion(logits, target)
        return StepOutput(loss, loss.detach().new_zeros(0))

    # ------------------------------------------------------------------ evaluation
    def _eval_loader(self) -> EvalLoader:
        if self._val is None:
            from data_pipeline.loaders import preflight
            from engine.loop.dist import all_gather_objects, barrier

            c, dist = self.cfg, self.ctx.dist
            raw = read_dataset(c.data.val_shards)
            view = preflight.run(
                raw,
                c.fault.data_checks,
                self.ctx.run_dir / "data_view_val",
                dist.rank,
                dist.world_size,
                lambda o: all_gather_objects(o, dist.world_size),
                barrier,
            )
            if view.excluded:
                log.warning(
                    "validation: %d unreadable samples left out (listed in %s)",
                    len(view.excluded),
                    self.ctx.run_dir / "data_view_val" / "bad_samples.json",
                )
            gpu = dist.device.type == "cuda"
            spec = EvalSpec(
                c.data.val_shards,
                dist.rank,
                dist.world_size,
                c.data.eval_batch or self.plan.micro_batch,
                self.img_size,
                c.finetune.eval_crop,
                c.data.num_threads,
                "gpu" if gpu and c.data.decode_device != "cpu" else "cpu",
                dist.local_rank if gpu else None,
                view.excluded,
                self.label_map,
            )
            self._val = EvalLoader(c.data.loader, spec)
        return self._val

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """Top-1/top-5 and the loss over every validation sample once (summed over ranks)."""
        loader = self._eval_loader()
        engine.eval()
        dev = self.ctx.dist.device
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # correct@1, correct@5, loss sum, samples
        for batch in loader:
            logits = engine(batch.img.to(self.dtype)).float()
            y = batch.label.to(logits.device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == y[:, None]
            sums += torch.stack(
                [
                    hit[:, 0].sum(),
                    hit.any(dim=1).sum(),
                    F.cross_entropy(logits, y, reduction="sum"),
                    torch.tensor(float(len(y)), device=dev),
                ]
            ).to(sums)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        c1, c5, loss, n = sums.tolist()
        engine.train()
        if n != loader.total:
            raise RuntimeError(f"evaluated {n:.0f} samples, expected {loader.total}")
        return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "val_loss": loss / n, "val_samples": int(n)}

    def on_epoch_end(self, engine, epoch: int) -> dict:
        return self._record(self.evaluate(engine), epoch)

    def _record(self, res: dict, epoch: int | str) -> dict:
        if self.best["top1"] is None or res["top1"] > self.best["top1"]:
            self.best = {"top1": res["top1"], "top5": res["top5"], "epoch": epoch}
        where = f"epoch {epoch}" if isinstance(epoch, int) else epoch
        log.info(
            "%s: %s: top-1 %.2f%%, top-5 %.2f%% on %d validation samples (best top-1 %.2f%% at %s)",
            self.name,
            where,
            res["top1"],
            res["top5"],
            res["val_samples"],
            self.best["top1"],
            f"epoch {self.best['epoch']}" if isinstance(self.best["epoch"], int) else self.best["epoch"],
        )
        return {**res, "best_top1": self.best["top1"]}

    def finish(self, engine, result: dict) -> dict:
        """The final evaluation, after the last step (the loop stops there, before any epoch end)."""
        final = self._record(self.evaluate(engine), f"the end (step {result['step']})")
        result.update(
            eval=final,
            top1=final["top1"],
            top5=final["top5"],
            best_top1=self.best["top1"],
            best_epoch=self.best["epoch"],
        )
        return result

    # ------------------------------------------------------------------ state
    def reference(self) -> dict:
        name, kwargs = timm_args(self.cfg, self.plan, self.num_classes)
        return {
            "classifier": {
                "timm_model": name,
                "timm_kwargs": kwargs,
                "num_classes": self.num_classes,
                "label_names": list(self.head.names),  # output i is this class
            },
            "init": {k: v for k, v in self.init.items() if k in ("kind", "path", "step")},
        }

    def state_dict(self) -> dict:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state.get("best", self.best))

    def figure(self, engine, path: Path) -> bool:
        return False


def _summarize(keys: list[str], limit: int = 6) -> str:
    """A short list of key names, grouping numbered families (decoder_blocks1.0..3 -> decoder_blocks1.*)."""
    import re

    groups = sorted({re.sub(r"\.\d+\..*$", ".*", k) for k in keys})
    text = ", ".join(groups[:limit])
    return text + (f", ... ({len(groups) - limit} more)" if len(groups) > limit else "") if groups else "nothing"
