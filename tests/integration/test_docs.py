"""Every snippet of README.md and docs/ marked ``<!-- test: cpu -->`` runs as written.

The snippets run in order, in a scratch folder laid out as a checkout after ``make quickstart``:
the code is linked in, ``data/demo_shards`` and ``data/demo_val_shards`` hold the test's demo
shards, and ``runs/quickstart`` is a short run of the quickstart's preset. ``python`` is the
environment's, as after activating it. A shell snippet whose every command already ran (the same
command shown in README.md and again in docs/) is not run twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cpu_env

pytestmark = pytest.mark.launcher

MARK = "<!-- test: cpu -->"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets() -> list[tuple[str, str, str]]:
    """(where, language, code) of every marked fenced block, in document order."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^" + re.escape(MARK) + r"\n```(bash|python)\n(.*?)^```", text, re.M | re.S):
            line = text[: m.start()].count("\n") + 1
            out.append((f"{doc.relative_to(ROOT)}:{line}", m.group(1), m.group(2)))
    return out


def test_every_doc_has_its_marked_snippets_found():
    found = {where.split(":")[0] for where, _, _ in snippets()}
    assert {
        "README.md",
        "docs/exporting.md",
        "docs/finetuning.md",
        "docs/launching.md",
        "docs/presets.md",
        "docs/sharding.md",
        "docs/teachers.md",
    } <= found
    for doc in DOCS:  # a marker must sit right above a bash or python fence, or it tests nothing
        text = doc.read_text()
        assert text.count(f"\n{MARK}\n") == len(re.findall(re.escape(MARK) + r"\n```(?:bash|python)\n", text)), doc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_shards, demo_val_shards) -> Path:
    ws = tmp_path_factory.mktemp("checkout")
    for name in ("engine", "data_pipeline", "launchers", "ds_configs", "bench", "experiments", "Makefile"):
        (ws / name).symlink_to(ROOT / name)
    (ws / "data").mkdir()
    (ws / "data" / "demo_shards").symlink_to(demo_shards)
    (ws / "data" / "demo_val_shards").symlink_to(demo_val_shards)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.pretrain",
            "--preset",
            "deepmim_tiny_pixel",
            "--run-dir",
            "runs/quickstart",
            "--set",
            "schedule.max_steps=2",
            "--set",
            "log.reconstructions=false",
        ],
        cwd=ws,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return ws


def _env() -> dict:
    env = cpu_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` is the venv's
    return env


def commands(code: str) -> list[str]:
    """The commands of a shell snippet: continuation lines joined, comments and spacing dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [" ".join(re.sub(r"(^|\s)#.*$", "", line).split()) for line in joined.splitlines() if line.strip()]


def test_marked_snippets_run_as_written(workspace):
    failures, ran = [], set()
    for where, lang, code in snippets():
        if lang == "bash" and set(commands(code)) <= ran:
            continue
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        proc = subprocess.run(cmd, cwd=workspace, env=_env(), capture_output=True, text=True, timeout=600)
        if lang == "bash" and proc.returncode == 0:
            ran.update(commands(code))
        if proc.returncode != 0:
            failures.append(
                f"{where} ({lang}) exited {proc.returncode}:\n{code}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
            )
    assert not failures, "\n\n".join(failures)
