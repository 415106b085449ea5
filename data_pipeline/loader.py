"""The training loader interface shared by the DALI pipeline and the PyTorch fallback.

A loader yields ``Batch`` objects for one rank. Its contract:
* every rank yields exactly ``micro_steps_per_epoch`` micro-batches per epoch (the number that
  ``engine.config.derive`` computes from the manifest), so ranks never disagree on step counts;
* iterating a loader runs the rest of the current epoch and then moves to the next one: epoch
  boundaries are explicit (``loader.epoch``), and a loader restored from ``state_dict`` in the
  middle of an epoch continues with exactly the batches it would have produced;
* within an epoch, the ranks' samples are disjoint and together cover the dataset once, minus
  the ``dropped_per_epoch`` samples that do not fill a whole optimizer step on every rank.

Data pipelines take rank and world size as arguments and never read the environment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The shard folder is missing, incomplete or inconsistent."""


@dataclass
class Batch:
    img: torch.Tensor  # [N, 3, H, W] float32, ImageNet-normalized, on the loader's output device
    label: torch.Tensor  # [N] int64 (-1 for unlabeled data)
    keys: list[str] = field(default_factory=list)  # sample keys, for exact-resume checks and logs


@dataclass(frozen=True)
class LoaderSpec:
    shards: str
    rank: int
    world_size: int
    micro_batch: int
    micro_steps_per_epoch: int
    img_size: int
    seed: int
    num_threads: int = 4
    decode_device: str = "cpu"  # "gpu" or "cpu", already resolved
    device_id: int | None = None  # CUDA device for outputs and GPU decoding
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    shuffle_buffer: int = 4096
    view: str = ""  # preflight view folder (filtered index files); empty = the shard folder as is


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    shards: tuple[str, ...]  # shard names without extension, in manifest order
    num_samples: int  # usable samples (after a preflight view, the bad ones are excluded)
    num_classes: int
    total_samples: int = 0  # samples in the manifest
    index_paths: dict = field(default_factory=dict)  # shard -> filtered index file (preflight view)
    shard_sizes: dict = field(default_factory=dict)  # shard -> samples in the manifest

    def tar(self, name: str) -> Path:
        return self.root / f"{name}.tar"

    def idx(self, name: str) -> Path:
        return Path(self.index_paths.get(name, self.root / f"{name}.idx"))


def read_dataset(root: str | Path, view: str | Path | None = None) -> DatasetInfo:
    """Shard list from ``dataset.json``, sample count from the Parquet manifest's metadata; with
    ``view`` (a preflight folder), the filtered shard list, index files and count."""
    info = _read_manifest_info(Path(root))
    if view is None:
        return info
    v = json.loads((Path(view) / "view.json").read_text())
    return DatasetInfo(info.root, tuple(v["shards"]), v["num_samples"], info.num_classes, v["total_samples"],
                       dict(v["index_paths"]), info.shard_sizes)  # fmt: skip


def _read_manifest_info(root: Path) -> DatasetInfo:
    meta_path, manifest = root / "dataset.json", root / "manifest.parquet"
    if not meta_path.is_file() or not manifest.is_file():
        raise DataError(
            f"{root} is not a finished shard folder (dataset.json and manifest.parquet are required); "
            "create it with: python -m data_pipeline.make_shards SRC OUT"
        )
    import pyarrow.parquet as pq

    meta = json.loads(meta_path.read_text())
    num = pq.ParquetFile(manifest).metadata.num_rows
    sizes: dict[str, int] = {}
    for s in pq.read_table(manifest, columns=["shard"]).column("shard").to_pylist():
        sizes[s] = sizes.get(s, 0) + 1
    if num != meta["num_samples"]:
        raise DataError(f"{root}: manifest has {num} rows but dataset.json says {meta['num_samples']}")
    shards = tuple(meta["shards"])
    return DatasetInfo(root, shards, num, int(meta.get("num_classes", 0)), num, {}, sizes)


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of this rank's contiguous slice: DALI readers split samples the same way."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def parse_labels(padded: torch.Tensor) -> torch.Tensor:
    """[N, W] uint8 ASCII digits (zero-padded on the right, optional '-') -> [N] int64."""
    b = padded.to(torch.int64)
    digit = (b >= 48) & (b <= 57)
    neg = (b[:, :1] == 45).squeeze(1)
    n_digits = digit.sum(dim=1, keepdim=True)
    pos = torch.cumsum(digit.to(torch.int64), dim=1)
    power = torch.where(digit, n_digits - pos, torch.zeros_like(b))
    value = (torch.where(digit, b - 48, torch.zeros_like(b)) * torch.pow(10, power)).sum(dim=1)
    return torch.where(neg, -value, value)


def decode_strings(padded: torch.Tensor) -> list[str]:
    """[N, W] uint8, zero-padded -> N Python strings."""
    arr = padded.cpu().numpy()
    return [bytes(row[row > 0]).decode("utf-8", "replace") for row in arr]


def make_loader(kind: str, spec: LoaderSpec, state: dict | None = None):
    """Build the configured loader ("dali" or "torch"), optionally restored from ``state``."""
    if kind == "dali":
        from data_pipeline.dali_loader import DaliLoader

        return DaliLoader(spec, state)
    if kind == "torch":
        from data_pipeline.torch_loader import TorchLoader

        return TorchLoader(spec, state)
    raise DataError(f"data.loader={kind!r}: allowed values are ['dali', 'torch']")
