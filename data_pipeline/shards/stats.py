"""Print what a shard folder holds: totals, samples per class, and the size distributions.

python -m data_pipeline.stats OUT [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def compute(out: str | Path) -> dict:
    import pyarrow.parquet as pq

    out = Path(out)
    for need in ("manifest.parquet", "dataset.json"):
        if not (out / need).is_file():
            raise FileNotFoundError(f"{need} is missing")
    t = pq.read_table(out / "manifest.parquet").to_pydict()
    meta = json.loads((out / "dataset.json").read_text())
    n = len(t["key"])

    def dist(values) -> dict:
        if not values:
            return {}
        a = np.asarray(values, dtype=np.float64)
        q = np.percentile(a, [0, 5, 50, 95, 100])
        return {"min": q[0], "p5": q[1], "median": q[2], "p95": q[3], "max": q[4], "mean": float(a.mean())}

    per_class = Counter(name or str(label) for name, label in zip(t["class_name"], t["label"]))
    return {
        "samples": n,
        "shards": len(meta["shards"]),
        "classes": len(per_class),
        "bytes": int(sum(t["size"])),
        "reencoded": sum(1 for a in t["action"] if a.startswith("reencoded")),
        "skipped_at_write": meta.get("num_skipped", 0),
        "per_class": dict(sorted(per_class.items())),
        "per_class_range": [min(per_class.values()), max(per_class.values())] if per_class else [],
        "jpeg_kb": dist([s / 1024 for s in t["size"]]),
        "width": dist(t["width"]),
        "height": dist(t["height"]),
    }


def render(s: dict, max_classes: int = 40) -> str:
    lines = [
        f"{s['samples']} samples in {s['shards']} shards, {s['classes']} classes, {s['bytes'] / 2**30:.2f} GiB of JPEG",
        f"re-encoded at write time: {s['reencoded']}; skipped at write time: {s['skipped_at_write']}",
    ]
    for name in ("jpeg_kb", "width", "height"):
        d = s[name]
        if d:
            lines.append(
                f"{name:8s} min {d['min']:.0f}  p5 {d['p5']:.0f}  median {d['median']:.0f}  "
                f"p95 {d['p95']:.0f}  max {d['max']:.0f}  mean {d['mean']:.1f}"
            )
    if s["per_class_range"]:
        lines.append(f"samples per class: {s['per_class_range'][0]} to {s['per_class_range'][1]}")
    items = list(s["per_class"].items())
    for name, count in items[:max_classes]:
        lines.append(f"  {name:30s} {count}")
    if len(items) > max_classes:
        lines.append(f"  ... {len(items) - max_classes} more classes (--json lists all)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.stats",
        description="What a shard folder holds: totals, samples per class, JPEG size and image size distributions.",
    )
    ap.add_argument("out", help="a folder written by python -m data_pipeline.make_shards")
    ap.add_argument("--json", action="store_true", help="print the full statistics as JSON")
    args = ap.parse_args(argv)
    try:
        s = compute(args.out)
    except (OSError, ValueError, KeyError) as err:
        print(
            f"stats: {args.out}: cannot read the shard folder ({type(err).__name__}: {err}); is it a finished "
            "make_shards output (manifest.parquet, dataset.json)?",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
