"""NVIDIA DALI input pipeline: WebDataset shards -> MAE augmentation -> NCHW float tensors.

One code path for GPU and CPU: with a GPU, JPEGs are decoded by nvJPEG (``mixed``, ROI decoding
of only the random crop, hardware decoder where the GPU has one) and resized/normalized on the
GPU; without one, the same operators run on the CPU (``device_id=None``).

Epochs. ``fn.readers.webdataset`` splits the concatenated samples of all shards into
``world_size`` contiguous slices (``shard_id=rank``) and, as ``stick_to_shard`` is off, moves
each rank to the next slice every epoch. ``pad_last_batch`` aligns the reader's epochs with
batch boundaries, so the shuffle buffer never mixes two epochs. Each rank yields exactly
``micro_steps_per_epoch`` batches (the smallest slice's whole optimizer steps), then reads and
discards the rest of its slice, so every rank stays on the same epoch.

Exact resume. The pipeline runs with ``enable_checkpointing``: its checkpoint (reader position,
shuffle buffer and the random state of every operator) restores the exact remaining batches.
"""

from __future__ import annotations

import logging

import torch

from data_pipeline.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    DataError,
    LoaderSpec,
    decode_strings,
    parse_labels,
    rank_range,
    read_dataset,
)

log = logging.getLogger(__name__)

LABEL_BYTES = 12


def build_pipeline(spec: LoaderSpec, tars: list[str], idxs: list[str], slice_size: int, checkpoint: str | None):
    from nvidia.dali import fn, pipeline_def, types

    gpu = spec.decode_device == "gpu"
    # source_info is "<tar path>:<offset>:<member>"; pad it to a fixed width so it batches.
    info_bytes = max(len(t.encode()) for t in tars) + 128

    @pipeline_def(
        batch_size=spec.micro_batch,
        num_threads=spec.num_threads,
        device_id=spec.device_id if gpu else None,
        seed=spec.seed + 7919 * spec.rank,
        enable_checkpointing=True,
    )
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            shard_id=spec.rank,
            num_shards=spec.world_size,
            random_shuffle=True,
            initial_fill=max(1, min(spec.shuffle_buffer, slice_size)),
            pad_last_batch=True,
            name="reader",
        )
        info = fn.get_property(jpg, key="source_info")  # "<tar path>:<offset>:<member>"
        img = fn.decoders.image_random_crop(
            jpg,
            device="mixed" if gpu else "cpu",
            output_type=types.RGB,
            random_area=list(spec.crop_scale),
            random_aspect_ratio=list(spec.crop_ratio),
            num_attempts=10,
            **({"hw_decoder_load": 0.65} if gpu else {}),
        )
        img = fn.resize(
            img, resize_x=spec.img_size, resize_y=spec.img_size, interp_type=types.INTERP_CUBIC, antialias=True
        )
        img = fn.crop_mirror_normalize(
            img,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD],
            mirror=fn.random.coin_flip(probability=0.5),
        )
        return img, fn.pad(cls, fill_value=0, shape=[LABEL_BYTES]), fn.pad(info, fill_value=0, shape=[info_bytes])

    return pipe(checkpoint=checkpoint)


class DaliLoader:
    """Rank-local DALI loader with explicit epochs and exact, checkpointable position."""

    def __init__(self, spec: LoaderSpec, state: dict | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.spec = spec
        self.info = read_dataset(spec.shards, spec.view or None)
        lo, hi = rank_range(self.info.num_samples, spec.rank, spec.world_size)
        min_slice = self.info.num_samples // spec.world_size
        if spec.micro_steps_per_epoch * spec.micro_batch > min_slice:
            raise DataError(
                f"{spec.micro_steps_per_epoch} micro-batches of {spec.micro_batch} exceed the smallest rank slice "
                f"({min_slice} samples)"
            )
        self.epoch = 0
        self.position = 0  # micro-batches already yielded in the current epoch
        checkpoint = None
        if state is not None:
            # A state without a DALI checkpoint (another loader kind, another world size) keeps the
            # epoch and the position in it; the order of this epoch's remaining samples differs.
            self.epoch, self.position = state["epoch"], state["position"]
            checkpoint = state.get("dali") if state.get("kind") == "dali" else None
        tars = [str(self.info.tar(s)) for s in self.info.shards]
        idxs = [str(self.info.idx(s)) for s in self.info.shards]
        self._pipe = build_pipeline(spec, tars, idxs, hi - lo, checkpoint)
        self._it = DALIGenericIterator(
            [self._pipe],
            ["img", "cls", "info"],
            reader_name="reader",
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=False,
            prepare_first_batch=False,
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.spec.micro_steps_per_epoch

    def __iter__(self):
        while self.position < self.spec.micro_steps_per_epoch:
            out = next(self._it)[0]
            self.position += 1
            yield Batch(img=out["img"], label=parse_labels(out["cls"]), keys=_keys(out["info"]))
        self._finish_epoch()

    def _finish_epoch(self) -> None:
        # Read out the rest of this rank's slice so the reader sits on the next epoch boundary.
        # (next() in a loop, not `for`: iter() on a DALI iterator resets it mid-epoch.)
        while True:
            try:
                next(self._it)
            except StopIteration:
                break
        self._it.reset()
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"kind": "dali", "epoch": self.epoch, "position": self.position, "dali": self._it.checkpoints()[0]}


def _keys(info: torch.Tensor) -> list[str]:
    """source_info strings -> '<shard>/<key>' (e.g. 'shard-000003/n01440764__n01440764_10026')."""
    keys = []
    for s in decode_strings(info):
        path, _, member = s.rpartition(":")
        shard = path.rsplit(":", 1)[0].rsplit("/", 1)[-1].removesuffix(".tar")
        keys.append(f"{shard}/{member.rsplit('.', 1)[0]}")
    return keys
