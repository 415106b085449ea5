"""DeepSpeed's just-in-time compiled ops, built once per environment.

On CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce op
(``deepspeed_shm_comm``) the first time a process group starts: about a minute on two cores. By
default torch caches it in ``~/.cache/torch_extensions``, a folder every checkout on the machine
shares and that disappears between CI machines; here it lives in the environment
(``<venv>/torch_extensions/<key>``), is built by ``make setup``, and a launch that finds it missing
says that it is building it and how long that took.

The key names what the build depends on (torch, DeepSpeed, the C++ compiler), so upgrading one of
them builds anew instead of reusing a stale op. Every process of ours (the entry points, whether
started by ``launchers/pretrain.sh``, the ``deepspeed`` runner by hand, or plain ``python -m``) puts
this environment's ``bin`` first on ``PATH`` before the op loads: an activated and a plain shell
then use the same ``ninja``, whose build log another ninja version would not trust (a silent
rebuild every time the shell changed).

    python -m engine.loop.ops   # build now (make setup does this)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def build_key() -> str:
    """What the op's build depends on: torch, DeepSpeed and the C++ compiler (short hash)."""
    import hashlib
    import shutil
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("torch", "deepspeed"):
        try:
            parts.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg}=none")
    cxx = os.environ.get("CXX") or shutil.which("c++") or "c++"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10).stdout
        parts.append(out.splitlines()[0] if out else cxx)
    except (OSError, subprocess.SubprocessError):
        parts.append(cxx)
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def extensions_dir() -> Path:
    """Where this environment's compiled ops live (``TORCH_EXTENSIONS_DIR`` when set)."""
    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(given) if given else Path(sys.prefix) / "torch_extensions" / build_key()


def use_environment_cache() -> Path:
    """Point torch's extension cache at this environment and this environment's tools first on
    PATH (before DeepSpeed is imported)."""
    path = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    bin_dir = str(Path(sys.executable).parent)
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if entries[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[e for e in entries if e != bin_dir]])
    return path


def shm_op_built(path: Path | None = None) -> bool:
    root = path or extensions_dir()
    return any(root.glob("deepspeed_shm_comm/*.so")) or any(root.glob("*/deepspeed_shm_comm/*.so"))


def build_cpu_ops() -> float:
    """Compile DeepSpeed's CPU communication op into the environment's cache; returns seconds."""
    use_environment_cache()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(
        prog="python -m engine.loop.ops",
        description="Build DeepSpeed's CPU communication op into this environment (<venv>/torch_extensions) once, "
        "so that no launch has to; make setup runs it. Does nothing when it is built already.",
    ).parse_args(argv)
    path = use_environment_cache()
    if shm_op_built(path):
        print(f"DeepSpeed's CPU communication op is already built in {path}")
        return 0
    print(f"building DeepSpeed's CPU communication op into {path} (once per environment; about a minute on 2 cores)")
    seconds = build_cpu_ops()
    ok = shm_op_built(path)
    print(f"{'built' if ok else 'not built (this DeepSpeed has no CPU op builder; nothing to do)'} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
