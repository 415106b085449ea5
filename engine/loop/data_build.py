"""What a run trains on, decided once at start-up: the start-up data checks shared by all ranks, the
sample list, the order, the run plan that follows from them, and the loader's specification.

``build_data`` runs on every rank (the checks are split between them and exchanged); a resumed run's
checkpoint is checked against the data here too (other data or seed under a mid-epoch checkpoint is
refused before anything heavy is built).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.dataset.locations import RemoteSpec, remote_spec
from data_pipeline.loaders import preflight
from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.identity import check_data_change, data_identity
from data_pipeline.loaders.source import DatasetView, read_dataset
from data_pipeline.order.select import resolve_order
from engine.config import Config, RunPlan, plan_run
from engine.errors import DataError
from engine.loop.dist import DistInfo, all_gather_objects, barrier
from engine.loop.task import Task

log = logging.getLogger(__name__)


@dataclass
class RunData:
    dataset: DatasetView  # the samples every rank trains on (unreadable ones left out)
    order: str  # global | block
    bad_samples: int  # left out by the start-up checks
    plan: RunPlan


def build_data(cfg: Config, dist: DistInfo, view_dir: Path, resume_marker: dict | None) -> RunData:
    """Preflight (shared by all ranks) -> the sample list every rank trains on -> the run plan."""
    d = cfg.data
    raw = read_dataset(d.shards, remote=node_remote_spec(cfg, dist))
    order = resolve_order(d.order, d.shards, raw.total_samples)
    dataset = preflight.run(
        raw,
        cfg.fault.data_checks,
        view_dir,
        dist.rank,
        dist.world_size,
        lambda obj: all_gather_objects(obj, dist.world_size),
        barrier,
    )
    bad = dataset.total_samples - dataset.num_samples
    if bad:
        log.warning(
            "data: %d of %d samples skipped as unreadable (listed in %s)",
            bad,
            dataset.total_samples,
            view_dir / "bad_samples.json",
        )
    preflight.check_threshold(dataset, cfg.fault.max_bad_sample_share, view_dir)
    classes = dataset.num_classes or None
    plan = plan_run(cfg, dist.world_size, dataset.num_samples, classes).require_complete()
    data = RunData(dataset, order, bad, plan)
    if resume_marker is not None:
        check_against(cfg, data, resume_marker)
    log.info(
        "data: %d samples in %d shards (%s); %d ranks x micro-batch %d x accumulation %d = global batch "
        "%d; %d steps/epoch (%d samples/epoch left out so ranks take equal steps); lr %.3g",
        dataset.num_samples,
        len(dataset.shards),
        "global order" if order == "global" else f"block order, {d.block_window} shards per window",
        plan.world_size,
        plan.micro_batch,
        plan.grad_accum,
        plan.global_batch,
        plan.steps_per_epoch,
        plan.dropped_per_epoch,
        plan.lr,
    )
    return data


def check_against(cfg: Config, data: RunData, marker: dict) -> None:
    """Other data or seed under a mid-epoch checkpoint: refused here (or noted, ``data.on_change``)."""
    d = cfg.data
    identity = data_identity(data.dataset.table, cfg.seed, data.order, d.block_window)
    note = check_data_change(marker, identity, d.on_change)
    if note:
        log.warning("%s", note)


def node_remote_spec(cfg: Config, dist: DistInfo) -> RemoteSpec | None:
    """The object-storage settings of the data config, for the ranks of this node (their shared cache)."""
    spec = remote_spec(cfg.data)
    return None if spec is None else dataclasses.replace(spec, local_ranks=dist.local_world_size)


def loader_spec(cfg: Config, dist: DistInfo, data: RunData, task: Task, view_dir: Path) -> LoaderSpec:
    """The loader of this rank: its share of the samples, the task's augmentation, the decode device."""
    d = cfg.data
    gpu = dist.device.type == "cuda"
    decode = "gpu" if (d.decode_device == "gpu" or (d.decode_device == "auto" and gpu)) else "cpu"
    if decode == "gpu" and not gpu:
        raise DataError("data.decode_device=gpu but no CUDA device is available; use auto or cpu")
    aug = task.augment()
    plan = data.plan
    return LoaderSpec(
        shards=d.shards,
        rank=dist.rank,
        world_size=dist.world_size,
        micro_batch=plan.micro_batch,
        samples_per_rank_step=plan.micro_batch * plan.grad_accum,
        img_size=aug.img_size,
        seed=cfg.seed,
        num_threads=d.num_threads,
        decode_device=decode,
        device_id=dist.local_rank if gpu else None,
        crop_scale=aug.crop_scale,
        crop_ratio=aug.crop_ratio,
        rand_augment=aug.rand_augment,
        flip_prob=aug.flip_prob,
        excluded=data.dataset.excluded,
        view=str(view_dir),
        on_change=d.on_change,
        order=data.order,
        block_window=d.block_window,
        remote=node_remote_spec(cfg, dist),
        labels=aug.labels,
        label_map=aug.label_map,
        keys=cfg.log.sample_keys,  # built per sample: only when they are recorded
    )
