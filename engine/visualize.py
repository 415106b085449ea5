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

from data_pipeline.loader import IMAGENET_MEAN, IMAGENET_STD
from engine.model import DeepMIM, MaskState, patchify, random_masking, unpatchify


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


@torch.no_grad()
def reconstruction_panels(
    model: DeepMIM, imgs: torch.Tensor, masks: MaskState, norm_pix: bool
) -> tuple[list[str], list[list[np.ndarray]]]:
    """Column titles and, per image, the panels [input, masked, recon tap t1, ..., recon tap tT]."""
    p = model.patch_size
    dtype = next(model.parameters()).dtype
    preds = model.predict(imgs.to(dtype), masks).float()  # [T, N, L, P]
    patches = patchify(imgs.float(), p)
    m = masks.mask.unsqueeze(-1)
    gray = torch.zeros_like(patches)  # 0 in normalized space = the dataset mean color
    masked = unpatchify(patches * (1 - m) + gray * m, p)
    rows = []
    for i in range(imgs.shape[0]):
        row = [_to_uint8(imgs[i]), _to_uint8(masked[i])]
        for t in range(preds.shape[0]):
            rec = to_pixels(preds[t, i : i + 1], imgs[i : i + 1], p, norm_pix)
            rec = rec * m[i : i + 1] + patches[i : i + 1] * (1 - m[i : i + 1])
            row.append(_to_uint8(unpatchify(rec, p)[0]))
        rows.append(row)
    titles = ["input", "masked"] + [f"block {t}" for t in model.taps]
    return titles, rows


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
    canvas.save(tmp)
    tmp.replace(path)


def save_reconstructions(
    model: DeepMIM, imgs: torch.Tensor, ratio: float, norm_pix: bool, path: str | Path, seed: int = 0
) -> None:
    """imgs: [N, 3, H, W] ImageNet-normalized, on the model's device."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=imgs.device).manual_seed(seed)
    masks = random_masking(imgs.shape[0], model.num_patches, ratio, gen, imgs.device)
    titles, rows = reconstruction_panels(model, imgs, masks, norm_pix)
    save_grid(titles, rows, path)
    model.train(was_training)
