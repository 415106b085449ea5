"""Fallback loader: the same plan, crops and interface as the DALI loader, in plain PyTorch.

For places where DALI cannot run. Samples are read by offset from the tar shards, decoded with
PIL and augmented with torchvision in DataLoader worker processes. Order, crop box and flip come
from ``data_pipeline.order``, so this loader reads the same samples and crops them the same way as
the DALI one (decoders and resamplers differ in the last bits). Fine-tuning's RandAugment is timm's
(``rand_augment_transform``), driven by a generator seeded per sample, so batches never depend on
the number of workers.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from data_pipeline.loaders import preflight
from data_pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD, NOT_THE_SAMPLES, EpochLoader, Failed, LoaderSpec
from data_pipeline.loaders.source import open_table
from data_pipeline.order.crops import crop_batch, pixel_box
from data_pipeline.order.phases import Phase, RankStream
from engine.errors import DataError


class PlanSamples(Dataset):
    """Item (epoch, row) -> (augmented image, row)."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self._table = None  # opened in each worker: memory-mapped columns are mapped, not copied
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._randaug = None

    @property
    def table(self):
        if self._table is None:
            self._table = open_table(self.spec.shards, self.spec.remote)
        return self._table

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": None, "_randaug": None}

    def __len__(self) -> int:
        return len(self.table)

    def _rand_augment(self):
        if self._randaug is None:
            from timm.data.auto_augment import rand_augment_transform

            s = self.spec
            hparams = {
                "translate_const": int(s.img_size * 0.45),
                "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
            }
            self._randaug = rand_augment_transform(s.rand_augment, hparams)
        return self._randaug

    def __getitem__(self, item: tuple[int, int, tuple]) -> tuple[torch.Tensor, int]:
        epoch, row, frac = item  # the crop box and flip, computed for the whole batch by the sampler
        s, t = self.spec, self.table
        img = Image.open(io.BytesIO(t.read(row))).convert("RGB")
        left, top, w, h = pixel_box(frac[:4], img.size[0], img.size[1])
        size = [s.img_size, s.img_size]
        img = TF.resized_crop(img, top, left, h, w, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if frac[4]:
            img = TF.horizontal_flip(img)
        if s.rand_augment:  # timm draws from Python's `random`: seed it per sample, then put it back
            saved = random.getstate()
            random.seed(int(np.random.SeedSequence([s.seed, epoch, row, 1]).generate_state(1)[0]))
            try:
                img = self._rand_augment()(img)
            finally:
                random.setstate(saved)
        x = TF.pil_to_tensor(img).float() / 255.0
        return (x - self._mean) / self._std, row


class RowSampler(Sampler):
    """Yields this epoch's (epoch, row, crop) items from the rank's stream (set before each epoch while
    the workers stay alive), a micro-batch at a time, the batch's crops computed in one call
    (``crops(epoch, rows)``); tells the read-ahead as each batch is handed out."""

    def __init__(self, micro_batch: int, crops) -> None:
        self.micro_batch = micro_batch
        self.crops = crops
        self.stream: RankStream | None = None
        self.on_batch = None  # called as the DataLoader takes each batch

    def __iter__(self):
        if self.stream is None:
            return
        for rows in self.stream.batches(self.micro_batch):
            if self.on_batch is not None:
                self.on_batch()
            boxes = self.crops(self.stream.epoch, rows)
            for r, box in zip(rows, boxes):
                yield (self.stream.epoch, int(r), tuple(box.tolist()))

    def __len__(self) -> int:
        return 0 if self.stream is None else self.stream.length // self.micro_batch * self.micro_batch


def _init_worker(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGINT to the main process, which saves and stops cleanly, and
    end without the interpreter's teardown once their loop is done: a spawned worker ends through
    ``sys.exit``, whose teardown aborts on native thread pools still held ("terminate called without
    an active exception"); what a worker does is finished and handed over by then."""
    import atexit
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    atexit.register(os._exit, 0)


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, np.ndarray]:
    imgs, rows = zip(*items)
    return torch.stack(imgs), np.asarray(rows, dtype=np.int64)


class TorchLoader(EpochLoader):
    """Same contract as ``DaliLoader``: explicit epochs, equal batches per rank, exact state."""

    kind = "torch"

    def __init__(self, spec: LoaderSpec, state: dict | None = None):
        super().__init__(spec, state)
        self.device = torch.device("cuda", spec.device_id) if spec.device_id is not None else torch.device("cpu")
        self._sampler = RowSampler(spec.micro_batch, self._crops)
        workers = spec.num_threads if spec.num_threads > 1 else 0
        self._loader = DataLoader(
            PlanSamples(spec),
            batch_size=spec.micro_batch,
            sampler=self._sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            # spawn: never fork a process that may hold CUDA or DALI threads
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=bool(workers),
            worker_init_fn=_init_worker if workers else None,
            prefetch_factor=4 if workers else None,
        )
        self._start_prefetch()
        if self.prefetch is not None:
            self._sampler.on_batch = self.prefetch.reached

    def close(self) -> None:
        super().close()
        workers = getattr(self._loader, "_iterator", None)  # persistent workers outlive each epoch's iterator
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()

    def _crops(self, epoch: int, rows: np.ndarray) -> np.ndarray:
        s, t = self.spec, self.table
        return crop_batch(
            self.crop_version, s.seed, epoch, rows, t.width[rows], t.height[rows], s.crop_scale, s.crop_ratio,
            s.flip_prob,
        )  # fmt: skip

    def _produce(self, stop):
        epoch, phases = self.epoch, list(self.phases)
        micro = self.spec.micro_batch
        while not stop.is_set():
            st = self.stream(epoch, phases)
            self._sampler.stream = st
            expected = st.batches(micro)  # the rows of each batch, to name a failing one
            it = iter(self._loader)
            for _ in range(st.length // micro):
                planned = next(expected)
                try:
                    img, rows = next(it)
                except Exception as err:  # a sample not read or decoded, a changed shard, the moment
                    yield Failed(_as_raised(err), [planned])
                    return
                if self.device.type == "cuda":  # from pinned memory, without waiting
                    img = img.to(self.device, non_blocking=True)
                yield rows, img, None
            epoch, phases = epoch + 1, [Phase(self.spec.world_size, 0, self.excluded)]

    def _failed(self, err: BaseException, rows) -> None:
        if isinstance(err, NOT_THE_SAMPLES) or not isinstance(err, (OSError, ValueError, RuntimeError, DataError)):
            raise err
        found = preflight.find_undecodable(self.table, rows[0]) if rows else []
        if not found:
            raise err
        self.stop_with(found, "cannot read or decode", None)


def _as_raised(err: Exception) -> Exception:
    """An error from a DataLoader worker carries the worker's traceback in its message; the same error
    with only its own message (the last line), so it reads as one line like any other."""
    text = str(err)
    if not text.startswith("Caught "):
        return err
    last = text.strip().splitlines()[-1]
    message = last.split(": ", 1)[1] if ": " in last else last
    kind = type(err)
    return kind(message) if kind.__init__ is not Exception.__init__ else err
