"""Frozen teachers that run inside the training step.

* ``ClipTeacher``: a CLIP ViT visual tower (timm's VisionTransformer in CLIP form: pre-norm,
  QuickGELU, no patch bias) whose targets are ``ln_post`` + projection applied to every token.
  Weights come from a local file in the OpenAI layout (the ``visual.*`` keys of
  ``clip.load(...).state_dict()``, or OpenAI's TorchScript archive itself, whose tensors are read
  without running its code) or in timm's layout.
  The architecture (width, depth, patch, grid, output width) is read from the weights.
* The MAE mixed-target generator: an MAE encoder + decoder, loaded from one of this project's
  own checkpoints (any pixel-target run; its final decoder is used) or from the official MAE
  layout (a ``model`` dict with ``decoder_*`` entries).

Loaders are strict: a missing or unexpected key is an error that names the keys.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from engine.errors import TeacherError, UnsafeFileError, WeightsError
from engine.models.mim import DeepMIM
from engine.models.registry import VariantSpec, get_variant, list_variants
from engine.run_folder.checkpoints import newest_complete
from engine.targets.feature_teacher import FeatureTeacher
from engine.weights.formats import check_limits, check_safetensors_header, require_finite
from engine.weights.safe_load import DEEPSPEED_CLASSES, is_torchscript_archive, read_torchscript_tensors, safe_load

__all__ = ["TeacherError", "load_clip_teacher", "load_generator", "snapshot_generator"]

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _load_file(path: str | Path) -> dict:
    """A weights file as a dict of tensors, without running anything from it (engine.weights.safe_load):
    a plain pickle is read with ``weights_only=True``; a TorchScript archive (OpenAI's CLIP release)
    has its tensors read and its code ignored."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher weights {path}: file not found")
    try:
        if is_torchscript_archive(path):
            obj = read_torchscript_tensors(path)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            check_safetensors_header(path)
            obj = load_file(str(path))
        else:  # our checkpoints (DeepSpeed's classes) or an official checkpoint-N.pth (its argparse args)
            obj = safe_load(path, allow=(*DEEPSPEED_CLASSES, "argparse.Namespace"))
    except (UnsafeFileError, TeacherError) as err:
        raise TeacherError(str(err)) from None
    except Exception as err:
        raise TeacherError(f"teacher weights {path}: cannot read ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise TeacherError(f"teacher weights {path}: expected a state dict, got {type(obj).__name__}")
    inner = obj.get("state_dict") or obj.get("model") or obj.get("module")
    require_finite(inner if isinstance(inner, dict) else obj, f"teacher weights {path}", TeacherError)
    return obj


# ------------------------------------------------------------------------------------------- CLIP


@dataclass(frozen=True)
class ClipArch:
    width: int
    layers: int
    patch: int
    grid: int
    out_dim: int

    @property
    def heads(self) -> int:
        return max(1, self.width // 64)  # OpenAI CLIP's rule for visual towers (1 for toy widths)


def _count_blocks(keys, prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    if idx != set(range(len(idx))) or not idx:
        raise TeacherError(f"transformer blocks under {prefix!r} are missing or not numbered 0..n-1")
    return len(idx)


def openai_to_timm(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ClipArch]:
    """OpenAI CLIP keys (``visual.*``; text-tower keys are ignored) -> timm VisionTransformer keys."""
    vis = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    need = ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_post.weight", "proj")
    missing = [k for k in need if k not in vis]
    if missing:
        raise TeacherError(f"OpenAI CLIP weights lack visual.{missing}")
    out: dict[str, torch.Tensor] = {}
    simple = {
        "conv1.weight": "patch_embed.proj.weight",
        "ln_pre.weight": "norm_pre.weight",
        "ln_pre.bias": "norm_pre.bias",
        "ln_post.weight": "norm.weight",
        "ln_post.bias": "norm.bias",
    }
    block_map = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "attn.in_proj_weight": "attn.qkv.weight",
        "attn.in_proj_bias": "attn.qkv.bias",
        "attn.out_proj": "attn.proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for k, v in vis.items():
        if k in simple:
            out[simple[k]] = v
        elif k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "proj":
            out["head.weight"] = v.t().contiguous()
        elif k.startswith("transformer.resblocks."):
            rest = k[len("transformer.resblocks.") :]
            i, name = rest.split(".", 1)
            for src, dst in block_map.items():
                if name.startswith(src):
                    name = dst + name[len(src) :]
                    break
            out[f"blocks.{i}.{name}"] = v
        else:
            out[k] = v  # unknown: left as is so the strict load names it
    return out, clip_arch_timm(out)


def clip_arch_timm(sd: dict[str, torch.Tensor]) -> ClipArch:
    for k in ("patch_embed.proj.weight", "pos_embed", "head.weight"):
        if k not in sd:
            raise TeacherError(f"timm CLIP weights lack {k!r}")
    w = sd["patch_embed.proj.weight"]
    tokens = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise TeacherError(f"CLIP position embedding has {tokens} patch tokens, not a square grid")
    arch = ClipArch(
        width=w.shape[0],
        layers=_count_blocks(sd, "blocks."),
        patch=w.shape[-1],
        grid=grid,
        out_dim=sd["head.weight"].shape[0],
    )
    # the shapes come from a file: bounded before a model of that size is allocated
    try:
        check_limits(
            "CLIP weights", width=arch.width, depth=arch.layers, patch=arch.patch, grid=grid, out_dim=arch.out_dim
        )
    except WeightsError as err:
        raise TeacherError(str(err)) from None
    return arch


class ClipTeacher(FeatureTeacher):
    """An OpenAI CLIP visual tower (QuickGELU, pre-norm, no patch bias) built from the shapes in its
    weights: ``ln_post`` + projection on every patch token, [N, L, out_dim]."""

    def __init__(self, arch: ClipArch, grid: int | None = None):
        from timm.layers import LayerNorm
        from timm.models.vision_transformer import VisionTransformer

        grid = grid or arch.grid  # the student's patch grid; the teacher's input is resized to it
        vit = VisionTransformer(
            img_size=grid * arch.patch,
            patch_size=arch.patch,
            embed_dim=arch.width,
            depth=arch.layers,
            num_heads=arch.heads,
            pre_norm=True,
            norm_layer=partial(LayerNorm, eps=1e-5),
            act_layer="quick_gelu",
            num_classes=arch.out_dim,
        )
        super().__init__(vit, CLIP_MEAN, CLIP_STD, grid * arch.patch, use_head=True, num_prefix=1)
        self.arch, self.grid = arch, grid

    def load_timm_state(self, sd: dict[str, torch.Tensor]) -> None:
        from timm.layers import resample_abs_pos_embed

        sd = dict(sd)
        sd.setdefault("head.bias", torch.zeros(self.arch.out_dim))  # OpenAI's projection has no bias
        if self.grid != self.arch.grid:
            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [self.grid, self.grid], num_prefix_tokens=1)
        a = self.arch
        strict_load(self.vit, sd, f"CLIP weights (read as width {a.width}, {a.layers} layers, patch {a.patch})")


def load_clip_teacher(path: str | Path, grid: int | None = None, arch: str = "") -> FeatureTeacher:
    """A frozen CLIP teacher (projected patch tokens) from a file or timm hub folder: the OpenAI layout
    as it is, a timm layout with its architecture named (``arch`` or config.json). ``grid``: the
    student's patches per side (default: the tower's own grid)."""
    from engine.targets.timm_teachers import load_feature_teacher

    return load_feature_teacher(path, arch, grid, use_head=True)[0]


def strict_load(model: nn.Module, sd: dict, what: str) -> None:
    """load_state_dict that names every missing, unexpected or wrongly shaped key in one error."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    wrong = [
        f"{k} {tuple(sd[k].shape)} != {tuple(ours[k].shape)}"
        for k in sorted(set(ours) & set(sd))
        if ours[k].shape != sd[k].shape
    ]
    if missing or unexpected or wrong:
        raise TeacherError(
            f"{what} do not fit the architecture: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"wrong shape {wrong[:6]}"
        )
    model.load_state_dict(sd, strict=True)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------- MAE generator


@dataclass
class Generator:
    model: DeepMIM  # one tap: the final decoder
    norm_pix: bool | None  # what its decoder was trained to predict (None: unknown)
    source: str


def _variant_for(dim: int, depth: int, patch: int) -> VariantSpec:
    for name in list_variants():
        spec = get_variant(name)
        if (spec.dim, spec.depth, spec.patch_size) == (dim, depth, patch):
            return spec
    raise TeacherError(f"no registered encoder variant has width {dim}, depth {depth}, patch {patch}")


def _own_checkpoint_file(path: Path) -> Path | None:
    if path.is_dir() and (path / "mp_rank_00_model_states.pt").is_file():
        return path / "mp_rank_00_model_states.pt"
    for root in (path / "checkpoints", path):
        if root.is_dir():
            newest = newest_complete(root)
            if newest is not None:
                return newest / "mp_rank_00_model_states.pt"
    return None


def load_generator(path: str | Path, img_size: int) -> Generator:
    """An MAE generator from our own run/checkpoint folder, a snapshot of one (``snapshot_generator``),
    or an official MAE checkpoint file."""
    path = Path(path)
    if path.is_dir():
        own = _own_checkpoint_file(path)
        if own is None:
            raise TeacherError(f"generator {path}: no complete checkpoint found in this folder")
        return _load_own_generator(_load_file(own), own, img_size)
    state = _load_file(path)
    if "module" in state and "config" in state:  # our checkpoint's model states, or a snapshot of them
        return _load_own_generator(state, path, img_size)
    return _load_official_generator(state, path, img_size)


def snapshot_generator(source: str | Path, dest: Path) -> dict | None:
    """Freeze the generator a mixed-target run uses: when ``source`` is one of our pretraining runs (or
    checkpoints), copy the weights and config of the checkpoint it names *now* to ``dest``, so the run
    keeps exactly that generator whatever the MAE run does later (continue, retention). Returns what
    was recorded, or None for a plain file (an official MAE checkpoint), which is used as it is."""
    import os

    src = Path(source)
    own = _own_checkpoint_file(src) if src.is_dir() else None
    if own is None:
        return None
    state = _load_file(own)
    marker_path = own.parent / "complete.json"
    step = json.loads(marker_path.read_text()).get("step") if marker_path.is_file() else None
    info = {"given": str(src.resolve()), "checkpoint": str(own.parent.resolve()), "step": step}
    total = _planned_steps(src if (src / "checkpoints").is_dir() else own.parent.parent.parent)
    if total is not None and step is not None and step < total:
        log.warning(
            "generator %s is at step %d of its %d planned steps (not complete); this run uses that "
            "checkpoint from now on",
            src,
            step,
            total,
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    torch.save({"module": state["module"], "config": state["config"], "snapshot": info}, tmp)
    os.replace(tmp, dest)
    log.info("generator: froze %s (step %s) into %s", own.parent, step, dest)
    return info


def _planned_steps(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "config.json").read_text())["plan"]["stop_step"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _load_own_generator(state: dict, file: Path, img_size: int) -> Generator:
    from engine.config import from_dict, plan_run

    cfg = from_dict(state["config"])
    if cfg.target.kind != "pixel":
        raise TeacherError(
            f"generator {file}: trained with target.kind={cfg.target.kind!r}; a pixel-target run is needed"
        )
    plan = plan_run(cfg)
    spec, size = get_variant(plan.arch), plan.img_size
    if size != img_size:
        raise TeacherError(f"generator {file}: image size {size} differs from the student's {img_size}")
    final = len(plan.taps) - 1
    model = _generator_model(spec, size, cfg.model.decoder_dim, cfg.model.decoder_depth, cfg.model.decoder_heads)
    sd = {}
    for k, v in state["module"].items():
        # keep the encoder and the final decoder's slice of every stacked decoder parameter
        if k.startswith("decoders.") and k != "decoders.pos_embed":
            v = v[final : final + 1]
        sd[k] = v
    strict_load(model, sd, f"generator weights in {file}")
    return Generator(freeze(model), cfg.target.norm_pix, str(file))


def _generator_model(spec: VariantSpec, size: int, dim: int, depth: int, heads: int) -> DeepMIM:
    return DeepMIM(spec, size, [spec.depth], dim, depth, heads, pred_dim=3 * spec.patch_size**2)


def official_mae_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MAE keys (encoder in timm layout + ``decoder_*``) -> our single-tap DeepMIM keys."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("decoder_blocks."):
            i, name = k[len("decoder_blocks.") :].split(".", 1)
            name = name.replace("attn.qkv", "qkv").replace("attn.proj", "proj").replace("mlp.fc", "fc")
            out[f"decoders.blocks.{i}.{name}"] = v.unsqueeze(0)
        elif k.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
            head, leaf = k.split(".", 1)
            out[f"decoders.{head[len('decoder_') :]}.{leaf}"] = v.unsqueeze(0)
        elif k == "mask_token":
            out["decoders.mask_token"] = v.reshape(1, -1)
        elif k == "decoder_pos_embed":
            out["decoders.pos_embed"] = v
        else:
            out[f"encoder.{k}"] = v
    return out


def deepmim_final_decoder(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DeepMIM checkpoint (decoders numbered 1..n) as an MAE with its final decoder."""
    n = len({k.split(".")[0] for k in sd if re.match(r"decoder_embed\d+\.", k)})
    out = {}
    for k, v in sd.items():
        m = re.match(r"(decoder_embed|decoder_blocks|decoder_norm|decoder_pred|mask_token)(\d+)(.*)$", k)
        if m is None:
            out[k] = v
        elif int(m.group(2)) == n:
            out[m.group(1) + m.group(3)] = v
    return out


def _load_official_generator(raw: dict, path: Path, img_size: int) -> Generator:
    sd = raw.get("model", raw)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "decoder_embed1.weight" in sd:
        n = len({k.split(".")[0] for k in sd if re.match(r"decoder_embed\d+\.", k)})
        out = sd[f"decoder_pred{n}.weight"].shape[0]
        p = sd["patch_embed.proj.weight"].shape[-1]
        if out != 3 * p * p:
            raise TeacherError(
                f"generator {path}: an official DeepMIM-CLIP checkpoint ({n} decoders predicting {out}-d CLIP "
                "features); the mixed target needs a pixel MAE (e.g. mae_pretrain_vit_base_full.pth, or one of our "
                "pixel-target runs)"
            )
        sd = deepmim_final_decoder(sd)  # a DeepMIM pixel model: its final decoder generates
    if "decoder_embed.weight" not in sd:
        raise TeacherError(
            f"generator {path}: an MAE encoder without its decoder (no decoder_embed.*); the mixed target needs the "
            "decoder too, e.g. mae_pretrain_vit_base_full.pth or mae_visualize_vit_base.pth"
        )
    pw = sd["patch_embed.proj.weight"]
    depth = _count_blocks(sd, "blocks.")
    spec = _variant_for(pw.shape[0], depth, pw.shape[-1])
    size = math.isqrt(sd["pos_embed"].shape[1] - 1) * spec.patch_size
    if size != img_size:
        raise TeacherError(
            f"generator {path}: image size {size} differs from the student's {img_size} (a generator's position "
            "embedding is not resampled: its reconstructions would change)"
        )
    dec_dim = sd["decoder_embed.weight"].shape[0]
    model = _generator_model(spec, size, dec_dim, _count_blocks(sd, "decoder_blocks."), 16)  # MAE: 16 heads
    strict_load(model, official_mae_to_ours(sd), f"generator weights in {path}")
    return Generator(freeze(model), None, str(path))


def inspect_generator(path: str | Path, img_size: int, patch: int) -> str:
    """Before launch: the generator source is something a mixed target can use (shapes only)."""
    from engine.weights.formats import inspect_file

    p = Path(path)
    if p.is_dir():
        own = _own_checkpoint_file(p)
        if own is None:
            raise TeacherError(f"generator {p}: no complete checkpoint found in this folder")
        return f"our run's checkpoint {own.parent}"
    info = inspect_file(p)
    if info.kind == "deepmim-clip":
        raise TeacherError(
            f"generator {p}: an official DeepMIM-CLIP checkpoint ({info.decoders} decoders predicting "
            f"{info.pred_dim}-d CLIP features); the mixed target needs a pixel MAE"
        )
    if info.kind in ("mae", "timm"):
        raise TeacherError(
            f"generator {p}: {info.describe()} without a decoder; the mixed target needs the decoder too, e.g. "
            "mae_pretrain_vit_base_full.pth"
        )
    if info.kind not in ("mae-full", "mae-checkpoint", "deepmim", "ours"):
        raise TeacherError(f"generator {p}: {info.describe()}, not an MAE with its decoder")
    shape = info.shape
    if shape.patch != patch or shape.img_size != img_size:
        raise TeacherError(
            f"generator {p}: {shape.describe()}; the student sees {img_size} px in patches of {patch} (a generator "
            "is not resampled)"
        )
    _load_file(p)  # read as the run will read it: its weights finite
    return info.describe()
