"""Where a run's time went: its goodput account (``RUN_DIR/goodput.json``), as a table.

    deepmim-goodput RUN_DIR [--json]

One row per category (seconds and share of all attempts' wall time), then one line per attempt:
how it ended, the steps it ran, its start-up. Exit code 2 when the folder has no account (a run
written before accounts existed, or not a run folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from engine.observe.goodput import CATEGORIES, FILE, line, summarize


def report(doc: dict) -> str:
    attempts = doc.get("attempts", [])
    s = summarize(attempts)
    rows = [f"{'category':<15}{'seconds':>12}{'share':>9}"]
    for k in CATEGORIES:
        rows.append(f"{k.replace('_', ' '):<15}{s['seconds'][k]:>12.1f}{100 * s['shares'][k]:>8.1f}%")
    rows.append(f"{'total':<15}{s['total_s']:>12.1f}{100.0:>8.1f}%")
    rows.append("")
    rows.append(line(s))
    if s["between_attempts_s"]:
        rows.append(f"between attempts (not in the total): {s['between_attempts_s']:.0f} s")
    for n, a in enumerate(attempts, 1):
        when = datetime.datetime.fromtimestamp(a.get("launched_at", 0), datetime.timezone.utc)
        ended = "killed or still running" if a.get("outcome") == "running" else a.get("outcome")
        parts = ", ".join(f"{k} {v:.1f}" for k, v in a.get("startup_parts", {}).items() if v >= 0.05)
        rows.append(
            f"attempt {n}: launched {when:%Y-%m-%d %H:%M:%S} UTC, steps {a.get('step_from')} -> {a.get('step_to')}, "
            f"{ended}; start-up {a['seconds'].get('startup', 0):.1f} s ({parts})"
            + (f"; {a['steps_redone']} step(s) redone" if a.get("steps_redone") else "")
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deepmim-goodput", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a run folder (holds goodput.json)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    path = Path(args.run_dir) / FILE
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not doc.get("attempts"):
            raise ValueError("no attempts recorded")
    except FileNotFoundError:
        print(
            f"deepmim-goodput: {path}: no goodput account (not a run folder, or a run not started yet)", file=sys.stderr
        )
        return 2
    except (OSError, ValueError) as err:
        print(f"deepmim-goodput: {path}: unreadable ({err})", file=sys.stderr)
        return 2
    print(json.dumps(summarize(doc["attempts"]), indent=2) if args.json else report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
