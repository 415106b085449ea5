"""Evaluation input: every usable sample of a labeled shard folder exactly once across ranks.

Rank r reads the contiguous slice ``rank_range(N, r, W)`` of the usable manifest rows, in manifest
order, in batches of ``batch`` (the last one smaller): no sample is dropped and none is read twice,
whatever N, W and the batch. The transform is the standard one: resize the short side to
``img_size / crop`` (bicubic, antialiased), take the central ``img_size`` square, normalize.
DALI decodes on the GPU when there is one (``mixed``); the fallback uses PIL in worker processes.
Both keep their pipelines between evaluations: each evaluation reads the same slice again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.dataset.table import read_table
from data_pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD, Batch
from data_pipeline.order.phases import rank_range


@dataclass(frozen=True)
class EvalSpec:
    shards: str
    rank: int
    world_size: int
    batch: int
    img_size: int
    crop: float = 0.875
    num_threads: int = 2
    decode_device: str = "cpu"
    device_id: int | None = None
    excluded: tuple[int, ...] = ()
    label_map: tuple[int, ...] | None = None  # stored label -> the head's (data_pipeline.dataset.labels)


class EvalLoader:
    def __init__(self, kind: str, spec: EvalSpec):
        self.kind, self.spec = kind, spec
        self.table = read_table(spec.shards)
        usable = np.setdiff1d(np.arange(len(self.table)), np.asarray(spec.excluded, dtype=np.int64))
        lo, hi = rank_range(len(usable), spec.rank, spec.world_size)
        self.rows = usable[lo:hi]
        self.total = len(usable)  # over all ranks
        self.batches = [self.rows[i : i + spec.batch] for i in range(0, len(self.rows), spec.batch)]
        self._impl = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        if not self.batches:
            return
        if self._impl is None:
            self._impl = _DaliEval(self) if self.kind == "dali" else _TorchEval(self)
        lookup = np.asarray(self.spec.label_map, dtype=np.int64) if self.spec.label_map is not None else None
        for rows, img in zip(self.batches, self._impl.images(), strict=False):
            stored = self.table.label[rows]
            labels = torch.from_numpy(stored if lookup is None else lookup[stored]).to(img.device)
            yield Batch(img=img, label=labels, keys=[self.table.key(i) for i in rows], rows=rows)


class _DaliEval:
    def __init__(self, loader: EvalLoader):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        s, table = loader.spec, loader.table
        gpu = s.decode_device == "gpu"
        cycle = itertools.cycle(loader.batches)  # every evaluation reads the same batches in the same order

        def source():
            return [np.frombuffer(table.read(i), dtype=np.uint8) for i in next(cycle)]

        @pipeline_def(batch_size=s.batch, num_threads=s.num_threads, device_id=s.device_id if gpu else None, seed=0)
        def pipe():
            jpg = fn.external_source(source=source, batch=True)
            img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
            img = fn.resize(
                img, resize_shorter=round(s.img_size / s.crop), interp_type=types.INTERP_CUBIC, antialias=True
            )
            return fn.crop_mirror_normalize(
                img,
                crop=(s.img_size, s.img_size),
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[m * 255 for m in IMAGENET_MEAN],
                std=[d * 255 for d in IMAGENET_STD],
            )

        self.it = DALIGenericIterator([pipe()], ["img"], auto_reset=False, prepare_first_batch=False)
        self.n = len(loader.batches)

    def images(self) -> Iterator[torch.Tensor]:
        for _ in range(self.n):
            yield next(self.it)[0]["img"]


class _Crops(torch.utils.data.Dataset):
    def __init__(self, shards: str, rows: np.ndarray, img_size: int, crop: float):
        self.table, self.rows, self.img_size, self.crop = read_table(shards), rows, img_size, crop

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        from data_pipeline.loaders.eval_reader import center_crop

        return center_crop(self.table.read(int(self.rows[i])), self.img_size, self.crop)


class _TorchEval:
    def __init__(self, loader: EvalLoader):
        s = loader.spec
        workers = s.num_threads if s.num_threads > 1 else 0
        self.device = torch.device("cuda", s.device_id) if s.device_id is not None else torch.device("cpu")
        self.loader = torch.utils.data.DataLoader(
            _Crops(s.shards, loader.rows, s.img_size, s.crop),
            batch_size=s.batch,
            shuffle=False,
            num_workers=workers,
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=bool(workers),
            pin_memory=self.device.type == "cuda",
        )

    def images(self) -> Iterator[torch.Tensor]:
        for img in self.loader:
            yield img.to(self.device, non_blocking=True)
