"""The data plan across resumes that change something: every sample at most once per epoch, and
every usable sample once when nothing is left out (real DALI on CPU and the fallback loader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.order.crops import crop_params
from data_pipeline.order.global_order import phase_pool, rank_stream
from data_pipeline.order.phases import Phase, rank_range

N = 72  # samples in the demo shards


def spec(root: Path, rank: int, world: int, micro: int, accum: int = 1, **kw) -> LoaderSpec:
    return LoaderSpec(str(root), rank, world, micro, micro * accum, img_size=16, seed=5, num_threads=1, **kw)


def read(loaders, batches: int | None = None) -> list[str]:
    """Keys of the next ``batches`` micro-batches of every loader (all of this epoch when None)."""
    keys = []
    for loader in loaders:
        it = iter(loader)
        for k, b in enumerate(it):
            keys += b.keys
            if batches is not None and k + 1 == batches:
                break
    return keys


def test_streams_partition_one_phase():
    for world, step in ((1, 8), (2, 4), (3, 5), (5, 4)):
        phases = [Phase(world, 0)]
        rows = [rank_stream(1, 0, N, phases, r, step).rows for r in range(world)]
        flat = np.concatenate(rows)
        assert len(set(flat.tolist())) == len(flat)  # disjoint
        assert all(len(r) == (N // world) // step * step for r in rows)  # equal whole steps per rank
        assert N - len(flat) < world * step + world  # less than a global batch plus the world left out


def test_later_phases_skip_what_earlier_ones_took():
    phases = [Phase(2, 8), Phase(3, 5, (3, 7)), Phase(1, 0, (3, 7, 11))]
    taken = []
    pool = phase_pool(0, 4, N, phases[:1])
    taken += [pool[lo : lo + 8] for lo, _ in (rank_range(len(pool), r, 2) for r in range(2))]
    pool2 = phase_pool(0, 4, N, phases[:2])
    taken += [pool2[lo : lo + 5] for lo, _ in (rank_range(len(pool2), r, 3) for r in range(3))]
    last = phase_pool(0, 4, N, phases)
    used = np.concatenate(taken)
    assert not set(last.tolist()) & set(used.tolist()) and not {3, 7, 11} & set(last.tolist())
    assert len(last) + len(used) + len({3, 7, 11} - set(used.tolist())) == N


def test_crop_params_are_a_pure_function():
    a = crop_params(1, 2, 3, 500, 375, (0.2, 1.0), (0.75, 4 / 3))
    assert a == crop_params(1, 2, 3, 500, 375, (0.2, 1.0), (0.75, 4 / 3))
    assert a != crop_params(1, 3, 3, 500, 375, (0.2, 1.0), (0.75, 4 / 3))
    x, y, w, h, _ = a
    assert x >= 0 and y >= 0 and x + w <= 1 + 1e-9 and y + h <= 1 + 1e-9
    assert 0.2 * 0.99 <= w * h <= 1.0


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_resume_with_another_micro_batch_reads_each_sample_once(demo_shards, kind):
    """Micro-batch 4 x accumulation 1, three steps, then micro-batch 2 x accumulation 2."""
    first = [make_loader(kind, spec(demo_shards, r, 2, 4)) for r in range(2)]
    seen = read(first, batches=3)
    states = [lo.state_dict() for lo in first]
    assert all(s["phases"] == [[2, 12, []]] for s in states)  # positions are samples, not batches
    second = [make_loader(kind, spec(demo_shards, r, 2, 2, accum=2), states[r]) for r in range(2)]
    assert all(lo.position == 6 for lo in second)  # 12 samples = 6 micro-batches of 2
    seen += read(second)
    assert len(seen) == len(set(seen)) == N  # the whole epoch, nothing twice
    assert all(lo.epoch == 1 for lo in second)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_elastic_resume_splits_the_rest_of_the_epoch(demo_shards, kind):
    """2 ranks take 2 steps of 4, then 3 ranks (global batch 12: micro 4) read the rest."""
    first = [make_loader(kind, spec(demo_shards, r, 2, 6)) for r in range(2)]
    seen = read(first, batches=2)
    state = first[0].state_dict()
    second = [make_loader(kind, spec(demo_shards, r, 3, 4), state) for r in range(3)]
    rest = read(second)
    assert len(seen) == 24 and not set(seen) & set(rest) and len(rest) == len(set(rest))
    assert len(seen) + len(rest) > N - 12 - 3  # less than a global batch plus the world left out
    nxt = read(second)  # the next epoch is whole again, on the new world
    assert len(nxt) == len(set(nxt)) == 72 and all(lo.epoch == 2 for lo in second)


def test_newly_excluded_samples_are_never_read(demo_shards):
    first = make_loader("dali", spec(demo_shards, 0, 1, 8))
    seen = read([first], batches=2)
    rest_plan = first.stream().rows
    banned = tuple(sorted(int(r) for r in rest_plan[:3]))  # three samples still to come turn out bad
    second = make_loader("torch", spec(demo_shards, 0, 1, 8, excluded=banned), first.state_dict())
    rest = [b for b in second]
    rows = np.concatenate([b.rows for b in rest])
    assert not set(banned) & set(rows.tolist())
    keys = seen + [k for b in rest for k in b.keys]
    assert len(keys) == len(set(keys)) == N - 8  # 72 - 3 bad = 69 -> 8 whole batches of 8


def test_loader_kind_change_keeps_the_order(demo_shards):
    dali = make_loader("dali", spec(demo_shards, 1, 2, 4))
    read([dali], batches=3)
    state = dali.state_dict()
    a = [b.keys for b in make_loader("dali", spec(demo_shards, 1, 2, 4), state)]
    b = [b.keys for b in make_loader("torch", spec(demo_shards, 1, 2, 4), state)]
    assert a == b and len(a) == 9 - 3


def test_flip_probability_controls_mirroring_and_keeps_the_box():
    """flip_prob=0 (digits, text) never mirrors; the crop box is the same whatever flip_prob is."""
    args = (500, 375, (0.2, 1.0), (0.75, 4 / 3))
    never = [crop_params(0, 0, r, *args, flip_prob=0.0) for r in range(200)]
    always = [crop_params(0, 0, r, *args, flip_prob=1.0) for r in range(200)]
    half = [crop_params(0, 0, r, *args) for r in range(200)]
    assert not any(c[4] for c in never) and all(c[4] for c in always)
    assert 60 < sum(c[4] for c in half) < 140
    assert [c[:4] for c in never] == [c[:4] for c in always] == [c[:4] for c in half]
