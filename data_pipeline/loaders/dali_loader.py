"""NVIDIA DALI input pipeline: tar shards -> decode of the crop region -> resize -> normalize.

The sample order and every sample's crop box and flip come from ``data_pipeline.order`` (pure
functions of seed, epoch and manifest row), and the JPEG bytes are read by offset from the tar
shards; an ``external_source`` hands both to DALI, which decodes only the crop region (ROI
decoding: nvJPEG with the hardware decoder on GPUs that have one, ``mixed``), resizes (bicubic,
antialiased) and normalizes, on the GPU when there is one and on the CPU otherwise.

Why not ``fn.readers.webdataset``: its shuffle buffer and its split of samples over ranks are
internal state that only a DALI checkpoint of the same pipeline shape can restore. With the plan
outside DALI, a resume after any change (world size, micro-batch, loader kind, newly excluded
samples) still reads every remaining sample exactly once, and both loaders crop alike.

Fine-tuning adds DALI's RandAugment (``nvidia.dali.auto_aug.rand_augment``), whose random state
is DALI's own: the pipeline then runs with ``enable_checkpointing`` and its checkpoint is part of
the loader state, restored when the layout did not change.

A batch DALI cannot decode is not a crash loop: its samples are checked on the host, the bad ones
are recorded in the run's data_view folder (skipped, and counted, from the next start), and the
error names them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import deque

import numpy as np

from data_pipeline.loaders import preflight
from data_pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD, NOT_THE_SAMPLES, EpochLoader, Failed, LoaderSpec
from data_pipeline.order.crops import crop_batch
from engine.errors import DataError, TransientError

log = logging.getLogger(__name__)


def parse_rand_augment(policy: str) -> tuple[int, int]:
    """timm's 'rand-m9-n2-mstd0.5-inc1' -> (n ops, magnitude 0-10). DALI draws no magnitude noise
    (mstd) and always uses the increasing-severity variants (inc1)."""
    m = re.fullmatch(r"rand((?:-[a-z]+[0-9.]+)*)", policy)
    if not m:
        raise DataError(f"rand_augment={policy!r}: expected timm's form, e.g. 'rand-m9-mstd0.5-inc1'")
    parts = dict(re.findall(r"-([a-z]+)([0-9.]+)", policy))
    return int(parts.get("n", 2)), int(float(parts.get("m", 9)))


class _Source:
    """DALI's external source: called once per micro-batch, in order, ahead of consumption, in the
    loader's producer thread. One batch: the JPEG bytes (read by offset) and, from one vectorized call,
    the crop boxes [N, 2] + [N, 2] and flips [N]: DALI takes each as one array."""

    def __init__(self, loader: DaliLoader):
        self.loader = loader
        self.batches = loader.future_batches()
        self.pending: deque[np.ndarray] = deque()  # rows of batches handed to DALI, not yet produced

    def __call__(self):
        epoch, rows = next(self.batches)
        self.pending.append(rows)
        if self.loader.prefetch is not None:
            self.loader.prefetch.reached()
        s, t = self.loader.spec, self.loader.table
        jpgs = []
        for i in rows:
            try:
                jpgs.append(np.frombuffer(t.read(i), dtype=np.uint8))
            except NOT_THE_SAMPLES:
                raise  # a changed or missing object, or a condition of the moment: not recorded
            except (OSError, DataError) as err:  # a tar that cannot be read
                self.loader.stop_on_unreadable(rows, err)
        boxes = crop_batch(
            self.loader.crop_version, s.seed, epoch, rows, t.width[rows], t.height[rows], s.crop_scale, s.crop_ratio,
            s.flip_prob,
        )  # fmt: skip
        anchors = np.ascontiguousarray(boxes[:, 0:2], dtype=np.float32)
        shapes = np.ascontiguousarray(boxes[:, 2:4], dtype=np.float32)
        return jpgs, anchors, shapes, boxes[:, 4].astype(np.int32)


def build_pipeline(spec: LoaderSpec, source: _Source, checkpoint: bytes | None, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = spec.decode_device == "gpu"
    randaug = bool(spec.rand_augment)

    @pipeline_def(
        batch_size=spec.micro_batch,
        num_threads=spec.num_threads,
        device_id=spec.device_id if gpu else None,
        seed=seed,
        enable_checkpointing=randaug,
        enable_conditionals=randaug,
    )
    def pipe():
        jpg, anchor, shape, mirror = fn.external_source(source=source, num_outputs=4, batch=True)
        img = fn.decoders.image_slice(
            jpg,
            anchor,
            shape,
            device="mixed" if gpu else "cpu",
            output_type=types.RGB,
            **({"hw_decoder_load": spec.hw_decoder_load} if gpu else {}),
        )
        img = fn.resize(
            img, resize_x=spec.img_size, resize_y=spec.img_size, interp_type=types.INTERP_CUBIC, antialias=True
        )
        if randaug:
            from nvidia.dali.auto_aug import rand_augment

            n, m = parse_rand_augment(spec.rand_augment)
            # DALI's magnitude scale has 31 bins where timm's has 11 (0-10): same fraction of the maximum.
            img = rand_augment.rand_augment(img, n=n, m=round(m * 3), num_magnitude_bins=31, fill_value=128)
        return fn.crop_mirror_normalize(
            img,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD],
            mirror=mirror,
        )

    return pipe(checkpoint=checkpoint) if checkpoint is not None else pipe()


# DALI's conditionals (RandAugment) go through autograph, which writes each converted function to
# /tmp/__autograph_generated_file*.py and imports it under that name.
AUTOGRAPH_PREFIX = "__autograph_generated_file"


def drop_autograph_sources() -> int:
    """Delete the autograph files this process wrote, once their modules are imported; returns how
    many. Autograph deletes them only from an exit handler, which a killed or preempted rank never runs:
    the fine-tune integration tests alone left 98 in /tmp before this. The loaded code stays; only the
    source lines of tracebacks through those functions go."""
    removed = 0
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) if name.startswith(AUTOGRAPH_PREFIX) else None
        if path and os.path.basename(path).startswith(AUTOGRAPH_PREFIX):
            try:
                os.unlink(path)
                removed += 1
            except OSError:  # gone already, or not ours to delete: never a reason to stop a run
                pass
    return removed


class DaliLoader(EpochLoader):
    """Rank-local DALI loader with explicit epochs and exact, checkpointable positions."""

    kind = "dali"

    def __init__(self, spec: LoaderSpec, state: dict | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        super().__init__(spec, state)
        same = state is not None and self.restored_same_layout and state.get("kind") == "dali"
        same = same and state.get("micro_batch") == spec.micro_batch and state.get("rank") == spec.rank
        checkpoint = state.get("dali") if same else None
        # A fresh pipeline after a resume must not replay the run's first random draws.
        seed = spec.seed + 7919 * spec.rank + 104_729 * self.epoch + self.samples_consumed()
        self._source = _Source(self)
        self._start_prefetch()
        self._pipe = build_pipeline(spec, self._source, checkpoint, seed % 2**31)
        self._it = DALIGenericIterator([self._pipe], ["img"], auto_reset=False, prepare_first_batch=False)
        if spec.rand_augment:
            drop_autograph_sources()  # converted while the pipeline was built
        # RandAugment's random state, as of the last batch the training thread took (a checkpoint holds
        # that one, not the state of the batches prepared ahead of it)
        self._dali_state = checkpoint

    def _produce(self, stop):
        while not stop.is_set():
            try:
                out = next(self._it)[0]  # runs the source, DALI's feed and the copy out of the pipeline
            except (DataError, TransientError):
                raise  # a sample that could not be read (recorded by the source), a changed shard, the moment
            except RuntimeError as err:  # DALI could not decode something in the queue
                yield Failed(err, list(self._source.pending))
                return
            rows = self._source.pending.popleft()
            yield rows, out["img"], self._it.checkpoints()[0] if self.spec.rand_augment else None

    def _consumed(self, extra) -> None:
        if extra is not None:
            self._dali_state = extra

    def _failed(self, err: BaseException, rows) -> None:
        if not isinstance(err, RuntimeError) or isinstance(err, DataError) or rows is None:
            raise err
        every = np.concatenate(rows) if rows else np.array([], dtype=np.int64)
        found = preflight.find_undecodable(self.table, every)
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if not found:  # the host decodes them all: DALI alone cannot; leave out the batch at its head
            head = rows[0] if rows else every
            found = [(int(i), f"DALI could not decode the batch holding it ({reason})") for i in head]
        self.stop_with(found, "DALI failed on", err)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.spec.rand_augment and not self.rewound and self._dali_state is not None:
            state["dali"] = self._dali_state
        return state
