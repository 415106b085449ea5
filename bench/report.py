"""Turn benchmark JSON files into Markdown tables (for the README and the closing notes).

python -m bench.report bench/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _num(v: float) -> str:
    """Three significant digits below 100 (times, shares), whole numbers above (rates)."""
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def model_step_table(d: dict) -> list[str]:
    ver = d["versions"]
    title = (
        f"**Model step** ({d['device']}, torch {ver['torch']}, deepspeed {ver.get('deepspeed')}, {d['date'][:10]}; "
        f"{d['precision']}; compile backend {d['compile_backend']})"
    )
    cols = ["model", "target", "path", "engine", "micro-batch", "img/s", "step ms", "MFU", "peak GB", "note"]
    lines = [title, "", _row(cols), _row(["---"] * len(cols))]
    for r in d["results"]:
        head = [r["arch"].replace("deepmim_vit_", ""), r["target"], r["config"], r["engine"], r.get("batch", "-")]
        if r.get("status") != "ok":
            lines.append(_row([*head, "-", "-", "-", "-", r.get("status")]))
            continue
        note = "compile fell back to eager" if r.get("compile_fallback") else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        stats = [f"{r['img_per_s']:.0f}", f"{r['step_ms']:.1f}", mfu, _fmt(r.get("peak_mem_gb"), ".1f"), note]
        lines.append(_row(head + stats))
    if d.get("ratios"):
        lines += ["", _row(["measured in the same run", "ratio"]), _row(["---", "---"])]
        lines += [_row([k, f"{x:.2f}"]) for k, x in d["ratios"].items()]
    return lines


def simple_table(d: dict) -> list[str]:
    titles = {
        "data_pipeline": "Data pipeline",
        "gpu_decode": "JPEG decoding",
        "end_to_end": "End to end",
        "data_plan": "Epoch plan of one rank",
        "data_remote": "Local shards vs object storage",
        "host_path": "Loader CPU on the training thread, per sample",
        "checkpoint": "How long a save holds training",
    }
    lines = [f"**{titles[d['benchmark']]}** ({d['device']}, {d['date'][:10]})", ""]
    if d["benchmark"] == "end_to_end":
        shares = ", ".join(f"{k} {v:.0%}" for k, v in d["shares"].items())
        mfu = f", MFU {d['mfu']:.1%}" if d.get("mfu") else ""
        return [
            *lines,
            f"{d['preset']} on {d['nprocs']} processes: {d['img_per_s']:.0f} img/s{mfu}; time shares: {shares}",
        ]
    keys = list(dict.fromkeys(k for r in d["results"] for k in r if k != "status"))
    lines += [_row(keys), _row(["---"] * len(keys))]
    for r in d["results"]:
        lines.append(_row([_num(r.get(k)) if isinstance(r.get(k), float) else r.get(k, "-") for k in keys]))
    lines += [f"\n{k}: {v:.2f}" for k, v in d.get("ratios", {}).items()]
    return lines


def meta_table(d: dict) -> list[str]:
    """A node's manifest metadata for shards in object storage (bench/data_meta.py)."""
    s = d["at_scale"]
    lines = [f"**Manifest metadata per node** ({d['device']}, {d['date'][:10]})", ""]
    keys = ["samples", "shards", "ranks", "node_metadata_gb", "read_metadata_gb", "ratio_to_read", "whole_columns_gb"]
    lines += [
        _row(keys),
        _row(["---"] * len(keys)),
        _row([_num(s[k]) if isinstance(s[k], float) else s[k] for k in keys]),
    ]
    m = d.get("measured")
    if m:
        lines.append(
            f"\nmeasured over HTTP: {m['bytes_fetched']} bytes fetched for the rows of {m['rank_reads_shards']} of "
            f"{m['shards']} shards (the plan says {m['bytes_predicted_by_plan']}; "
            f"whole columns {m['bytes_whole_columns']})"
        )
    return lines


def checkpoint_table(d: dict) -> list[str]:
    """Save blocking per way (median of the repeats), restart start-ups, a killed run's goodput."""
    import statistics

    lines = [f"**How long a save holds training** ({d['device']}, {d['date'][:10]}; {d['ranks']} ranks)", ""]
    keys = ["model", "checkpoint_gb", "before_s", "sync_s", "async_s", "async_slowdown_s", "async / before"]
    lines += [_row(keys), _row(["---"] * len(keys))]
    for model in dict.fromkeys(r["model"] for r in d["results"]):
        rows = [r for r in d["results"] if r["model"] == model]

        def med(mode: str, key: str = "blocking_s", rows=rows) -> float:
            return statistics.median(r[key] for r in rows if r["mode"] == mode)

        cells = [model, rows[0]["checkpoint_gb"], med("before"), med("sync"), med("async")]
        cells += [med("async", "slowdown_s"), med("async") / med("before")]
        lines.append(_row([_num(c) if isinstance(c, float) else c for c in cells]))
    r = d.get("restart")
    if r:
        lines.append(
            f"\nlaunch to first step, {r['model']}: fresh {r['fresh_startup_s']:.1f} s, resume "
            f"{r['resume_startup_s']:.1f} s (x{r['resume_over_fresh']:.2f}; checkpoint {r['checkpoint_gb']:.2f} GB)"
        )
    g = d.get("goodput")
    if g:
        s = g["summary"]
        lines.append(
            f"\n{g.get('preset', 'quickstart')} killed after its first checkpoint and resumed: goodput "
            f"{s['goodput']:.1%} of {s['total_s']:.0f} s, {s['steps_redone']} steps redone"
        )
    return lines


def profile_table(d: dict) -> list[str]:
    head = (
        f"**Kernel time per step** ({d['device']}, {d['date'][:10]}; {d['arch']} {d['target']} {d['config']}, "
        f"batch {d['batch']}: {d['kernel_ms_per_step']:.1f} ms)"
    )
    lines = [head, "", _row(["category", "ms/step", "share"]), _row(["---"] * 3)]
    total = max(d["kernel_ms_per_step"], 1e-9)
    lines += [_row([k, f"{v:.1f}", f"{v / total:.0%}"]) for k, v in d["by_category_ms"].items()]
    return lines


def metrics_table(d: dict) -> list[str]:
    """Trainer metrics.jsonl lines of several runs: the last logged step of each."""
    lines = [f"**Trainer runs** ({d['device']}, {d['date'][:10]}; {d['note']})", ""]
    keys = ["run", "step", "img_per_s", "share_data_wait", "time_optimizer_s", "host_syncs_non_logging_steps"]
    lines += [_row(keys), _row(["---"] * len(keys))]
    for run, rows in d["runs"].items():
        last = rows[-1]
        lines.append(
            _row(
                [
                    run,
                    *(
                        _fmt(last.get(k), ".3f") if isinstance(last.get(k), float) else last.get(k, "-")
                        for k in keys[1:]
                    ),
                ]
            )
        )
    return lines


def render(paths: list[str]) -> str:
    out = []
    for p in sorted(paths):
        d = json.loads(Path(p).read_text())
        if "benchmark" not in d:
            continue
        kind = d["benchmark"]
        tables = {
            "model_step": model_step_table,
            "profile_step": profile_table,
            "trainer_metrics": metrics_table,
            "data_meta": meta_table,
            "checkpoint": checkpoint_table,
        }
        table = tables.get(kind, simple_table)
        out += [*table(d), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m bench.report", description="Render benchmark JSON files as Markdown tables (one per file)."
    )
    ap.add_argument("files", nargs="+", help="JSON files written by the bench modules (others are ignored)")
    print(render(ap.parse_args(argv).files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
