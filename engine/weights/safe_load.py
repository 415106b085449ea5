"""Reading weight files without running code from them.

A ``.pt``/``.pth`` file is a pickle, and a pickle can name any Python callable to run while it is
read. Files reach us from the outside (a CLIP or MAE download, a colleague's run folder, a
checkpoint to resume), so nothing here unpickles with arbitrary globals and nothing executes
TorchScript:

* ``load_guard()`` makes every ``torch.load`` within its block (ours and DeepSpeed's: its
  checkpoint engine, ``zero_to_fp32`` and the universal-checkpoint converter all ask for
  ``weights_only=False``) load with ``weights_only=True`` plus an explicit allow-list of the few
  plain-data classes that DeepSpeed stores (``DEEPSPEED_CLASSES``). A file that needs anything
  else is refused with ``UnsafeFileError``, which names the file and the global it asked for.
* ``read_torchscript_tensors()`` reads the tensors of a TorchScript archive (OpenAI ships CLIP
  this way) with a restricted unpickler: module objects become inert attribute bags, tensors are
  rebuilt from the archive's storages, any other global is refused, and the archive's code is
  never looked at.

What we write ourselves is plain data: checkpoints hold tensors, numbers, strings, lists and
dicts (random-generator states are stored as tensors, not NumPy objects), exports are
safetensors.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.errors import UnsafeFileError

log = logging.getLogger(__name__)


# The plain-data classes a DeepSpeed file may name (what ``load_guard`` allows for DeepSpeed's own
# loads): the two loss scalers and the ZeRO stage enum of its model-states and optimizer files, and the
# fragment address of its universal-checkpoint files. Each only has its attribute dict restored:
# nothing is called. An official MAE/DeepMIM ``checkpoint-N.pth`` carries its argparse namespace,
# allowed only where such files are read (engine.weights.formats).
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@functools.cache
def _classes(names: tuple[str, ...]) -> tuple:
    import importlib

    found = []
    for dotted in names:
        module, _, name = dotted.rpartition(".")
        try:
            mod = importlib.import_module(module)
        except ImportError:  # DeepSpeed absent (a tool run without it): its classes cannot occur
            continue
        if hasattr(mod, name):
            found.append(getattr(mod, name))
    return tuple(found)


_original_load = torch.load


def _describe(f: Any) -> str:
    return str(f) if isinstance(f, (str, Path)) else getattr(f, "name", type(f).__name__)


def safe_load(
    f: Any, map_location: Any = "cpu", allow: tuple[str, ...] = DEEPSPEED_CLASSES, mmap: bool = False, **kwargs
) -> Any:
    """``torch.load`` with ``weights_only=True`` and the allow-list ``allow`` (dotted class names);
    refusals name the file. ``mmap`` maps tensors instead of reading them (shapes at no cost), for
    files in torch's zip format; other files are read."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)  # a custom pickle module would bypass the restricted unpickler
    try:
        with torch.serialization.safe_globals(list(_classes(tuple(allow)))):
            if mmap and isinstance(f, (str, Path)) and zipfile.is_zipfile(f):
                return _original_load(f, map_location=map_location, weights_only=True, mmap=True, **kwargs)
            return _original_load(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        needs = _first_line_with(str(err), ("GLOBAL", "global", "class"))
        if not needs:  # not a pickle of ours at all (garbage, another format)
            why = _last_line(str(err))
            raise pickle.UnpicklingError(f"{_describe(f)}: not a PyTorch weights file ({why})") from None
        raise UnsafeFileError(
            f"{_describe(f)}: refused to read this file: loading it would need code or classes outside the "
            f"allow-list ({needs}). Weight files must hold plain tensors and data."
        ) from None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "unreadable"


def _first_line_with(text: str, needles: tuple[str, ...]) -> str:
    for line in text.splitlines():
        if any(n in line for n in needles):
            return line.strip()
    return ""


def _guarded_load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs) -> Any:
    return safe_load(f, map_location=map_location, **kwargs)


@contextlib.contextmanager
def load_guard() -> Iterator[None]:
    """Within the block, every ``torch.load`` (ours and DeepSpeed's) goes through ``safe_load``.

    Entry points wrap their work in it; it is the only place that replaces ``torch.load``, and the
    original is back when the block ends (nested blocks are fine)."""
    if torch.load is _guarded_load:
        yield
        return
    torch.load = _guarded_load
    try:
        yield
    finally:
        torch.load = _original_load


# ------------------------------------------------------------------------------- TorchScript


class _ScriptObject:
    """Stands in for a TorchScript class while reading: it only keeps its attribute dict."""

    def __setstate__(self, state: Any) -> None:
        self.attrs = state if isinstance(state, dict) else {"__state__": state}


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.script_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self.script_classes:  # a fresh inert class per TorchScript class name
                self.script_classes[key] = type(name, (_ScriptObject,), {})
            return self.script_classes[key]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # only ever used as a tag inside persistent ids
        raise UnsafeFileError(
            f"{self.path}: refused to read this TorchScript archive: its data refers to {module}.{name}, which is "
            "not a tensor or a module attribute (the archive may carry a code payload)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise UnsafeFileError(f"{self.path}: unexpected persistent id {pid!r} in a TorchScript archive")
        _, tag, key, _location, numel = pid
        dtype = _STORAGE_DTYPES[tag]
        raw = self.archive.read(f"{self.prefix}data/{key}")
        flat = torch.frombuffer(bytearray(raw), dtype=dtype)[:numel].clone()
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive, named by its attribute path
    (``visual.conv1.weight``), as ``ScriptModule.state_dict()`` would name it. Nothing in the
    archive is executed: its ``code/`` folder is never read."""
    path = Path(path)
    with zipfile.ZipFile(path) as z:
        pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise UnsafeFileError(f"{path}: a zip archive without a TorchScript data.pkl")
        prefix = pkls[0][: -len("data.pkl")]
        root = _RestrictedUnpickler(z.read(pkls[0]), z, prefix, path).load()
    custom = _custom_state_classes(root, set())
    if custom:
        raise UnsafeFileError(
            f"{path}: refused to read this TorchScript archive: {sorted(custom)[:3]} keep their state through "
            "TorchScript code (a custom __setstate__), which would have to run to read it"
        )
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", out, set())
    return out


def _custom_state_classes(obj: Any, seen: set[int]) -> set[str]:
    if id(obj) in seen or not isinstance(obj, _ScriptObject):
        return set()
    seen.add(id(obj))
    attrs = getattr(obj, "attrs", {})
    found = {type(obj).__name__} if "__state__" in attrs else set()
    for value in attrs.values():
        found |= _custom_state_classes(value, seen)
    return found


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    attrs = getattr(obj, "attrs", None)
    if not isinstance(attrs, dict):
        return
    for name, value in attrs.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out, seen)


def is_torchscript_archive(path: str | Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/code/__torch__.py") or "/code/__torch__/" in n for n in names)
