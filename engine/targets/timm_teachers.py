"""Feature teachers from timm: DINOv2 (with or without registers), EVA-02, SigLIP, CLIP towers, any
ViT that ``timm.create_model`` builds, named by a weights file or a hub folder.

    target.teacher=weights/dinov2_b14                # a timm hub folder: config.json + model.safetensors
    target.teacher=dinov2.safetensors  target.teacher_arch=vit_base_patch14_dinov2
    target.teacher=openai_clip.pt                    # OpenAI's layout: a QuickGELU tower by definition

The architecture comes from ``target.teacher_arch`` or the folder's ``config.json``
(``architecture``, ``model_args``, ``pretrained_cfg``), never from a guess: a timm CLIP file cannot
tell GELU (LAION-2B, DFN, MetaCLIP towers) from QuickGELU (OpenAI's), whose features differ, so it
is refused until named. Weights are read without running code from them (``teachers._load_file``),
mapped by timm's own ``checkpoint_filter_fn`` for the family (layout conversions and the position
embedding resampled to the student's grid), then loaded strictly. Normalization: the folder's
``pretrained_cfg``, else timm's for the architecture (and its tag, ``vit_base_patch16_clip_224.laion2b``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import TeacherError, WeightsError
from engine.targets.feature_teacher import FeatureTeacher
from engine.weights.formats import LIMITS, check_limits

log = logging.getLogger(__name__)

# weight files a timm hub folder holds, in the order timm itself prefers them
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
_SIZES = {384: "small", 768: "base", 1024: "large", 1280: "huge"}


@dataclass(frozen=True)
class TeacherSource:
    weights: Path
    arch: str | None  # timm name (maybe with a .tag); None: OpenAI CLIP layout, built from its shapes
    model_args: dict
    pretrained_cfg: dict
    num_classes: int | None  # from config.json; None: from the weights

    def describe(self) -> str:
        return f"{self.arch or 'OpenAI CLIP (QuickGELU)'} from {self.weights}"


def read_teacher_source(path: str | Path, arch: str = "") -> TeacherSource:
    """Where the weights are and which architecture they are, from the file/folder and ``arch``."""
    p = Path(path)
    if p.is_dir():
        conf_path = p / "config.json"
        if not conf_path.is_file():
            raise TeacherError(f"target.teacher={str(p)!r}: a folder without config.json (a timm hub folder has one)")
        try:
            conf = json.loads(conf_path.read_text())
        except (OSError, ValueError) as err:
            raise TeacherError(f"{conf_path}: unreadable ({err})") from None
        if not isinstance(conf, dict) or not isinstance(conf.get("architecture"), str):
            model_type = conf.get("model_type") if isinstance(conf, dict) else None
            hint = f" (a Hugging Face transformers folder, model_type {model_type!r})" if model_type else ""
            raise TeacherError(f"{conf_path}: no 'architecture' entry, not a timm model folder{hint}")
        weights = next((p / n for n in HUB_WEIGHTS if (p / n).is_file()), None)
        if weights is None:
            raise TeacherError(f"target.teacher={str(p)!r}: none of {', '.join(HUB_WEIGHTS)} in the folder")
        named = conf["architecture"]
        if arch and arch.split(".")[0] != named.split(".")[0]:
            raise TeacherError(
                f"target.teacher_arch={arch!r} but {conf_path} says {named!r}; leave target.teacher_arch empty"
            )
        args = conf.get("model_args") or {}
        pcfg = conf.get("pretrained_cfg") or {}
        if not isinstance(args, dict) or not isinstance(pcfg, dict):
            raise TeacherError(f"{conf_path}: model_args and pretrained_cfg must be objects")
        nc = conf.get("num_classes")
        return TeacherSource(weights, arch or named, dict(args), dict(pcfg), nc if isinstance(nc, int) else None)
    if not p.is_file():
        raise TeacherError(f"target.teacher={str(p)!r}: no such file or folder (teacher weights are local)")
    return TeacherSource(p, arch or None, {}, {}, None)


def state_of(raw: dict) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from the usual containers."""
    for key in ("state_dict", "model", "module"):
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    return {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _suggest(sd: dict[str, torch.Tensor], clip: bool) -> tuple[str, str]:
    """Names to propose for an unnamed file, from its width, patch and grid."""
    w = sd.get("patch_embed.proj.weight")
    width, patch = (int(w.shape[0]), int(w.shape[-1])) if w is not None else (768, 16)
    size = _SIZES.get(width, "base")
    if clip:
        pos = sd.get("pos_embed")
        img = round(((pos.shape[1] - 1) ** 0.5) * patch) if pos is not None else 224
        return f"vit_{size}_patch{patch}_clip_{img}", f"vit_{size}_patch{patch}_clip_quickgelu_{img}"
    return f"vit_{size}_patch{patch}_dinov2", f"eva02_{size}_patch{patch}_224"


def require_arch(src: TeacherSource, sd: dict[str, torch.Tensor]) -> None:
    """A timm-layout file without a name is refused: the shapes cannot tell the activation."""
    if any(k.startswith("visual.") for k in sd):
        return
    if "patch_embed.proj.weight" not in sd:
        raise TeacherError(
            f"{src.weights}: not ViT weights in a layout read here (OpenAI CLIP's visual.*, timm's patch_embed.* "
            "and blocks.*)"
        )
    if src.arch is not None:
        return
    if "norm_pre.weight" in sd:  # a CLIP tower (pre-norm) in timm's layout
        gelu, quick = _suggest(sd, clip=True)
        raise TeacherError(
            f"{src.weights}: timm CLIP weights do not say GELU or QuickGELU; set target.teacher_arch={gelu} "
            f"(GELU: LAION-2B, DFN, MetaCLIP towers) or target.teacher_arch={quick} (QuickGELU: OpenAI's)"
        )
    a, b = _suggest(sd, clip=False)
    raise TeacherError(
        f"{src.weights}: the file does not name its architecture; set target.teacher_arch to its timm name "
        f"(e.g. {a} or {b}) or give a timm hub folder with config.json"
    )


def _teacher_size(patch: int, grid: int) -> int:
    try:
        check_limits("teacher", patch=patch, grid=grid)
    except WeightsError as err:
        raise TeacherError(str(err)) from None
    return patch * grid


def _own_grid(sd: dict[str, torch.Tensor]) -> int:
    """The patches per side a timm-layout file was trained at (its position embedding, with or
    without the class token's entry)."""
    pos = sd.get("pos_embed")
    if pos is None or pos.dim() != 3:
        raise TeacherError("the teacher's weights have no position embedding to read its grid from")
    n = int(pos.shape[1])
    side = math.isqrt(n)
    return side if side * side == n else math.isqrt(n - 1)


def build_timm_teacher(
    src: TeacherSource, sd: dict[str, torch.Tensor], grid: int | None, use_head: bool
) -> FeatureTeacher:
    """The timm model of ``src`` at the size that gives ``grid`` patches per side (None: the file's
    own grid), loaded strictly."""
    import timm

    from engine.targets.teachers import freeze, strict_load

    base = src.arch.split(".")[0]
    if not timm.is_model(base):
        raise TeacherError(f"target.teacher_arch={src.arch!r}: not a model timm {timm.__version__} knows")
    w = sd.get("patch_embed.proj.weight")
    if w is None and "visual.conv1.weight" in sd:
        w = sd["visual.conv1.weight"]
    if w is None or w.dim() != 4:
        raise TeacherError(f"{src.weights}: no patch embedding (patch_embed.proj.weight); not a ViT's weights")
    if not 0 < w.shape[0] <= LIMITS["width"]:
        raise TeacherError(f"{src.weights}: declares width {w.shape[0]}, outside any known ViT")
    patch = int(src.model_args.get("patch_size", w.shape[-1]))
    size = _teacher_size(patch, grid or _own_grid(sd))
    head = sd.get("head.weight")
    num_classes = src.num_classes if src.num_classes is not None else (int(head.shape[0]) if head is not None else 0)
    if use_head and not num_classes:
        raise TeacherError(
            f"{src.weights}: no projection head (head.weight) to apply; use target.kind=features with "
            "target.teacher_head=false"
        )
    kwargs = {**src.model_args, "img_size": size, "num_classes": num_classes}
    try:
        net = timm.create_model(src.arch, pretrained=False, **kwargs)
    except Exception as err:  # timm's own message names the argument it refused
        raise TeacherError(f"timm cannot build {src.arch!r} with {kwargs}: {type(err).__name__}: {err}") from None
    if use_head and not isinstance(getattr(net, "head", None), nn.Linear):
        raise TeacherError(f"{src.arch}: its head is not a per-token projection; set target.teacher_head=false")
    sd = dict(sd)
    mapped = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    if mapped is not None:  # timm's own layout conversions and position-embedding resampling for the family
        sd = mapped(sd, net)
    if "head.weight" in sd and "head.bias" not in sd and getattr(net.head, "bias", None) is not None:
        sd["head.bias"] = torch.zeros_like(sd["head.weight"][:, 0])  # a CLIP projection has no bias
    strict_load(net, sd, f"teacher weights {src.weights} (as {src.arch})")
    pcfg = {**(getattr(net, "pretrained_cfg", None) or {}), **src.pretrained_cfg}
    mean, std = tuple(pcfg.get("mean") or ()), tuple(pcfg.get("std") or ())
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise TeacherError(f"{src.describe()}: no usable mean/std in its pretrained_cfg ({mean}, {std})")
    prefix = int(getattr(net, "num_prefix_tokens", 1))
    return freeze(FeatureTeacher(net, mean, std, size, use_head=use_head, num_prefix=prefix))


def load_feature_teacher(
    path: str | Path, arch: str, grid: int | None, use_head: bool
) -> tuple[FeatureTeacher, TeacherSource]:
    """A frozen feature teacher from a file or hub folder, and where it came from (weights, architecture)."""
    from engine.targets.teachers import ClipTeacher, _load_file, freeze, openai_to_timm

    src = read_teacher_source(path, arch)
    sd = state_of(_load_file(src.weights))
    require_arch(src, sd)
    if src.arch is None:  # OpenAI's layout: its towers are all QuickGELU, built from the shapes
        timm_sd, clip_arch = openai_to_timm(sd)
        teacher = ClipTeacher(clip_arch, grid)
        if not use_head:
            teacher.use_head = False
        teacher.load_timm_state(timm_sd)
        return freeze(teacher), src
    return build_timm_teacher(src, sd, grid, use_head), src


def teacher_stats(teacher: FeatureTeacher) -> dict:
    """Shapes the plan counts FLOPs and memory from: width, depth, patch, tokens, parameters."""
    net = teacher.vit
    blocks = getattr(net, "blocks", None)
    patch = net.patch_embed.patch_size
    return {
        "width": int(getattr(net, "embed_dim", 0) or teacher.out_dim),
        "layers": len(blocks) if blocks is not None else 0,
        "patch": int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        "prefix": teacher.num_prefix,
        "params": sum(p.numel() for p in net.parameters()),
        "block_params": sum(p.numel() for p in blocks.parameters()) if blocks is not None else 0,
    }
