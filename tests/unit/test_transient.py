"""Faults that pass leave no trace: throttling, cut connections and a full cache disk are waited out
(capped backoff with full jitter, up to a patience) and never recorded against the data; past the
patience, training saves the last step every rank finished and stops with exit code 75, and the same
command continues exactly. Shards whose bytes changed stop the run with one line. In-process: the
object store lives in this process's memory (tests/memory_store.py)."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
import uuid
from pathlib import Path

import pytest
import torch

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.remote.retry import ChangedObject, TransientFetchError, backoff_wait, with_retries
from data_pipeline.remote.stores import MissingObject, S3Store
from data_pipeline.shards.upload import upload
from engine.errors import DataError
from engine.loop.engines import LocalEngine
from engine.run_folder import checkpoints as ckpt
from tests.helpers import in_process_config, train_in_process
from tests.memory_store import MemoryStore

N = 72  # samples in the demo shards


@pytest.fixture(autouse=True)
def _clean_faults():
    MemoryStore.faults.reset()
    yield
    MemoryStore.faults.reset()


def publish(folder: Path) -> str:
    url = f"mem://{uuid.uuid4().hex[:8]}/demo"
    upload(folder, url, workers=2)
    return url


def spec(shards: str, tmp: Path, micro: int = 4, **remote) -> LoaderSpec:
    kw = {"cache_dir": str(tmp / "cache"), "patience_s": 5.0, "backoff_s": 0.02, "backoff_cap_s": 0.1, **remote}
    return LoaderSpec(
        shards, 0, 1, micro, micro, img_size=16, seed=5, num_threads=1, order="block", view=str(tmp / "view"),
        remote=RemoteSpec(**kw),
    )  # fmt: skip


def keys_of(loader) -> list[str]:
    """The keys of the loader's epoch; the loader is closed after (its read-ahead stops writing the cache)."""
    try:
        return [k for b in loader for k in b.keys]
    finally:
        loader.close()


# ------------------------------------------------------------------------------ classification


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("SlowDown", 503, OSError),
        ("InternalError", 500, OSError),
        ("TooManyRequests", 429, OSError),
        ("RequestTimeout", 400, OSError),
        ("NoSuchKey", 404, MissingObject),
        ("AccessDenied", 403, DataError),
        ("InvalidRange", 416, DataError),
    ],
)
def test_s3_answers_are_sorted_into_transient_and_permanent(code, status, kind):
    from botocore.exceptions import ClientError

    store = S3Store("s3://bucket/prefix", RemoteSpec())
    with pytest.raises(kind) as info, store._errors("shard-000001.tar"):
        raise ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    assert "s3://bucket/prefix/shard-000001.tar" in str(info.value)
    assert isinstance(info.value, DataError) != (kind is OSError)  # transient faults are never user errors


def test_connection_faults_are_transient():
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    store = S3Store("s3://bucket/prefix", RemoteSpec())
    for err in (
        EndpointConnectionError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        RetriesExceededError(OSError("reset")),
    ):
        with pytest.raises(OSError) as info, store._errors("a.tar"):
            raise err
        assert not isinstance(info.value, DataError)


def test_backoff_is_capped_with_full_jitter():
    spec_ = RemoteSpec(backoff_s=1.0, backoff_cap_s=8.0)
    rng = random.Random(0)
    waits = [backoff_wait(attempt, spec_, rng) for attempt in range(12) for _ in range(50)]
    assert min(waits) >= 0 and max(waits) <= 8.0
    late = [backoff_wait(10, spec_, rng) for _ in range(200)]
    assert min(late) < 1.0 and max(late) > 7.0  # uniform over [0, cap]: ranks that failed together spread out
    assert len({round(w, 6) for w in late}) == len(late)


def test_transient_faults_are_waited_out_and_logged_once(caplog):
    spec_ = RemoteSpec(patience_s=5.0, backoff_s=0.01, backoff_cap_s=0.02)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 6:
            raise OSError("s3://b/x.tar: SlowDown (HTTP 503)")
        return "bytes"

    with caplog.at_level(logging.INFO, logger="data_pipeline.remote.retry"):
        assert with_retries(flaky, "s3://b/x.tar", spec_) == "bytes"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(calls) == 6 and len(warnings) == 2  # when the trouble began, and when it ended
    assert "retrying with backoff" in warnings[0] and "answered again" in warnings[1]


def test_patience_ends_in_a_transient_error_and_permanent_faults_are_not_retried():
    spec_ = RemoteSpec(patience_s=0.3, backoff_s=0.01, backoff_cap_s=0.05)

    def down():
        raise OSError("connection reset by peer")

    with pytest.raises(TransientFetchError, match="data.fetch_patience_s=0.3") as info:
        with_retries(down, "s3://b/x.tar", spec_, shard="x")
    assert info.value.exit_code == 75 and info.value.shard == "x" and not isinstance(info.value, DataError)
    for permanent in (MissingObject("gone"), DataError("AccessDenied"), ChangedObject("other bytes")):
        calls = []

        def fail(err=permanent, calls=calls):
            calls.append(1)
            raise err

        with pytest.raises(type(permanent)):
            with_retries(fail, "x", spec_)
        assert len(calls) == 1


# ------------------------------------------------------------------------------ the loaders


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_throttling_within_patience_leaves_no_trace(demo_shards, tmp_path, kind):
    url = publish(demo_shards)
    local = keys_of(make_loader(kind, spec(str(demo_shards), tmp_path / "local")))
    MemoryStore.faults.throttle_until = __import__("time").monotonic() + 0.5  # every request for half a second
    got = keys_of(make_loader(kind, spec(url, tmp_path, patience_s=20.0)))
    assert MemoryStore.faults.calls["throttled"] > 0
    assert sorted(got) == sorted(local) and len(got) == len(set(got)) == N - N % 4
    assert not (tmp_path / "view").exists()  # nothing recorded
    assert not list((tmp_path / "cache").rglob("*.reserve")) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_full_cache_disk_is_waited_out(demo_shards, tmp_path):
    url = publish(demo_shards)
    MemoryStore.faults.full_disk = 3  # three downloads write half a tar, then ENOSPC
    got = keys_of(make_loader("torch", spec(url, tmp_path)))
    assert MemoryStore.faults.calls["full_disk"] == 3
    assert len(got) == len(set(got)) == N - N % 4 and not (tmp_path / "view").exists()
    assert not list((tmp_path / "cache").rglob("*.tmp")) and not list((tmp_path / "cache").rglob("*.reserve"))


def test_patience_exhausted_stands_in_empty_batches_without_moving(demo_shards, tmp_path):
    url = publish(demo_shards)
    MemoryStore.faults.throttle_from = 1  # every tar download: the storage is down
    loader = make_loader("torch", spec(url, tmp_path, patience_s=0.3))
    it = iter(loader)
    first = next(it)
    assert first.void and first.keys == [] and torch.count_nonzero(first.img) == 0 and first.img.shape == (4, 3, 16, 16)
    assert isinstance(loader.transient, TransientFetchError) and loader.samples_consumed() == 0
    assert next(it).void and loader.position == 2  # stand-ins count for accumulation boundaries, not as reads
    assert not (tmp_path / "view").exists()


def make_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_shorter_object_with_other_images_is_a_changed_shard(demo_shards, tmp_path):
    """The object is replaced by a shorter tar holding other images under its keys: never a 'truncated
    upload' to keep, never recorded: the run stops with one line that names it."""
    from data_pipeline.dataset.wds_index import read_index

    url = publish(demo_shards)
    victim, donor = json.loads((demo_shards / "dataset.json").read_text())["shards"][:2]
    donor_tar = (demo_shards / f"{donor}.tar").read_bytes()
    members = []
    for mine, theirs in zip(read_index(demo_shards / f"{victim}.idx")[:3], read_index(demo_shards / f"{donor}.idx")):
        jpg = theirs.component("jpg")
        members += [(f"{mine.key}.jpg", donor_tar[jpg.offset : jpg.offset + jpg.size]), (f"{mine.key}.cls", b"0")]
    MemoryStore.replace(f"{url}/{victim}.tar", make_tar(members))
    with pytest.raises(ChangedObject) as info:
        keys_of(make_loader("torch", spec(url, tmp_path, retries=2)))
    msg = info.value.one_line()
    assert f"{victim}.tar changed since it was written or indexed" in msg and "\n" not in str(info.value)
    assert "in 2 downloads" in msg and info.value.rank_local and info.value.exit_code == 2
    assert not (tmp_path / "view").exists()


def test_same_size_replaced_bytes_of_an_indexed_folder_are_caught(demo_tree, tmp_path):
    """index_shards records each tar's content checksum; a fetch holds the object to it."""
    from data_pipeline.shards.index_shards import main as index_main
    from tests.helpers import make_img2dataset

    (tmp_path / "wds").mkdir()
    tars = make_img2dataset(tmp_path / "wds", demo_tree)
    assert index_main([str(tars), str(tmp_path / "index"), "--label", "json:label", "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "index" / "dataset.json").read_text())
    assert set(meta["tar_checksum"]) == set(meta["shards"])
    url = publish(tmp_path / "index")
    name = meta["shards"][0]
    data = bytearray((tars / f"{name}.tar").read_bytes())
    data[1100] ^= 0xFF  # one byte inside the first image, same size
    MemoryStore.replace(f"{url}/{name}.tar", bytes(data))
    with pytest.raises(ChangedObject, match="content checksum differs"):
        keys_of(make_loader("torch", spec(url, tmp_path, retries=1)))


def test_a_folder_without_checksums_is_held_to_its_first_fetch_on_the_node(demo_shards, tmp_path):
    import shutil

    old = shutil.copytree(demo_shards, tmp_path / "old")  # as written before checksums were recorded
    meta = json.loads((old / "dataset.json").read_text())
    del meta["tar_checksum"]
    (old / "dataset.json").write_text(json.dumps(meta))
    url = publish(old)
    assert len(keys_of(make_loader("torch", spec(url, tmp_path)))) == N - N % 4
    recorded = json.loads(next((tmp_path / "cache" / "meta").glob("*/checksums.json")).read_text())
    assert set(recorded) == set(meta["shards"])
    shutil.rmtree(tmp_path / "cache" / "shards")  # a fresh shard cache on the same node
    name = meta["shards"][2]
    data = bytearray(MemoryStore.buckets[url.split("/")[2]][f"demo/{name}.tar"])
    data[700] ^= 0xFF
    MemoryStore.replace(f"{url}/{name}.tar", bytes(data))
    with pytest.raises(ChangedObject, match="this node records"):
        keys_of(make_loader("torch", spec(url, tmp_path, retries=1)))


# ------------------------------------------------------------------------------ training


def config(run: Path, shards: str, steps: int, *sets: str):
    return in_process_config(
        run,
        shards,
        steps,
        "log.sample_keys=true",
        "fault.heartbeat_s=60",
        "checkpoint.interval=4",
        "data.prefetch_shards=1",
        "data.block_window=1",
        f"data.cache_dir={run.parent / 'cache'}",
        *sets,
    )


def state(run: Path) -> dict[str, torch.Tensor]:
    path = ckpt.list_checkpoints(run / "checkpoints")[-1] / LocalEngine.FILE
    s = torch.load(path, weights_only=False)
    flat = {f"opt.{i}.{k}": v for i, st in s["optimizer"]["state"].items() for k, v in st.items()}
    return {**s["module"], **flat}


def test_storage_down_beyond_patience_saves_and_stops_then_resumes_exactly(demo_shards, tmp_path):
    """The storage stops answering mid-run for longer than data.fetch_patience_s: the run stands in empty
    data, undoes those steps, saves the last step it trained and stops with exit code 75's result; nothing is
    recorded. Once the storage answers again, the same command finishes the run, equal bit for bit (weights,
    Adam moments, sample keys) to a run the storage never failed."""
    url = publish(demo_shards)
    straight = train_in_process(config(tmp_path / "straight" / "run", url, 12))
    assert straight["complete"]
    run = tmp_path / "faulty" / "run"
    MemoryStore.faults.reset()
    MemoryStore.faults.throttle_from = 4  # the fourth tar download and every later one: 503 SlowDown
    first = train_in_process(config(run, url, 12, "data.fetch_patience_s=0.5", "data.cache_gb=0.0001"))
    assert first["transient"] and not first["complete"] and 0 < first["step"] < 12
    assert ckpt.step_of(ckpt.newest_complete(run / "checkpoints").name) == first["step"]
    assert (run / "PREEMPTED").read_text().split() == [str(first["step"]), "transient"]
    assert not (run / "data_view" / "runtime_bad_rank0.json").exists()
    assert json.loads((run / "data_view" / "view.json").read_text())["bad_samples"] == 0
    MemoryStore.faults.heal()
    second = train_in_process(config(run, url, 12, "data.fetch_patience_s=0.5", "data.cache_gb=0.0001"))
    assert second == {"step": 12, "complete": True}
    a, b = state(tmp_path / "straight" / "run"), state(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = [(p / "sample_keys" / "rank0.tsv").read_text() for p in (tmp_path / "straight" / "run", run)]
    assert keys[0] == keys[1]


# ------------------------------------------------------------------------------ the node's cache


def test_reservations_are_alive_while_their_lock_is_held(tmp_path):
    """Liveness is a lock, not a pid: a reservation naming PID 1 (alive in every namespace) whose fetch is
    gone is reclaimed; a live fetch of another container, naming a pid that means nothing here, is not.
    flock treats each open file as its own owner, so a second open of the file stands in for the other
    container's process (tests/integration/test_object_storage_runs.py uses a real PID namespace)."""
    import fcntl
    import os

    from data_pipeline.remote.cache import ShardCache

    cache = ShardCache(tmp_path, "ns", budget=1000)
    ns = tmp_path / "ns"
    (ns / "a.tar").write_bytes(b"x" * 100)
    (ns / "b.reserve").write_text("500 1")  # an earlier version's format: bytes and a pid
    (ns / "b.tar.1.tmp").write_bytes(b"y" * 10)
    (ns / "c.reserve").write_text("300 c.tar.0a1b2c3d4e5f.tmp\n")
    (ns / "c.tar.0a1b2c3d4e5f.tmp").write_bytes(b"z" * 10)
    held = os.open(ns / "c.reserve", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        assert cache.usage() == 100 + 300
        assert not (ns / "b.reserve").exists() and not (ns / "b.tar.1.tmp").exists()
        assert (ns / "c.reserve").exists() and (ns / "c.tar.0a1b2c3d4e5f.tmp").exists()
    finally:
        os.close(held)  # the fetcher dies
    assert cache.usage() == 100
    assert not (ns / "c.reserve").exists() and not (ns / "c.tar.0a1b2c3d4e5f.tmp").exists()
    path = cache.ensure("d", 950, lambda tmp: tmp.write_bytes(b"d" * 950), deadline=float("inf"))
    assert path.read_bytes() == b"d" * 950 and not (ns / "a.tar").exists()  # a was evicted for it
    assert not list(ns.glob("*.reserve")) and not list(ns.glob("*.tmp"))


def test_the_end_of_run_figure_reads_shards_with_the_runs_own_settings(demo_shards, tmp_path):
    """The reconstruction figure reads its images through the run's data settings (its cache folder and
    store), like the loaders: a finished run whose shards are in object storage gets its figure."""
    url = publish(demo_shards)
    run = tmp_path / "run"
    result = train_in_process(config(run, url, 2, "log.reconstructions=true"))
    assert result == {"step": 2, "complete": True} and (run / "reconstructions.png").stat().st_size > 0
    assert list((run.parent / "cache" / "meta").iterdir())  # read through the run's cache folder
