"""Fallback loader: the same shards, augmentation and interface as the DALI loader, in plain PyTorch.

For places where DALI cannot run. Samples are read by random access through the DALI index files
(the tar offsets), decoded with PIL and augmented with torchvision in DataLoader worker
processes. Each epoch is a seeded global permutation; rank r takes slice r of it (the DALI split
rule), so ranks are disjoint and cover the data once per epoch. Every random choice of a sample
comes from a generator seeded by (seed, epoch, sample), so the batches do not depend on the
number of workers, and a restored position reproduces the exact remaining batches.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from data_pipeline.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    DataError,
    LoaderSpec,
    rank_range,
    read_dataset,
)
from data_pipeline.wds_index import read_index


def rrc_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), torchvision's algorithm with an explicit generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop at the nearest allowed aspect
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ShardSamples(Dataset):
    """Random access to every sample of a shard folder, in manifest order; returns augmented tensors."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        info = read_dataset(spec.shards, spec.view or None)
        self.entries: list[tuple[str, str, int, int, int, int]] = []  # shard, key, jpg off, size, cls off, size
        for name in info.shards:
            for s in read_index(info.idx(name)):
                jpg, cls = s.component("jpg"), s.component("cls")
                self.entries.append((name, s.key, jpg.offset, jpg.size, cls.offset, cls.size))
        if len(self.entries) != info.num_samples:
            raise DataError(f"{spec.shards}: index files list {len(self.entries)} samples, manifest {info.num_samples}")
        self.info = info
        self._files: dict[str, object] = {}
        self.epoch = 0
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: str, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:  # opened lazily, once per worker process
            f = self._files[shard] = open(self.info.tar(shard), "rb")  # noqa: SIM115
        f.seek(offset)
        return f.read(size)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        epoch, i = item
        shard, key, off, size, coff, csize = self.entries[i]
        seed = int(np.random.SeedSequence([self.spec.seed, epoch, i]).generate_state(1, np.uint64)[0] >> 1)
        gen = torch.Generator().manual_seed(seed)
        img = Image.open(io.BytesIO(self._read(shard, off, size))).convert("RGB")
        t = TF.pil_to_tensor(img)
        top, left, h, w = rrc_params(t.shape[1], t.shape[2], self.spec.crop_scale, self.spec.crop_ratio, gen)
        size_hw = [self.spec.img_size, self.spec.img_size]
        t = TF.resized_crop(t, top, left, h, w, size_hw, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if float(torch.rand(1, generator=gen)) < 0.5:
            t = TF.horizontal_flip(t)
        t = (t.float() / 255.0 - self._mean) / self._std
        label = int(self._read(shard, coff, csize).decode())
        return t, label, f"{shard}/{key}"


class EpochSampler(Sampler):
    """This rank's (epoch, index) pairs for one epoch, starting at a given micro-batch.

    Iterated in the main process on every ``iter(DataLoader)``, so the loader sets ``epoch`` and
    ``start`` before each epoch while the worker processes stay alive.
    """

    def __init__(self, spec: LoaderSpec, num_samples: int):
        self.spec, self.num, self.epoch, self.start = spec, num_samples, 0, 0

    def indices(self) -> list[int]:
        perm = np.random.default_rng([self.spec.seed, self.epoch]).permutation(self.num)
        lo, hi = rank_range(self.num, self.spec.rank, self.spec.world_size)
        return perm[lo:hi][: self.spec.micro_steps_per_epoch * self.spec.micro_batch].tolist()

    def __iter__(self):
        for i in self.indices()[self.start * self.spec.micro_batch :]:
            yield (self.epoch, i)

    def __len__(self) -> int:
        return (self.spec.micro_steps_per_epoch - self.start) * self.spec.micro_batch


def _ignore_preemption_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the main process, which saves and stops cleanly."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _collate(items: list[tuple[torch.Tensor, int, str]]) -> Batch:
    imgs, labels, keys = zip(*items)
    return Batch(img=torch.stack(imgs), label=torch.tensor(labels, dtype=torch.int64), keys=list(keys))


class TorchLoader:
    """Same contract as ``DaliLoader``: explicit epochs, equal batches per rank, exact state."""

    def __init__(self, spec: LoaderSpec, state: dict | None = None):
        self.spec = spec
        self.dataset = ShardSamples(spec)
        min_slice = len(self.dataset) // spec.world_size
        if spec.micro_steps_per_epoch * spec.micro_batch > min_slice:
            raise DataError(
                f"{spec.micro_steps_per_epoch} micro-batches of {spec.micro_batch} exceed {min_slice} samples"
            )
        self.epoch, self.position = 0, 0
        if state is not None:  # epoch and position are all the state this loader needs
            self.epoch, self.position = state["epoch"], state["position"]
        self.device = torch.device("cuda", spec.device_id) if spec.device_id is not None else torch.device("cpu")

        self._sampler = EpochSampler(spec, len(self.dataset))
        workers = spec.num_threads if spec.num_threads > 1 else 0
        self._loader = DataLoader(
            self.dataset,
            batch_size=spec.micro_batch,
            sampler=self._sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            # spawn: never fork a process that may hold CUDA or DALI threads
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=bool(workers),
            worker_init_fn=_ignore_preemption_signals if workers else None,
            prefetch_factor=4 if workers else None,
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.spec.micro_steps_per_epoch

    def __iter__(self):
        self._sampler.epoch, self._sampler.start = self.epoch, self.position
        for batch in self._loader:
            self.position += 1
            if self.device.type == "cuda":
                batch.img = batch.img.to(self.device, non_blocking=True)
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"kind": "torch", "epoch": self.epoch, "position": self.position}
