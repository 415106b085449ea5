"""Reconstruction figures: per image, the input, the masked input and every decoder's output.

Predictions of normalized-pixel targets are mapped back to pixels with the true patch mean and
variance (as in MAE's visualization); visible patches are pasted from the input so the figure
shows what each decoder filled in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD
from engine.models.mim import DeepMIM, MaskState, patchify, random_masking, unpatchify


def to_pixels(pred: torch.Tensor, imgs: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """pred: [N, L, P] in target space -> [N, L, P] in the input's (ImageNet-normalized) space."""
    if not norm_pix:
        return pred
    ref = patchify(imgs.float(), p)
    mean = ref.mean(dim=-1, keepdim=True)
    var = ref.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] ImageNet-normalized -> [H, W, 3] uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (img.float().cpu() * std + mean).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _heat(values: torch.Tensor, visible: torch.Tensor, grid: int) -> np.ndarray:
    """Per-patch values in [-1, 1] -> [grid, grid, 3] uint8 (blue low, red high; visible patches gray)."""
    v = ((values.float().clamp(-1, 1) + 1) / 2).view(grid, grid, 1)
    rgb = torch.cat([v, 0.25 * torch.ones_like(v), 1 - v], dim=-1)
    rgb = torch.where(visible.view(grid, grid, 1) > 0, torch.full_like(rgb, 0.5), rgb)
    return (rgb.numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruction_panels(
    model: DeepMIM, imgs: torch.Tensor, masks: MaskState, norm_pix: bool, target=None
) -> tuple[list[str], list[list[np.ndarray]]]:
    """Column titles and, per image, the panels [input, masked, (generator,) tap t1, ..., tap tT].

    Pixel and mixed targets show reconstructions (masked patches predicted, visible ones pasted);
    CLIP feature targets show, per masked patch, the cosine similarity between the decoder's
    prediction and the teacher's feature.
    """
    p = model.patch_size
    dtype = next(model.parameters()).dtype
    preds = model.predict(imgs.to(dtype), masks).float()  # [T, N, L, P]
    patches = patchify(imgs.float(), p)
    m = masks.mask.unsqueeze(-1)
    masked = unpatchify(patches * (1 - m), p)  # 0 in normalized space = the dataset mean color
    kind = getattr(target, "kind", "pixel")
    extra = None
    if kind in ("clip", "features"):
        feats = target(imgs, masks)[0].float()  # [N, L, C]
        sims = torch.nn.functional.cosine_similarity(preds, feats[None], dim=-1)  # [T, N, L]
    elif kind == "mixed":
        extra = target.generate(imgs, masks)  # [N, L, P] in the generator's space
    grid = round(masks.mask.shape[1] ** 0.5)
    rows = []
    for i in range(imgs.shape[0]):
        sl = slice(i, i + 1)
        row = [_to_uint8(imgs[i]), _to_uint8(masked[i])]
        if extra is not None:
            rec = to_pixels(extra[sl], imgs[sl], p, target.generator_norm_pix)
            row.append(_to_uint8(unpatchify(rec * m[sl] + patches[sl] * (1 - m[sl]), p)[0]))
        for t in range(preds.shape[0]):
            if kind in ("clip", "features"):
                row.append(_heat(sims[t, i].cpu(), 1 - masks.mask[i].cpu(), grid))
                continue
            rec = to_pixels(preds[t, sl], imgs[sl], p, norm_pix)
            row.append(_to_uint8(unpatchify(rec * m[sl] + patches[sl] * (1 - m[sl]), p)[0]))
        rows.append(row)
    cols = ["input", "masked"] + (["generator"] if extra is not None else [])
    prefix = "cos " if kind in ("clip", "features") else ""
    cols += [f"{prefix}block {t}" for t in model.taps]
    return cols, rows


def save_grid(titles: list[str], rows: list[list[np.ndarray]], path: str | Path, tile: int = 128) -> None:
    pad, head = 4, 18
    cols = len(titles)
    w = cols * (tile + pad) + pad
    h = head + len(rows) * (tile + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (tile + pad) + 4, 3), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            im = Image.fromarray(panel).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(im, (pad + c * (tile + pad), head + pad + r * (tile + pad)))
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    try:
        canvas.save(tmp)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written figure behind
        raise


def save_reconstructions(
    model: DeepMIM, imgs: torch.Tensor, ratio: float, norm_pix: bool, path: str | Path, seed: int = 0, target=None
) -> None:
    """imgs: [N, 3, H, W] ImageNet-normalized, on the model's device."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=imgs.device).manual_seed(seed)
    masks = random_masking(imgs.shape[0], model.num_patches, ratio, gen, imgs.device)
    titles, rows = reconstruction_panels(model, imgs, masks, norm_pix, target)
    save_grid(titles, rows, path)
    model.train(was_training)
