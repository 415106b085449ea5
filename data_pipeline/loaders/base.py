"""The training loader interface shared by the DALI pipeline and the PyTorch fallback.

A loader yields ``Batch`` objects for one rank. Its contract:
* the order of samples and the crop of each sample are pure functions of the seed, the epoch and
  the manifest row (``data_pipeline.order``), identical for both loaders;
* every rank yields the same number of micro-batches per epoch, so ranks never disagree on step
  counts; epoch boundaries are explicit (``loader.epoch``);
* within an epoch, the ranks' samples are disjoint and together cover the usable samples once,
  minus fewer than one global batch plus the world size left out (a different few each epoch);
* ``state_dict()`` records positions in samples, so a loader restored from it continues with
  exactly the remaining samples, even when the world size, the micro-batch, the loader kind or
  the set of excluded samples changed in between.

Data pipelines take rank, world size and ranks per node as arguments and never read the launcher's environment.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.loaders.identity import data_identity, identity_changes
from data_pipeline.loaders.source import open_table
from data_pipeline.order.crops import CROP_VERSION
from data_pipeline.order.phases import Phase, RankStream
from data_pipeline.order.select import make_order
from data_pipeline.remote.retry import ChangedObject
from engine.errors import DataError, TransientError

if TYPE_CHECKING:  # torch is imported where tensors are made: the shard tools start without it
    import torch

log = logging.getLogger(__name__)

# Read failures that say nothing about the samples' bytes: a shard that changed or vanished in object
# storage (the run stops, naming it), or a condition of the moment (waited out, then a transient stop).
# Neither is ever recorded as bad samples.
NOT_THE_SAMPLES = (ChangedObject, TransientError)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    img: torch.Tensor  # [N, 3, H, W] float32, ImageNet-normalized, on the loader's output device
    label: torch.Tensor | None  # [N] int64 (-1 for unlabeled data); None when the task reads no labels
    keys: list[str] = field(default_factory=list)  # '<shard>/<key>', for exact-resume checks and logs
    rows: np.ndarray | None = None  # manifest rows of the samples
    void: bool = False  # a stand-in of zeros: this rank could not read in time (EpochLoader.go_void)


@dataclass(frozen=True)
class LoaderSpec:
    shards: str
    rank: int
    world_size: int
    micro_batch: int
    samples_per_rank_step: int  # micro_batch x accumulation: the unit every rank's share is cut in
    img_size: int
    seed: int
    num_threads: int = 4
    decode_device: str = "cpu"  # "gpu" or "cpu", already resolved
    device_id: int | None = None  # CUDA device for outputs and GPU decoding
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_prob: float = 0.5  # horizontal flip probability
    rand_augment: str = ""  # timm-style policy ("rand-m9-mstd0.5-inc1"); empty = MAE's crop + flip only
    hw_decoder_load: float = 0.65  # DALI mixed decode: share of images for the GPU's hardware JPEG decoder
    excluded: tuple[int, ...] = ()  # manifest rows not to read (unreadable; from the start-up check)
    view: str = ""  # run's data_view folder: where samples that fail at run time are recorded
    on_change: str = "refuse"  # resuming mid-epoch on other data or another seed: refuse | next_epoch
    order: str = "global"  # global (a permutation of all rows) | block (data_pipeline.order.block_order); resolved
    block_window: int = 4  # block order: shards shuffled together
    remote: RemoteSpec | None = None  # object storage access and the node's cache (s3:// and https:// shards)
    labels: bool = True  # hand out labels (pretraining reads none: nothing is built or moved for them)
    label_map: tuple[int, ...] | None = None  # stored label -> the label handed out (a dense classifier head)
    keys: bool = True  # hand out sample keys (the trainer asks only when it records them: log.sample_keys)
    crop_version: int = CROP_VERSION  # a new run's crop function; a restored state keeps its own
    threaded: bool = True  # prepare batches in a thread of their own (False: inline, for comparison)


class EpochLoader:
    """Epochs, phases and positions; subclasses turn lists of manifest rows into image batches."""

    kind = "base"

    def __init__(self, spec: LoaderSpec, state: dict | None = None):
        self.spec = spec
        self.table = open_table(spec.shards, spec.remote)
        self.n = len(self.table)
        self.order = make_order(spec.order, self.table, spec.block_window)
        self.prefetch = None
        self.excluded = tuple(sorted(spec.excluded))
        self.epoch = 0
        self.phases = [Phase(spec.world_size, 0, self.excluded)]
        self.restored_same_layout = False
        # a condition of the moment outlasted its patience (go_void): stand-ins from then on
        self.transient: TransientError | None = None
        self._void_taken = 0  # stand-in micro-batches handed out this epoch
        self.rewound = False  # positions set back by restore_snapshot (a transient stop)
        self.crop_version = spec.crop_version
        self._producer: Producer | None = None
        if state is not None:
            self._restore(state)

    # ------------------------------------------------------------------ batches
    def _produce(self, stop: threading.Event) -> Iterator[tuple[np.ndarray, torch.Tensor, object]]:
        """(rows, images, extra) of every micro-batch from the current position on, across epochs, in
        order; runs in the producer thread (it must not change the loader's position). A failure is
        raised from here; the training thread meets it at the batch it belongs to."""
        raise NotImplementedError

    def _failed(self, err: BaseException, rows: np.ndarray | None) -> None:
        """A failure of the producer, met by the training thread: raise it (or record its samples)."""
        raise err

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch's micro-batches. The training thread only takes what the
        producer thread prepared (reads, crops, decoding's hand-over, the copy out of the pipeline)
        and moves the position; see bench/host_path.py."""
        if self._producer is None:
            self._producer = Producer(self._produce, threaded=self.spec.threaded)
        for _ in range(self.micro_batches_left()):
            if self.transient is None:
                item = self._producer.get()
                if isinstance(item, Failed):
                    if isinstance(item.error, TransientError):  # waited out its patience: stand-ins from now on
                        self.go_void(item.error)
                    else:
                        self._failed(item.error, item.rows)
            if self.transient is not None:
                yield self.void_batch()
                continue
            rows, img, extra = item
            self._advance(len(rows))
            self._consumed(extra)
            labels, keys = self.labels_and_keys(rows, img.device)
            yield Batch(img=img, label=labels, keys=keys, rows=rows)
        self._next_epoch()

    def _consumed(self, extra: object) -> None:
        """What a produced batch carries besides its images, once the training thread takes it."""

    def identity(self) -> dict:
        return data_identity(self.table, self.spec.seed, self.spec.order, self.spec.block_window)

    def _start_prefetch(self) -> None:
        """Remote shards: fetch the coming batches' shards ahead of need (data_pipeline.remote)."""
        if self.table.remote:
            from data_pipeline.remote.prefetch import Prefetcher

            self.prefetch = Prefetcher(self.table, self.future_batches(), self.table.source.spec.ahead)

    def stop_on_unreadable(self, rows: np.ndarray, err: Exception) -> None:
        """A read failed under a batch (a tar gone, short, or not fetched): find which samples, record them."""
        from data_pipeline.loaders import preflight

        found = preflight.find_undecodable(self.table, rows)
        if not found:
            raise err
        self.stop_with(found, "cannot read", None)

    def stop_with(self, found: list[tuple[int, str]], what: str, cause: Exception | None) -> None:
        """Record samples that failed at run time in the run's data_view and stop this rank with one line:
        the restart skips and counts them (every rank agrees on them at start-up)."""
        from data_pipeline.loaders import preflight

        path = preflight.record_runtime_bad(self.spec.view, self.spec.rank, self.table, found)
        names = ", ".join(f"{self.table.key(i)} ({why})" for i, why in found[:3])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise DataError(
            f"rank {self.spec.rank}: {what} sample(s) {names}{more}; recorded in {path}: restart the run (same "
            "command) and they are skipped and counted",
            rank_local=True,
        ) from cause

    def go_void(self, err: TransientError) -> None:
        """A read of this rank outlasted its patience (throttling, a full cache disk, ...). This rank
        cannot take part in the next steps with data, and stopping alone would leave the others waiting
        in a collective: from now on it hands out stand-ins of zeros (``void_batch``) without moving
        its position, the trainer marks their steps void (skipped on every rank), every rank stops at
        the same step, and the positions are set back to the last step all ranks trained
        (``restore_snapshot``) before the save. Nothing is recorded against the data."""
        if self.transient is None:
            self.transient = err
            log.warning(
                "rank %d: %s; standing in empty batches until every rank stops at the same step, then saving and "
                "exiting 75",
                self.spec.rank,
                err.one_line(),
            )

    def void_batch(self) -> Batch:
        """A micro-batch of zeros in the training shape (labels 0, no keys, no rows)."""
        import torch

        n, s = self.spec.micro_batch, self.spec.img_size
        dev = torch.device("cuda", self.spec.device_id) if self.spec.device_id is not None else torch.device("cpu")
        self._void_taken += 1
        zeros = torch.zeros(n, 3, s, s, device=dev)
        labels = torch.zeros(n, dtype=torch.int64, device=dev) if self.spec.labels else None
        return Batch(zeros, labels, [], np.zeros(0, np.int64), void=True)

    def snapshot(self) -> tuple[int, tuple[Phase, ...]]:
        """Where the loader is (cheap: the trainer keeps one per recent step)."""
        return self.epoch, tuple(self.phases)

    def restore_snapshot(self, snap: tuple[int, tuple[Phase, ...]]) -> None:
        self.epoch, self.phases = snap[0], list(snap[1])
        self.transient, self._void_taken, self.rewound = None, 0, True

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
        if self.prefetch is not None:
            self.prefetch.close()
        self.table.close()

    def _restore(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.crop_version = int(state.get("crops", 1))  # states from before crop versions: version 1
        phases = [Phase.from_state(p) for p in state["phases"]]
        last = phases[-1]
        saved = state.get("data")
        if saved is not None and identity_changes(saved["identity"], self.identity()):
            # other data or another seed (allowed by check_data_change): the next epoch starts anew
            if not (saved.get("at_boundary") and last.consumed == 0):
                self.epoch += 1
            self.phases = [Phase(self.spec.world_size, 0, self.excluded)]
            log.warning("data: epoch %d starts with the new data", self.epoch)
            return
        if last.world == self.spec.world_size and last.excluded == self.excluded:
            self.phases = phases  # same layout: continue the phase
            self.restored_same_layout = True
        else:  # another world size or newly excluded rows: a new phase over what is left of this epoch
            self.phases = [*phases, Phase(self.spec.world_size, 0, self.excluded)]
            log.warning(
                "data: epoch %d continues as phase %d (was %d ranks, %d excluded rows; now %d ranks, %d): the "
                "samples not yet read this epoch are split anew, none repeated",
                self.epoch,
                len(self.phases),
                last.world,
                len(last.excluded),
                self.spec.world_size,
                len(self.excluded),
            )

    # ------------------------------------------------------------------ plan
    def stream(self, epoch: int | None = None, phases: list[Phase] | None = None) -> RankStream:
        s = self.spec
        epoch = self.epoch if epoch is None else epoch
        return self.order.stream(s.seed, epoch, phases or self.phases, s.rank, s.samples_per_rank_step)

    def future_batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, rows) of every micro-batch from the current position on, across epochs."""
        epoch, phases = self.epoch, list(self.phases)
        while True:
            for rows in self.stream(epoch, phases).batches(self.spec.micro_batch):
                yield epoch, rows
            epoch, phases = epoch + 1, [Phase(self.spec.world_size, 0, self.excluded)]

    @property
    def position(self) -> int:
        """Micro-batches of the current phase taken so far (counted in this run's micro-batch; stand-ins
        count, so every rank agrees on accumulation boundaries)."""
        return self.phases[-1].consumed // self.spec.micro_batch + self._void_taken

    def micro_batches_left(self) -> int:
        return self.stream().length // self.spec.micro_batch

    def _advance(self, samples: int) -> None:
        last = self.phases[-1]
        self.phases[-1] = Phase(last.world, last.consumed + samples, last.excluded)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.phases = [Phase(self.spec.world_size, 0, self.excluded)]
        self._void_taken = 0

    def labels_and_keys(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor | None, list[str]]:
        """The batch's labels on ``device`` (None when the task reads none; from pinned memory without
        waiting, on a GPU) and its sample keys."""
        import torch

        labels = None
        keys = [self.table.key(i) for i in rows] if self.spec.keys else []
        if self.spec.labels:
            stored = self.table.label[rows]
            if self.spec.label_map is not None:
                stored = np.asarray(self.spec.label_map, dtype=np.int64)[stored]
            labels = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.int64))
            if device.type == "cuda":
                labels = labels.pin_memory().to(device, non_blocking=True)
        return labels, keys

    def at_epoch_boundary(self) -> bool:
        """At an epoch's start, or with nothing of it left to read (a save after its last step)."""
        return self.phases == [Phase(self.spec.world_size, 0, self.excluded)] or self.micro_batches_left() == 0

    def data_state(self) -> dict:
        """What this epoch's order came from, and where in it the loader is (the same on every rank)."""
        return {
            "identity": self.identity(),
            "epoch": self.epoch,
            "samples_into_epoch": self.samples_consumed(),
            "at_boundary": self.at_epoch_boundary(),
        }

    def state_dict(self) -> dict:
        return {
            "data": self.data_state(),
            "kind": self.kind,
            "epoch": self.epoch,
            "phases": [p.to_state() for p in self.phases],
            "rank": self.spec.rank,
            "micro_batch": self.spec.micro_batch,
            "crops": self.crop_version,  # the crop function this run started with (order/crops.py)
        }

    def samples_consumed(self) -> int:
        return self.phases[-1].consumed


@dataclass
class Failed:
    """A failure in the producer thread, with the rows of the batches it was preparing."""

    error: BaseException
    rows: np.ndarray | None = None


class Producer:
    """Runs ``produce(stop)`` in a daemon thread, ``depth`` batches ahead of the training thread; or,
    ``threaded=False``, in the training thread itself as batches are asked for."""

    def __init__(self, produce: Callable[[threading.Event], Iterator], depth: int = 2, threaded: bool = True):
        self.stop = threading.Event()
        self._items = produce(self.stop)
        self.threaded = threaded
        self.queue: queue.Queue = queue.Queue(depth)
        # The last batches handed out, still referenced here: when the training thread drops one, the
        # memory is freed when this thread drops it, not there (unmapping a DataLoader worker's shared
        # memory costs ~60 us per sample on the CPU). GPU batches are freed in the caching allocator.
        self._held: collections.deque = collections.deque(maxlen=depth + 2)
        if threaded:
            self.thread = threading.Thread(target=self._run, name="batch-producer", daemon=True)
            self.thread.start()
            _LIVE.add(self)

    def _run(self) -> None:
        try:
            for item in self._items:
                if not isinstance(item, Failed) and getattr(item[1], "is_cuda", True) is False:
                    self._held.append(item[1])
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the training thread, which raises it in order
            self._put(Failed(err))

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        if not self.threaded:
            try:
                return next(self._items)
            except Exception as err:
                return Failed(err)
        return self.queue.get()

    def close(self) -> None:
        self.stop.set()
        if self.threaded:
            while not self.queue.empty():  # a producer blocked on a full queue sees the stop
                self.queue.get_nowait()
            self.thread.join(timeout=5)
        if not self.threaded or not self.thread.is_alive():
            self._items.close()  # its pipeline or DataLoader iterator goes with it
        _LIVE.discard(self)


# Producers not closed by their owner are stopped at interpreter exit, before daemon threads are frozen:
# a thread left inside DALI's pipeline then would abort the process ("terminate called ...").
_LIVE: weakref.WeakSet[Producer] = weakref.WeakSet()


@atexit.register
def _close_live_producers() -> None:
    for producer in list(_LIVE):
        with contextlib.suppress(Exception):
            producer.close()
