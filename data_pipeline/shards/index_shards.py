"""Index existing WebDataset tar shards in place: a manifest, without copying or touching the tars.

    python -m data_pipeline.index_shards SRC [SRC ...] OUT [--label cls|json:FIELD|none]
        [--classes classes.json] [--workers 8]

SRC are tar files, folders of tars, or brace patterns as webdataset users write them
(``/data/laion/{00000..04199}.tar``). Shards written by ``webdataset.ShardWriter``/``TarWriter``,
by img2dataset (``00000.jpg``, ``.txt``, ``.json``) or by ``make_shards`` all qualify. OUT gets
``manifest.parquet``, ``dataset.json`` (which names every tar by its path), ``classes.json`` when
the samples are labelled, ``skipped.json``, and one DALI index per tar (``<shard>.idx``, the
``wds2idx`` format); the tars are only read, so they may sit on read-only storage.

Samples are grouped from tar members with webdataset's own rule (``group_by_keys``: members with
the same key before the first dot, in tar order). A sample's image is its first ``jpg``, ``jpeg``,
``png`` or ``webp`` member (DALI decodes all three; JPEG keeps the region-of-interest decode); its
width and height come from the image header. Labels come from ``.cls`` (an integer), from a field
of ``.json`` (``--label json:FIELD``: integers are used as they are, strings become classes
numbered in sorted order, as class folders are), or not at all (label -1). A sample without an
image, an image member that is truncated or not an image, or a missing or unreadable label is
skipped and listed with its reason.

Like ``make_shards`` it is parallel (one task per tar) and restartable: each finished tar leaves
``<shard>.part.json`` (with the tar's size and modification time), and a rerun reuses those whose
tar is unchanged; a rerun with other arguments is refused.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data_pipeline.dataset.columns import write_columns
from data_pipeline.dataset.files import atomic_bytes, atomic_json, claim, locked, remove_stale, temp_name
from data_pipeline.dataset.hashing import checksum, file_checksum
from data_pipeline.dataset.locations import is_remote
from data_pipeline.dataset.members import image_format
from data_pipeline.dataset.table import check_shard_name
from data_pipeline.dataset.wds_index import Component, IndexedSample, write_index
from data_pipeline.shards.report import log_skipped, reason_kind, refuse_empty
from data_pipeline.shards.splits import info_file, info_split, select
from engine.errors import DataError, StackError

log = logging.getLogger("index_shards")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PLAN_VERSION = 1
LOCKS = ".locks"  # OUT/.locks/: a claim per tar, and the final assembly's lock
_NAME = re.compile(r"[^A-Za-z0-9._-]")


class IndexingError(DataError):
    """The sources cannot be indexed with these arguments."""


# ------------------------------------------------------------------------------ sources


def expand_sources(sources: list[str]) -> list[Path] | list[str]:
    """Tar paths from files, folders (their *.tar, sorted) and brace patterns, in the given order; or
    tar URLs in object storage (``s3://bucket/prefix`` lists the prefix's tars)."""
    from webdataset.shardlists import expand_urls

    if any(is_remote(s) for s in sources):
        return expand_remote(sources)
    out: list[Path] = []
    for src in sources:
        for item in expand_urls(src):
            p = Path(item)
            if p.is_dir():
                out += sorted(p.glob("*.tar"))
            elif p.is_file():
                out.append(p)
            else:
                raise IndexingError(f"{item}: no such tar file or folder (from {src!r})")
    if not out:
        raise IndexingError(f"no tar files in {sources}")
    seen: set[Path] = set()
    unique = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


def expand_remote(sources: list[str]) -> list[str]:
    """Tar URLs: brace patterns as given, a bare s3:// prefix listed. They must share one prefix: the one
    training streams from (each tar is fetched as <prefix>/<shard>.tar)."""
    from webdataset.shardlists import expand_urls

    from data_pipeline.remote.objects import list_tars

    if not all(is_remote(s) for s in sources):
        raise IndexingError("give either local tars or tars in object storage, not both")
    urls: list[str] = []
    for src in sources:
        if src.rstrip("/").endswith(".tar") or "{" in src:
            urls += [u for u in expand_urls(src)]
        else:
            urls += list_tars(src)
    if not urls:
        raise IndexingError(f"no tar objects in {sources}")
    urls = list(dict.fromkeys(urls))
    bases = {u.rsplit("/", 1)[0] for u in urls}
    if len(bases) > 1:
        raise IndexingError(
            f"the tars sit under {len(bases)} prefixes ({sorted(bases)[:3]}); training fetches every tar from "
            "one prefix: index each prefix into its own folder"
        )
    return urls


def shard_names(tars: list[Path]) -> list[str]:
    """A plain, unique shard name per tar: its file name without .tar (prefixed by its folder when
    two folders hold tars of the same name)."""
    tars = [PurePosixPath(str(t)) for t in tars]
    stems = [_NAME.sub("_", t.name.removesuffix(".tar")) or "shard" for t in tars]
    names = []
    for t, stem in zip(tars, stems):
        name = stem if stems.count(stem) == 1 else f"{_NAME.sub('_', t.parent.name)}_{stem}"
        if not name[0].isalnum():
            name = f"s{name}"
        names.append(check_shard_name(name, Path(str(t))))
    if len(set(names)) != len(names):
        raise IndexingError("tar files with the same name in folders of the same name; index them separately")
    return names


# ------------------------------------------------------------------------------ one tar


def _members(tar_path: Path) -> Iterator[dict]:
    """webdataset file samples whose data is the member's place in the tar (not its bytes)."""
    size = tar_path.stat().st_size
    with tarfile.open(tar_path, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            comp = Component(m.name.rpartition(".")[2], m.offset_data, m.size, m.name)
            yield {"fname": m.name, "data": (comp, m.offset_data + m.size > size), "__url__": str(tar_path)}


def group_samples(tar_path: Path) -> Iterator[dict]:
    """Samples as webdataset groups them: {'__key__', ext: (Component, truncated)}."""
    from webdataset.tariterators import group_by_keys

    def handler(err: Exception) -> bool:
        log.warning("%s: %s", tar_path, err)
        return True

    try:
        yield from group_by_keys(_members(tar_path), handler=handler)
    except (tarfile.ReadError, EOFError) as err:  # a truncated tar: the samples before the damage stay
        log.warning("%s: the tar ends early (%s); samples after that point are not indexed", tar_path, err)


@dataclass(frozen=True)
class TarJob:
    path: str
    name: str
    out: str
    label: str  # auto | cls | json:FIELD | none


def _label(fd: int, sample: dict, mode: str) -> tuple[object, str | None]:
    """(raw label, reason it is unusable or None)."""
    if mode == "none":
        return -1, None
    ext = "cls" if mode == "cls" else "json"
    if ext not in sample:
        return None, f"no .{ext} member"
    comp, truncated = sample[ext]
    if truncated:
        return None, f"the .{ext} member is truncated"
    text = os.pread(fd, comp.size, comp.offset).decode("utf-8", errors="replace").strip()
    if mode == "cls":
        try:
            return int(text), None
        except ValueError:
            return None, f".cls is not an integer ({text[:20]!r})"
    field = mode.partition(":")[2]
    try:
        value = json.loads(text)
        for part in field.split("."):
            value = value[part]
    except (ValueError, KeyError, TypeError):
        return None, f".json has no field {field!r}"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None, f".json field {field!r} is not an integer or a string ({value!r})"
    return value, None


def _auto_mode(fd: int, sample: dict) -> str:
    """--label auto: an integer .cls member, else a ``label`` field of the .json member, else none."""
    if "cls" in sample:
        return "cls"
    if "json" in sample and not sample["json"][1]:
        comp = sample["json"][0]
        try:
            doc = json.loads(os.pread(fd, comp.size, comp.offset))
        except ValueError:
            return "none"
        if isinstance(doc, dict) and isinstance(doc.get("label"), (int, str)) and not isinstance(doc["label"], bool):
            return "json:label"
    return "none"


def label_mode(parts: list[dict], requested: str) -> str:
    """The one label source of the whole set: the request, or what --label auto found in every tar
    (tars that disagree are refused: their labels would mean different things)."""
    if requested != "auto":
        return requested
    found = Counter(p["label_mode"] for p in parts if p.get("label_mode", "auto") != "auto")
    if len(found) > 1:
        said = ", ".join(f"{n} tar(s) {m}" for m, n in found.most_common())
        raise IndexingError(f"--label auto found different labels in the tars ({said}); choose one with --label")
    return next(iter(found), "none")


def index_tar(job: TarJob) -> dict:
    """Index one tar: its samples' image byte ranges, sizes, labels; writes its .idx and part file. A tar
    in object storage is downloaded into OUT for the time it takes (one at a time per worker). Returns
    ``{"shard", "busy": True}`` when another indexer into the same folder is indexing it now."""
    with claim(Path(job.out) / LOCKS / f"{job.name}.lock") as mine:
        if not mine:
            return {"shard": job.name, "busy": True}
        done = finished_part(Path(job.out), job)  # the other indexer may have finished it meanwhile
        if done is not None:
            return done
        remove_stale(Path(job.out), job.name)  # what a killed indexer of this tar left
        return _index_one(job)


def _index_one(job: TarJob) -> dict:
    if not is_remote(job.path):
        return _index_tar(job, Path(job.path))
    import tempfile

    from data_pipeline.remote.objects import fetch_url

    with tempfile.TemporaryDirectory(dir=job.out, prefix=".download-") as tmp:
        local = Path(tmp) / f"{job.name}.tar"
        etag = fetch_url(job.path, local)
        return _index_tar(job, local, etag)


def _index_tar(job: TarJob, tar: Path, etag: str = "") -> dict:
    from PIL import Image

    out = Path(job.out)
    origin = job.path  # the tar's path or URL, as the part record and skipped.json name it
    stat = tar.stat()
    rows, skipped, index = [], [], []
    mode = job.label
    fd = os.open(tar, os.O_RDONLY)
    try:
        for sample in group_samples(tar):
            key = sample["__key__"]
            comps = [v[0] for k, v in sample.items() if not k.startswith("__")]
            index.append(IndexedSample(key, tuple(sorted(comps, key=lambda c: c.offset))))
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            reason = None
            if ext is None:
                reason = f"no image member (has {sorted(k for k in sample if not k.startswith('__'))})"
            elif sample[ext][1]:
                reason = "the image member is truncated (the tar ends inside it)"
            if reason is None:
                comp = sample[ext][0]
                data = os.pread(fd, comp.size, comp.offset)
                fmt = image_format(data[:12])
                if fmt is None:
                    reason = f".{ext} member is not a JPEG, PNG or WebP image"
                else:
                    try:
                        with Image.open(io.BytesIO(data)) as im:  # the header only
                            width, height = im.size
                    except Exception as err:
                        reason = f"unreadable {fmt} header ({type(err).__name__})"
            label = None
            if reason is None:
                if mode == "auto":  # the tar's first sample with an image decides for the whole tar
                    mode = _auto_mode(fd, sample)
                label, reason = _label(fd, sample, mode)
            if reason is not None:
                skipped.append({"source": f"{origin}:{key}", "reason": reason})
                continue
            rows.append(
                {
                    "key": key,
                    "label_raw": label,
                    "shard": job.name,
                    "offset": comp.offset,
                    "size": comp.size,
                    "width": width,
                    "height": height,
                    "source": f"{origin}:{comp.name}",
                    "checksum": checksum(data),
                    "action": "indexed",
                    "format": fmt,
                }
            )
    finally:
        os.close(fd)
    tmp = temp_name(out / f"{job.name}.idx")
    try:
        write_index(tmp, index)
        idx_checksum = file_checksum(tmp)
        os.replace(tmp, out / f"{job.name}.idx")
    finally:
        tmp.unlink(missing_ok=True)
    part = {
        "shard": job.name,
        "tar": origin,
        "tar_bytes": stat.st_size,
        "tar_checksum": file_checksum(tar),  # every fetch from object storage is held to it
        **({"tar_etag": etag} if is_remote(origin) else {"tar_mtime_ns": stat.st_mtime_ns}),
        "label": job.label,
        "label_mode": mode,  # what --label auto found in this tar (auto: no sample had an image)
        "num_samples": len(rows),
        "rows": rows,
        "skipped": skipped,
        "idx_checksum": idx_checksum,
    }
    atomic_bytes(out / f"{job.name}.part.json", json.dumps(part).encode())  # last: this tar counts as indexed
    return part


def finished_part(out: Path, job: TarJob) -> dict | None:
    path = out / f"{job.name}.part.json"
    try:
        part = json.loads(path.read_text())
        if is_remote(job.path):
            from data_pipeline.remote.objects import head_url

            size, version = head_url(job.path)
            key = "tar_etag"
        else:
            stat = Path(job.path).stat()
            size, version, key = stat.st_size, stat.st_mtime_ns, "tar_mtime_ns"
    except (OSError, ValueError, DataError):
        return None
    same = (part.get("tar"), part.get("tar_bytes"), part.get(key), part.get("label")) == (
        job.path,
        size,
        version,
        job.label,
    )
    # (a part from before tar checksums were recorded is redone: the tar is read once more); the index
    # file on disk is checked too, not only the record
    idx = out / f"{job.name}.idx"
    intact = idx.is_file() and file_checksum(idx) == part.get("idx_checksum")
    return part if same and "tar_checksum" in part and intact else None


# ------------------------------------------------------------------------------ the whole set


def resolve_labels(parts: list[dict], mode: str, classes: dict[str, int] | None) -> dict[str, int]:
    """Set every row's integer ``label`` and ``class_name``; returns classes.json's mapping."""
    rows = [r for p in parts for r in p["rows"]]
    raw = {r["label_raw"] for r in rows}
    if mode == "none":
        mapping: dict[str, int] = {}
    elif classes is not None:
        mapping = classes
    elif all(isinstance(v, int) for v in raw):
        mapping = {str(v): v for v in sorted(raw)}
    else:
        mapping = {name: i for i, name in enumerate(sorted(str(v) for v in raw))}
    names = {v: k for k, v in mapping.items()}
    for r in rows:
        v = r.pop("label_raw")
        if mode == "none":
            r["label"], r["class_name"] = -1, ""
        elif isinstance(v, int) and (classes is None or v in names):
            r["label"], r["class_name"] = v, names.get(v, str(v))
        elif str(v) in mapping:
            r["label"], r["class_name"] = mapping[str(v)], str(v)
        else:
            raise IndexingError(f"{r['source']}: label {v!r} is not in the given classes.json")
    return mapping


def write_manifest(out: Path, parts: list[dict]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [
        "key",
        "label",
        "class_name",
        "shard",
        "offset",
        "size",
        "width",
        "height",
        "source",
        "checksum",
        "action",
        "format",
    ]
    rows = [r for p in parts for r in p["rows"]]
    table = pa.table({c: [r[c] for r in rows] for c in cols})
    tmp = temp_name(out / "manifest.parquet")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out / "manifest.parquet")
    finally:
        tmp.unlink(missing_ok=True)
    return len(rows)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve()
    tars, expected = split_sources(args.sources, args.split)
    inside = [t for t in tars if isinstance(t, Path) and t.parent == out]
    if inside:
        raise IndexingError(f"{out} holds the tars themselves ({inside[0].name}); give OUT a folder of its own")
    names = shard_names(tars)
    out.mkdir(parents=True, exist_ok=True)
    classes = json.loads(Path(args.classes).read_text()) if args.classes else None
    plan = {"version": PLAN_VERSION, "tars": [str(t) for t in tars], "label": args.label, "classes": classes}
    if args.split:
        plan["split"] = args.split
    plan_path = out / "index_plan.json"
    with locked(out / LOCKS / "assemble.lock"):
        if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
            raise IndexingError(
                f"{out} holds an index of other sources or labels; index into a new folder or remove it"
            )
        remove_stale(out, "index_plan.json")
        atomic_json(plan_path, plan)
    jobs = [TarJob(str(t), n, str(out), args.label) for t, n in zip(tars, names)]
    parts = {j.name: finished_part(out, j) for j in jobs}
    todo = [j for j in jobs if parts[j.name] is None]
    if len(todo) < len(jobs):
        log.info(
            "%d of %d tars already indexed and unchanged; indexing %d", len(jobs) - len(todo), len(jobs), len(todo)
        )
    if args.workers > 1 and len(todo) > 1:
        with mp.get_context("spawn").Pool(min(args.workers, len(todo))) as pool:  # workers start clean
            for part in pool.imap_unordered(index_tar, todo):
                parts[part["shard"]] = part
    else:
        for job in todo:
            parts[job.name] = index_tar(job)
    for job in todo:  # tars another indexer into this folder had claimed: wait for it, do what it left
        if parts[job.name].get("busy"):
            with locked(out / LOCKS / f"{job.name}.lock"):
                pass
            parts[job.name] = index_tar(job)
            if parts[job.name].get("busy"):
                raise IndexingError(f"{out}: {job.name} stays claimed by another indexer; run again")
    ordered = [parts[j.name] for j in jobs]
    with locked(out / LOCKS / "assemble.lock"):  # the folder's own files, one writer at a time
        summary = _assemble(out, ordered, tars, args, classes)
    if expected is not None and expected != summary["num_samples"] + summary["num_skipped"]:
        log.warning(
            "the info file counts %d samples in these tars; %d were found (%d indexed, %d skipped)",
            expected,
            summary["num_samples"] + summary["num_skipped"],
            summary["num_samples"],
            summary["num_skipped"],
        )
    return summary


def split_sources(sources: list[str], split: str) -> tuple[list, int | None]:
    """The tars to index: a folder with timm's info file gives its split's tars (and their count);
    otherwise the tars of the sources, of one split (several in the sources: --split must choose)."""
    if len(sources) == 1 and not is_remote(sources[0]) and Path(sources[0]).is_dir():
        info = info_file(Path(sources[0]))
        if info is not None:
            tars, count = info_split(Path(sources[0]), info, split)
            return [t.resolve() for t in tars], count
    return select(expand_sources(sources), split, "tars"), None


def _assemble(out: Path, ordered: list[dict], tars: list, args: argparse.Namespace, classes) -> dict:
    for name in ("manifest.parquet", "columns", "classes.json", "skipped.json", "dataset.json"):
        remove_stale(out, name)  # what a killed indexer left (the assembly lock is ours)
    skipped = [s for p in ordered for s in p["skipped"]]
    used = [p for p in ordered if p["num_samples"]]
    if not used:
        (out / "index_plan.json").unlink(missing_ok=True)  # nothing was made: other flags may be tried here
        refuse_empty(f"{len(ordered)} tar(s)", skipped, _empty_hint(skipped, args.label))
    mode = label_mode(ordered, args.label)
    if args.label == "auto":  # a tar that had no labelled sample cannot have decided otherwise
        for p in ordered:
            p["label_mode"] = mode
    mapping = resolve_labels(ordered, mode, classes)
    total = write_manifest(out, ordered)
    atomic_json(out / "skipped.json", skipped)
    if mapping:
        atomic_json(out / "classes.json", mapping)
    summary = {
        "num_samples": total,
        "num_classes": len(mapping),
        "num_skipped": len(skipped),
        "shards": [p["shard"] for p in used],
        "tars": {p["shard"]: p["tar"] for p in used},
        "layout": "indexed",
        "label": mode,
        "label_requested": args.label,
        "tar_bytes": {p["shard"]: p["tar_bytes"] for p in used},
        "tar_checksum": {p["shard"]: p["tar_checksum"] for p in used},
        "label_values": sorted({r["label"] for p in used for r in p["rows"]}),  # (without reading every row)
    }
    if tars and isinstance(tars[0], str):  # in object storage: upload this folder to their prefix to train
        summary["tar_base"] = tars[0].rsplit("/", 1)[0]
    summary["manifest_sha256"] = write_columns(out, summary["shards"])["manifest_sha256"]
    atomic_json(out / "dataset.json", summary)
    said = {"cls": "the .cls members", "none": "none (unlabeled, label -1)"}.get(mode, f"the .json field {mode[5:]!r}")
    log.info(
        "%d samples in %d tars indexed into %s (%d skipped); labels: %s%s",
        total,
        len(used),
        out,
        len(skipped),
        said,
        " (--label auto)" if args.label == "auto" else "",
    )
    if "tar_base" in summary:
        log.info(
            "the tars stay in %s: publish the index beside them (deepmim-upload %s %s), then train with data.shards=%s",
            summary["tar_base"],
            out,
            summary["tar_base"],
            summary["tar_base"],
        )
    log_skipped(log, skipped, out / "skipped.json")
    return summary


def _empty_hint(skipped: list[dict], label: str) -> str:
    kinds = {reason_kind(str(s.get("reason", ""))) for s in skipped}
    if label != "none" and any(k.startswith(("no .cls", "no .json", ".json has no field")) for k in kinds):
        return "the samples have no labels of that kind: --label none indexes them unlabeled (self-supervised)"
    if any(k.startswith("no image member") for k in kinds):
        return "no sample holds a jpg/png/webp member: these tars are not image shards"
    return "see skipped.json for every sample's reason"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.index_shards",
        description="Index existing WebDataset tar shards in place (webdataset ShardWriter, img2dataset, ...): "
        "manifest.parquet, dataset.json, classes.json and DALI index files in OUT; the tars are never written.",
    )
    ap.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="tar files, folders of tars, or brace patterns "
        "('/data/laion/{00000..04199}.tar'); the last positional argument is OUT",
    )
    ap.add_argument(
        "--label",
        default="auto",
        help="where labels come from: auto (default: .cls if the tars have it, else a 'label' field of the "
        ".json member, else none; the summary says which), cls (an integer .cls member), "
        "json:FIELD (a field of the .json member, e.g. json:label), or none (label -1)",
    )
    ap.add_argument("--classes", help="classes.json to reuse (e.g. the training set's) for consistent labels")
    ap.add_argument(
        "--split",
        default="",
        help="the split to index (train, validation, ...) when the sources hold several: from timm's "
        "_info.json in a folder, else from the tar names (imagenet1k-train-0000.tar); never merged",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes indexing tars in parallel (default: min(8, CPUs))",
    )
    args = ap.parse_args(argv)
    if len(args.sources) < 2:
        ap.error("give at least one SRC and the OUT folder")
    *args.sources, args.out = args.sources
    if args.label not in ("auto", "cls", "none") and not (args.label.startswith("json:") and len(args.label) > 5):
        ap.error(f"--label {args.label!r}: auto, cls, json:FIELD or none")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    try:
        run(args)
    except StackError as err:
        log.error("%s", err)
        return err.exit_code
    except OSError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
