"""Weight files from elsewhere: what a file is, what encoder it holds, and that encoder in timm's layout.

Understood without running anything from the file (weights-only unpickling with the smallest
allow-list: an argparse ``Namespace`` in an official checkpoint's ``args`` is restored as data, and
nothing else outside plain tensors and containers is accepted):

* official MAE files: ``mae_pretrain_vit_{base,large,huge}.pth`` (``{'model': encoder}``), the
  ``_full``/``mae_visualize_*`` forms with the decoder, and ``checkpoint-N.pth`` as
  ``main_pretrain.py`` writes it (model, optimizer, epoch, scaler, args);
* official DeepMIM pretraining checkpoints: an MAE encoder with four numbered decoders
  (``decoder_embed1..4``, ...), predicting CLIP features (DeepMIM-CLIP) or pixels;
* timm checkpoints: ``.safetensors``, ``.pth`` or ``pytorch_model.bin`` in timm's layout (e.g. a
  local copy of ``vit_base_patch16_224.mae``), and Hugging Face/timm model folders (``config.json``
  with ``model.safetensors`` or ``pytorch_model.bin``);
* this project's own pretraining model states (``encoder.*`` and ``decoders.*``).

``inspect_file`` reads shapes only (safetensors headers, memory-mapped pickles) so launchers can
check a file against a preset before any process starts; ``encoder_state`` returns the encoder
tensors in timm's ``VisionTransformer`` names, with the keys it dropped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import WeightsError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")
# What any ViT a file may declare can be, before anything is allocated (ViT-g/14 is 1408 x 40).
LIMITS = {"width": 8192, "depth": 128, "patch": 64, "grid": 256, "out_dim": 65536}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class EncoderShape:
    width: int
    depth: int
    patch: int
    img_size: int

    def describe(self) -> str:
        return f"ViT width {self.width}, {self.depth} blocks, patch {self.patch}, {self.img_size} px"


@dataclass(frozen=True)
class FileInfo:
    """What a weights file (or model folder) holds."""

    path: Path
    kind: str  # mae | mae-full | mae-checkpoint | deepmim | deepmim-clip | timm | ours | clip | unknown
    shape: EncoderShape | None
    decoders: int = 0  # decoders the file carries (MAE: 1, DeepMIM: 4, ours: T)
    pred_dim: int = 0  # what the (final) decoder predicts per patch
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        what = {
            "mae": "an official MAE encoder",
            "mae-full": "an official MAE model with its decoder",
            "mae-checkpoint": "an MAE training checkpoint (main_pretrain.py)",
            "deepmim": f"an official DeepMIM checkpoint ({self.decoders} decoders predicting pixels)",
            "deepmim-clip": f"an official DeepMIM-CLIP checkpoint ({self.decoders} decoders predicting "
            f"{self.pred_dim}-d CLIP features)",
            "timm": "a timm ViT",
            "ours": "this project's DeepMIM model states",
            "clip": "a CLIP model (visual tower)",
        }.get(self.kind, "a weights file")
        return f"{what}: {self.shape.describe()}" if self.shape else what


# ------------------------------------------------------------------------------------ reading


def weights_file(path: Path) -> Path:
    """The file to read for ``path``: itself, or the weights file of a model folder."""
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"{path}: a folder without {' or '.join(FOLDER_FILES)} (nor export.json or checkpoints/)")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file or folder")
    return path


def _read_safetensors(path: Path, lazy: bool) -> dict[str, Any]:
    """Tensors (or, lazily, their shapes) of a safetensors file; a damaged header is one error."""
    from safetensors import SafetensorError, safe_open

    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            if lazy:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None


def check_safetensors_header(path: Path) -> None:
    """The header is an 8-byte length and JSON whose byte ranges fit the file: checked before the
    library reads it, so a corrupt or hostile header is a clear error, not a huge allocation."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise WeightsError(f"{path}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise WeightsError(f"{path}: corrupt safetensors header (not JSON: {err})") from None
    body = size - 8 - n
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            dims = [int(d) for d in meta["shape"]]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header (entry {key!r})") from None
        if not 0 <= start <= end <= body or any(d < 0 for d in dims):
            raise WeightsError(f"{path}: corrupt safetensors header ({key!r} claims bytes {start}-{end} of {body})")


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Any], str]:
    """(state dict, container kind) of a loaded checkpoint."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    container = "plain"
    for key in ("model", "state_dict", "module", "model_state"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
            container = "checkpoint" if {"optimizer", "epoch"} & set(obj) else key
            obj = inner
            break
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, container


def read_state(path: Path, lazy: bool = False) -> tuple[dict[str, Any], str]:
    """(state dict, container) of a weights file; with ``lazy``, values are shapes or mmapped tensors."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, lazy), "plain"
    from engine.weights.safe_load import is_torchscript_archive, safe_load

    if is_torchscript_archive(path):
        raise WeightsError(f"{path}: a TorchScript archive (an OpenAI CLIP release?), not encoder weights")
    try:
        obj = safe_load(path, allow=("argparse.Namespace",), mmap=lazy)
    except WeightsError:
        raise
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: {err})") from None
    return _unwrap(obj, path)


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else tuple(value.shape)


def encoder_shape(state: dict[str, Any], path: Path, prefix: str = "") -> EncoderShape:
    """The ViT an encoder state declares, checked against sane limits before anything is built."""
    need = [f"{prefix}patch_embed.proj.weight", f"{prefix}pos_embed"]
    missing = [k for k in need if k not in state]
    if missing:
        raise WeightsError(f"{path}: not a ViT encoder (no {missing[0]})")
    w = _shape_of(state[f"{prefix}patch_embed.proj.weight"])
    pe = _shape_of(state[f"{prefix}pos_embed"])
    if len(w) != 4 or w[1] != 3 or w[2] != w[3] or len(pe) != 3 or pe[-1] != w[0]:
        raise WeightsError(f"{path}: patch embedding {w} and position embedding {pe} do not describe a ViT")
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k[len(prefix) :])) and k.startswith(prefix)}
    depth = len(blocks)
    if blocks != set(range(depth)):
        raise WeightsError(f"{path}: encoder blocks are not numbered 0..{depth - 1}")
    tokens = pe[1] - 1  # one cls token
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens:
        raise WeightsError(f"{path}: position embedding of {pe[1]} tokens is not cls + a square grid")
    shape = EncoderShape(width=w[0], depth=depth, patch=w[2], img_size=grid * w[2])
    check_limits(path, width=shape.width, depth=depth, patch=shape.patch, grid=grid)
    return shape


def check_limits(path: Path | str, **dims: int) -> None:
    for name, value in dims.items():
        if not 0 < value <= LIMITS[name]:
            raise WeightsError(f"{path}: declares {name} {value}, outside any known ViT (at most {LIMITS[name]})")


def classify(state: dict[str, Any], path: Path, container: str = "plain") -> FileInfo:
    """What kind of file this is, and the encoder shape it holds (shapes only are read)."""
    keys = set(state)
    if any(k.startswith("visual.") for k in keys):
        return FileInfo(path, "clip", None)
    if "encoder.patch_embed.proj.weight" in keys:
        shape = encoder_shape(state, path, "encoder.")
        taps = _shape_of(state["decoders.embed.weight"])[0] if "decoders.embed.weight" in keys else 0
        pred = _shape_of(state["decoders.pred.weight"])[1] if "decoders.pred.weight" in keys else 0
        return FileInfo(path, "ours", shape, taps, pred)
    shape = encoder_shape(state, path)
    if "decoder_embed1.weight" in keys:
        n = len({m.group(1) for k in keys if (m := re.match(r"decoder_embed(\d+)\.weight$", k))})
        pred = _shape_of(state[f"decoder_pred{n}.weight"])[0]
        kind = "deepmim" if pred == 3 * shape.patch**2 else "deepmim-clip"
        return FileInfo(path, kind, shape, n, pred)
    if "decoder_embed.weight" in keys:
        pred = _shape_of(state["decoder_pred.weight"])[0]
        return FileInfo(path, "mae-checkpoint" if container == "checkpoint" else "mae-full", shape, 1, pred)
    if container in ("model", "checkpoint"):
        return FileInfo(path, "mae", shape)
    return FileInfo(path, "timm", shape)


def inspect_file(path: str | Path) -> FileInfo:
    """Shapes only: cheap enough for a launcher's check of a multi-GB file."""
    p = Path(path)
    state, container = read_state(p, lazy=True)
    return classify(state, weights_file(p), container)


def encoder_state(path: str | Path) -> tuple[dict[str, Any], FileInfo, list[str]]:
    """(encoder tensors in timm's names as float32, what the file is, the keys dropped)."""
    import torch

    p = Path(path)
    state, container = read_state(p)
    info = classify(state, weights_file(p), container)
    if info.kind == "clip":
        raise WeightsError(f"{p}: a CLIP model, not a ViT encoder; CLIP weights are target.teacher")
    prefix = "encoder." if info.kind == "ours" else ""
    out, dropped = {}, []
    for k, v in state.items():
        name = k[len(prefix) :] if k.startswith(prefix) else None
        if name is not None and name.startswith(ENCODER_PREFIXES) and isinstance(v, torch.Tensor):
            out[name] = v.float()
        else:
            dropped.append(k)
    require_finite(out, p)
    return out, info, sorted(dropped)


def require_finite(state: dict[str, Any], where: Path | str, error: type[WeightsError] = WeightsError) -> None:
    """Weights with a NaN or an infinity cannot train (the first steps would be skipped, then the run
    stopped with no word about the file): refused with one line naming the file and the tensor."""
    import torch

    for name, t in state.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        # the values stored in the file, not the view: a small storage expanded to a huge shape (a file
        # that lies about its size, refused by the shape limits) is never materialized here
        n = t.untyped_storage().nbytes() // t.element_size()
        stored = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,)) if n < t.numel() else t
        if not bool(torch.isfinite(stored).all()):
            bad = int((~torch.isfinite(stored)).sum())
            raise error(f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}")
