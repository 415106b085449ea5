"""Every snippet of README.md and docs/ marked ``<!-- test: cpu -->`` runs as written; one marked
``<!-- test: flags -->`` (it needs GPUs, a cluster or a bucket) has every command's flags checked
against the command's own ``--help``, its presets against the registry and its ``--set`` keys
against the config tree.

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
FLAGS_MARK = "<!-- test: flags -->"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets(mark: str = MARK) -> list[tuple[str, str, str]]:
    """(where, language, code) of every marked fenced block, in document order."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^" + re.escape(mark) + r"\n```(bash|python)\n(.*?)^```", text, re.M | re.S):
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


ENTRY = {  # the installed commands (pyproject.toml) and the module each runs
    "deepmim-pretrain": "engine.commands",
    "deepmim-finetune": "engine.commands",
    "deepmim-make-shards": "data_pipeline.make_shards",
    "deepmim-index-shards": "data_pipeline.index_shards",
    "deepmim-upload": "data_pipeline.upload",
    "deepmim-verify": "data_pipeline.verify",
    "deepmim-stats": "data_pipeline.stats",
    "deepmim-export": "engine.tools.export",
    "deepmim-evaluate": "engine.tools.evaluate",
    "deepmim-goodput": "engine.tools.goodput",
}


def _help(argv: list[str]) -> str:
    proc = subprocess.run([*argv, "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv} --help: {proc.stderr[-500:]}"
    return proc.stdout


def _check_command(cmd: str, helps: dict) -> list[str]:
    """Problems of one command line: unknown flags, presets or config keys."""
    from engine.config import apply_overrides
    from engine.presets import get_preset, list_presets

    words = cmd.split()
    if not words:
        return []
    if words[0] == "launchers/pretrain.sh":
        words[0] = "deepmim-pretrain"  # the installed command is this script
    if words[0] in ENTRY:
        tool, rest = words[0], words[1:]
        argv = [str(Path(sys.executable).parent / tool)]
    elif words[:2] == ["python", "-m"] and len(words) > 2:
        tool, rest = words[2], words[3:]
        argv = [sys.executable, "-m", tool]
    else:
        return []  # not one of ours (aws, export, ...)
    inner: list[str] = []
    if "--" in rest:  # the launcher's own flags, then the training module's
        at = rest.index("--")
        rest, inner = rest[:at], rest[at + 1 :]
    problems = []
    for flags, help_argv in ((rest, argv), (inner, [sys.executable, "-m", "engine.pretrain"])):
        if not flags:
            continue
        key = " ".join(help_argv)
        helps.setdefault(key, _help(help_argv))
        for w in flags:
            flag = w.split("=", 1)[0]
            if flag.startswith("--") and flag not in helps[key]:
                problems.append(f"{tool}: {flag} is not in {key} --help")
        presets = [flags[i + 1] for i, w in enumerate(flags[:-1]) if w == "--preset"]
        sets = [flags[i + 1] for i, w in enumerate(flags[:-1]) if w == "--set"]
        for name in presets:
            if name not in list_presets():
                problems.append(f"{tool}: no preset {name!r}")
                continue
            try:
                apply_overrides(get_preset(name), [s.strip("'\"") for s in sets])
            except Exception as err:  # a key the config does not have, or a value of the wrong type
                problems.append(f"{tool}: {err}")
    return problems


def test_snippets_that_need_a_cluster_name_only_real_flags_presets_and_keys():
    found = snippets(FLAGS_MARK)
    assert found, "no snippet is marked for the flag check"
    helps: dict = {}
    problems = [
        f"{where}: {p}"
        for where, lang, code in found
        if lang == "bash"
        for c in commands(code)
        for p in _check_command(c, helps)
    ]
    assert not problems, "\n".join(problems)
