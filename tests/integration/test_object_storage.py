"""Shards in object storage, against a real S3-compatible server on the loopback interface (moto's
server mode): the same samples as the local folder, network faults waited out and never recorded,
changed objects named, a cache that stays within its budget, and the checks made before launch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.dataset.locations import RemoteSpec
from data_pipeline.dataset.table import read_table
from data_pipeline.loaders.base import LoaderSpec
from data_pipeline.loaders.factory import make_loader
from data_pipeline.loaders.source import open_table
from data_pipeline.remote.checks import check_cache
from data_pipeline.shards.upload import upload
from engine.errors import ConfigError, DataError
from tests.object_store import CuttingProxy, environment, s3_server

N = 72


@pytest.fixture(scope="module")
def s3(demo_shards, tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("aws")) as server, environment(server.env):
        server.client().create_bucket(Bucket="shards")
        upload(demo_shards, "s3://shards/demo", workers=4)
        yield server


def spec(shards: str, rank: int, world: int, micro: int, **kw) -> LoaderSpec:
    return LoaderSpec(shards, rank, world, micro, micro, img_size=16, seed=5, num_threads=1, order="block", **kw)


def remote(tmp: Path, **kw) -> RemoteSpec:
    return RemoteSpec(cache_dir=str(tmp / "cache"), **kw)


def epoch_keys(loader) -> list[str]:
    return [k for b in loader for k in b.keys]


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_remote_folder_reads_what_the_local_one_does(s3, demo_shards, tmp_path, kind):
    local = [epoch_keys(make_loader(kind, spec(str(demo_shards), r, 2, 4))) for r in range(2)]
    rem = [epoch_keys(make_loader(kind, spec("s3://shards/demo", r, 2, 4, remote=remote(tmp_path)))) for r in range(2)]
    assert rem == local and len({k for r in rem for k in r}) == N
    cached = sorted(p.name for p in (tmp_path / "cache" / "shards").glob("*/*.tar"))
    assert cached == [f"{s}.tar" for s in read_table(demo_shards).shards]


def test_cut_connections_are_waited_out_and_a_truncated_object_is_a_changed_shard(s3, demo_shards, tmp_path):
    """Every download of one shard is cut mid-transfer, as a failing network does: retried until the
    patience runs out, then the rank stands in empty batches; nothing is recorded, and once the network
    heals a loader restored from the last real batch reads the rest of the epoch, each sample once.
    Another shard's object replaced by its first half: a changed shard, one line, nothing recorded."""
    from data_pipeline.order.block_order import EpochBlocks
    from data_pipeline.remote.retry import ChangedObject

    upload(demo_shards, "s3://shards/faulty", workers=4)
    table = read_table(demo_shards)
    order = EpochBlocks(table.shard_rows, 1, seed=5, epoch=0).order  # shards in the order epoch 0 reads them
    cut, short = table.shards[order[-1]], table.shards[order[0]]
    host, port = s3.endpoint.split("//")[1].split(":")
    proxy = CuttingProxy((host, int(port)), cut=(f"/{cut}.tar",))
    kw = {"endpoint": proxy.endpoint, "patience_s": 1.5, "backoff_s": 0.05, "backoff_cap_s": 0.2, "timeout_s": 5}
    view = tmp_path / "view"
    at = spec("s3://shards/faulty", 0, 1, 4, view=str(view), block_window=1, remote=remote(tmp_path, **kw))
    loader = make_loader("dali", at)
    seen, state = [], loader.state_dict()
    for batch in loader:
        if batch.void:
            break
        seen += batch.keys
        state = loader.state_dict()
    assert loader.transient is not None and proxy.cuts >= 2 and not view.exists()
    assert seen and not {table.key(i) for i in table.rows_of(cut)} & set(seen)
    proxy.cut = ()  # the network heals
    rest = epoch_keys(make_loader("dali", at, state))
    proxy.close()
    assert len(seen + rest) == len(set(seen + rest)) == N - N % 4 and not view.exists()

    tar = table.tar(short).read_bytes()
    half = tmp_path / "half.tar"
    half.write_bytes(tar[: len(tar) // 2])
    s3.client().upload_file(str(half), "shards", f"faulty/{short}.tar")
    with pytest.raises(ChangedObject, match=f"{short}.tar .*changed since it was written") as info:
        epoch_keys(
            make_loader("dali", spec("s3://shards/faulty", 0, 1, 4, view=str(view), remote=remote(tmp_path / "b")))
        )
    assert info.value.rank_local and "\n" not in str(info.value) and not view.exists()


def test_cache_stays_within_its_budget(s3, demo_shards, tmp_path):
    """A budget of two shards and a read-ahead of one: shards are evicted as the epoch goes on, and the
    cache never holds more than its budget."""
    sizes = [p.stat().st_size for p in sorted(Path(demo_shards).glob("*.tar"))]
    budget = 2 * max(sizes)
    spec_kw = {"remote": remote(tmp_path, cache_gb=budget / 2**30, ahead=1)}
    loader = make_loader("torch", spec("s3://shards/demo", 0, 1, 4, block_window=1, **spec_kw))
    cache = tmp_path / "cache" / "shards"
    peak, keys = 0, []
    for b in loader:
        keys += b.keys
        peak = max(peak, sum(p.stat().st_size for p in cache.glob("*/*.tar")))
    loader.close()
    assert len(keys) == len(set(keys)) == N
    assert 0 < peak <= budget
    assert len(list(cache.glob("*/*.tar"))) < len(sizes)  # some were evicted


def test_checks_before_launch_name_the_problem(s3, tmp_path):
    with pytest.raises(ConfigError, match="less than one rank's read-ahead"):
        check_cache("s3://shards/demo", RemoteSpec(cache_gb=1e-6, cache_dir=str(tmp_path)), window=4)
    check_cache("s3://shards/demo", RemoteSpec(cache_gb=1, cache_dir=str(tmp_path)), window=4)
    with pytest.raises(DataError, match=r"s3://nothing-here/x/dataset.json.*NoSuchBucket"):
        check_cache("s3://nothing-here/x", RemoteSpec(retries=1), window=4)
    with pytest.raises(DataError, match="does not exist"):
        check_cache("s3://shards/no-such-prefix", RemoteSpec(retries=1), window=4)


def test_upload_is_restartable_and_publishes_dataset_json_last(s3, demo_shards):
    meta = upload(demo_shards, "s3://shards/demo", workers=2)  # everything is there already
    assert "tars" not in meta and set(meta["tar_bytes"]) == set(read_table(demo_shards).shards)
    got = s3.client().list_objects_v2(Bucket="shards", Prefix="demo/")["Contents"]
    names = {o["Key"] for o in got}
    assert {"demo/dataset.json", "demo/columns/meta.json", "demo/manifest.parquet"} <= names
    newest = max(got, key=lambda o: o["LastModified"])
    assert newest["LastModified"] == next(o for o in got if o["Key"] == "demo/dataset.json")["LastModified"]
    assert np.all([o["Size"] > 0 for o in got])


def test_webdataset_shards_already_in_a_bucket_are_indexed_in_place_and_train(s3, demo_tree, tmp_path):
    """Existing img2dataset tars in a bucket: index_shards reads them from there (a listed prefix),
    the index is published beside them (no tar is uploaded again), and a loader streams exactly the
    samples the index of local copies of the same tars holds."""
    from data_pipeline.shards.index_shards import main as index_main
    from tests.helpers import make_img2dataset

    (tmp_path / "wds").mkdir()
    tars = make_img2dataset(tmp_path / "wds", demo_tree)
    for t in sorted(tars.glob("*.tar")):
        s3.client().upload_file(str(t), "shards", f"laion/{t.name}")
    local_index, remote_index = tmp_path / "local-index", tmp_path / "remote-index"
    assert index_main([str(tars), str(local_index), "--label", "json:label", "--workers", "1"]) == 0
    assert index_main(["s3://shards/laion", str(remote_index), "--label", "json:label", "--workers", "1"]) == 0
    assert not list(remote_index.glob(".download-*"))  # the downloaded copies are gone
    with pytest.raises(DataError, match="deepmim-upload"):
        read_table(remote_index)  # its tars are in the bucket: train from there
    with pytest.raises(DataError, match="upload it there"):
        upload(remote_index, "s3://shards/elsewhere")
    before = {o["Key"]: o["ETag"] for o in s3.client().list_objects_v2(Bucket="shards", Prefix="laion/")["Contents"]}
    upload(remote_index, "s3://shards/laion")
    after = {o["Key"]: o["ETag"] for o in s3.client().list_objects_v2(Bucket="shards", Prefix="laion/")["Contents"]}
    assert {k: after[k] for k in before} == before and "laion/dataset.json" in after  # tars untouched
    # a rerun reuses every finished tar (its size and ETag unchanged)
    assert index_main(["s3://shards/laion", str(remote_index), "--label", "json:label", "--workers", "1"]) == 0
    local = epoch_keys(make_loader("torch", spec(str(local_index), 0, 1, 6)))
    remote_keys = epoch_keys(make_loader("torch", spec("s3://shards/laion", 0, 1, 6, remote=remote(tmp_path))))
    assert remote_keys == local and len(local) == 18


def test_make_shards_writes_to_a_bucket_through_a_staging_folder(s3, demo_tree, demo_shards, tmp_path):
    from data_pipeline.shards.make_shards import main as make_shards_main

    argv = [str(demo_tree), "s3://shards/made", "--staging", str(tmp_path / "stage"), "--shard-size-mb", "0.03"]
    assert make_shards_main([*argv, "--no-progress", "--workers", "1"]) == 0
    made = epoch_keys(make_loader("torch", spec("s3://shards/made", 0, 1, 8, remote=remote(tmp_path))))
    assert made == epoch_keys(make_loader("torch", spec(str(demo_shards), 0, 1, 8)))  # the same shards, same order
    with pytest.raises(SystemExit):  # an s3:// OUT needs a local folder to write to first
        make_shards_main([str(demo_tree), "s3://shards/made2"])


def test_an_https_style_mirror_serves_a_folder_read_only(demo_shards, tmp_path):
    """A plain web server over a shard folder (http:// on loopback here; https:// is the same client)."""
    import functools
    import http.server
    import shutil
    import threading

    folder = shutil.copytree(demo_shards, tmp_path / "served")  # from before sizes were recorded
    meta = json.loads((folder / "dataset.json").read_text())
    del meta["tar_bytes"], meta["tar_checksum"]
    (folder / "dataset.json").write_text(json.dumps(meta))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        got = epoch_keys(make_loader("dali", spec(url, 0, 1, 8, remote=remote(tmp_path))))
        assert got == epoch_keys(make_loader("dali", spec(str(demo_shards), 0, 1, 8)))
        cached = {p.name: p.stat().st_size for p in (tmp_path / "cache" / "shards").glob("*/*.tar")}
        assert cached == {p.name: p.stat().st_size for p in Path(demo_shards).glob("*.tar")}  # sizes asked
        with pytest.raises(DataError, match="read-only"):
            upload(demo_shards, url)
        with pytest.raises(DataError, match="does not exist"):
            open_table(f"{url}/no-such-folder", remote(tmp_path, retries=1))
    finally:
        server.shutdown()
