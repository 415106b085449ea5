"""The training thread only steps: crops for a whole batch in one call (and old runs keep their crops),
batches prepared in a thread of their own, keys and labels only when asked for, and no host-device
sync on the steps that do not log, counted around the whole step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.order.crops import CROP_VERSION, crop_batch, crop_boxes, crop_params
from tests.helpers import in_process_config, train_in_process

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


def test_batch_crops_follow_torchvisions_algorithm():
    n = 20_000
    rows = np.arange(n)
    w = np.random.default_rng(0).integers(40, 900, n)
    h = np.random.default_rng(1).integers(40, 900, n)
    b = crop_boxes(3, 7, rows, w, h, SCALE, RATIO, 0.5)
    assert b.shape == (n, 5) and (b[:, :4] >= 0).all() and (b[:, 4] == b[:, 4].astype(bool)).all()
    assert (b[:, 0] + b[:, 2] <= 1 + 1e-12).all() and (b[:, 1] + b[:, 3] <= 1 + 1e-12).all()
    px_w, px_h = b[:, 2] * w, b[:, 3] * h
    assert np.allclose(px_w, np.round(px_w)) and np.allclose(px_h, np.round(px_h))  # whole pixels
    area, aspect = b[:, 2] * b[:, 3], px_w / px_h
    usual = (w >= 300) & (h >= 300) & (w / h >= RATIO[0]) & (w / h <= RATIO[1])  # a draw always fits these
    drawn = (area >= SCALE[0] - 0.01) & (aspect >= RATIO[0] - 0.01) & (aspect <= RATIO[1] + 0.01)
    assert usual.sum() > 1000 and drawn[usual].all() and abs(b[:, 4].mean() - 0.5) < 0.02
    v1 = np.array([crop_params(3, 7, i, int(w[i]), int(h[i]), SCALE, RATIO) for i in range(2000)])
    assert abs((v1[:, 2] * v1[:, 3]).mean() - area.mean()) < 0.02  # the same distribution as version 1
    # a pure function of (seed, epoch, row): the batch a row comes in does not matter
    some = np.array([5, 19_999, 0, 777])
    assert np.array_equal(crop_boxes(3, 7, some, w[some], h[some], SCALE, RATIO), b[some])
    assert not np.array_equal(crop_boxes(3, 8, some, w[some], h[some], SCALE, RATIO), b[some])
    # an image no draw fits: the central crop at the nearest allowed aspect, as torchvision does
    strip = crop_boxes(0, 0, np.arange(2), np.array([1000, 10]), np.array([10, 1000]), SCALE, RATIO)
    old = [crop_params(0, 0, i, wd, ht, SCALE, RATIO) for i, (wd, ht) in enumerate([(1000, 10), (10, 1000)])]
    assert np.allclose(strip[:, :4], np.array([o[:4] for o in old]))
    assert np.array_equal(crop_batch(1, 3, 7, rows[:50], w[:50], h[:50], SCALE, RATIO, 0.5), v1[:50].astype(float))
    assert CROP_VERSION == 2 and math.isclose(
        crop_batch(2, 3, 7, rows[:9], w[:9], h[:9], SCALE, RATIO, 0.5)[4, 2], b[4, 2]
    )


def spec(shards, **kw) -> LoaderSpec:
    return LoaderSpec(str(shards), 0, 1, 4, 4, img_size=16, seed=5, num_threads=1, **kw)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_a_run_keeps_the_crops_it_started_with(demo_shards, kind):
    """A loader state written before crop versions resumes with version 1, image for image; a new run's
    state records version 2."""
    straight = make_loader(kind, spec(demo_shards, crop_version=1))
    batches = iter(straight)
    first = [next(batches) for _ in range(3)]
    state = straight.state_dict()
    rest = [next(batches).img for _ in range(4)]
    straight.close()
    assert state["crops"] == 1
    del state["crops"]  # as a checkpoint of an earlier version holds it
    resumed = make_loader(kind, spec(demo_shards), state)  # (a new run would crop with version 2)
    assert resumed.crop_version == 1
    again = iter(resumed)
    assert all(torch.equal(a, next(again).img) for a in rest)
    resumed.close()
    fresh = make_loader(kind, spec(demo_shards))
    assert fresh.state_dict()["crops"] == 2 and not torch.equal(next(iter(fresh)).img, first[0].img)
    fresh.close()


def test_keys_and_labels_only_when_asked_for(demo_shards):
    loader = make_loader("dali", spec(demo_shards, keys=False, labels=False))
    b = next(iter(loader))
    assert b.keys == [] and b.label is None and len(b.rows) == 4
    loader.close()
    loader = make_loader("dali", spec(demo_shards))
    b = next(iter(loader))
    assert len(b.keys) == 4 and b.label.shape == (4,)
    loader.close()


def test_batches_are_the_same_made_in_a_thread_or_inline(demo_shards):
    for kind in ("dali", "torch"):
        a = [b.img for b, _ in zip(make_loader(kind, spec(demo_shards, threaded=True)), range(5))]
        b = [b.img for b, _ in zip(make_loader(kind, spec(demo_shards, threaded=False)), range(5))]
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def syncs(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_no_host_sync_on_steps_that_do_not_log(demo_shards, tmp_path, monkeypatch):
    """log.sync_debug on a CPU: a spy counts what would wait for a GPU, around the whole step (the batch's
    fetch included). None on the steps that do not log; one planted .item() per step is seen, and where."""
    from engine.tasks.masked_modeling import PretrainTask

    sets = ("log.sync_debug=true", "log.interval=4", "debug.flag_lag=2")
    train_in_process(in_process_config(tmp_path / "clean", demo_shards, 8, *sets))
    assert [r["host_syncs_non_logging_steps"] for r in syncs(tmp_path / "clean")] == [0, 0]
    forward = PretrainTask.forward

    def reads_the_loss(self, engine, batch, timer):
        out = forward(self, engine, batch, timer)
        out.loss.item()  # a host sync on a GPU
        return out

    monkeypatch.setattr(PretrainTask, "forward", reads_the_loss)
    train_in_process(in_process_config(tmp_path / "planted", demo_shards, 8, *sets))
    last = syncs(tmp_path / "planted")[-1]
    assert last["host_syncs_non_logging_steps"] == 8 * 2 - 2  # every micro-step but the two that logged
    assert "test_host_path.py" in last["host_sync_sites"][0] and "(item)" in last["host_sync_sites"][0]
