"""Checking and, only where needed, converting source images at shard-writing time.

Baseline RGB JPEGs pass through byte for byte: the shard holds the original file. Everything
else that PIL can read (CMYK or grayscale JPEGs, PNGs saved under a ``.JPEG`` name, ...) is
re-encoded to an RGB JPEG, so that every decoder on the read side (DALI's nvJPEG/mixed path and
its CPU path alike) sees one kind of input. Unreadable files raise ``BadImage`` with a reason.

A pixel budget keeps one huge image from exhausting a writer's memory (and, later, a training
step's): images above ``max_pixels`` are downscaled to fit it. The size is read from the header
before anything is decoded; JPEGs are decoded at a reduced DCT scale, so their memory stays near
the budget whatever their size; other formats above ``DECODE_FACTOR`` times the budget would need
that much memory to decode and are skipped with a reason that says how to accept them.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

# Sizes are checked against the budget before decoding; PIL's own bomb guard would refuse earlier
# with a less useful message.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: above every ImageNet image; ~200 MB decoded
DECODE_FACTOR = 4  # non-JPEG images are decoded at full size: allowed up to 4x the budget


class BadImage(ValueError):
    """The bytes are not a readable image; the message is the reason reported to the user."""


@dataclass(frozen=True)
class Prepared:
    data: bytes  # what goes into the shard
    width: int
    height: int
    action: str  # "copied" or "reencoded:<why>"


def _open(data: bytes) -> Image.Image:
    if not data:
        raise BadImage("empty file")
    try:
        return Image.open(io.BytesIO(data))  # reads the header only
    except Image.UnidentifiedImageError:
        raise BadImage("not an image format PIL can read") from None
    except Exception as err:
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from None


def _load(im: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode (truncated or corrupt data raises BadImage). With ``draft_size``, a JPEG decodes at
    the smallest DCT scale (1/2, 1/4, 1/8) that is at least that size: every byte of entropy data
    is still read and checked, at a fraction of the cost and memory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size is not None and im.format == "JPEG":
                im.draft(im.mode if im.mode in ("RGB", "L") else None, draft_size)
            im.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from None
    return im


def fit(w: int, h: int, max_pixels: int, max_short_side: int) -> tuple[int, int]:
    """The size (w, h) downscaled to respect both limits (unchanged when within them)."""
    by_pixels = (max_pixels / (w * h)) ** 0.5 if max_pixels and w * h > max_pixels else 1.0
    by_side = max_short_side / min(w, h) if max_short_side and min(w, h) > max_short_side else 1.0
    if min(by_pixels, by_side) >= 1.0:
        return w, h
    if by_pixels < by_side:  # floor: never above the budget
        return max(1, int(w * by_pixels)), max(1, int(h * by_pixels))
    return max(1, round(w * by_side)), max(1, round(h * by_side))


def prepare_image(
    data: bytes, quality: int = 95, max_short_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Prepared:
    """Return the bytes to store: the original JPEG when it is a plain RGB JPEG within the limits,
    else a re-encode (converted, and downscaled to the limits)."""
    im = _open(data)
    w, h = im.size
    target = fit(w, h, max_pixels, max_short_side)
    too_big = target != (w, h)
    if im.format != "JPEG" and max_pixels and w * h > DECODE_FACTOR * max_pixels:
        raise BadImage(
            f"{im.format} image of {w} x {h} = {w * h / 1e6:.0f} M pixels: decoding it needs about "
            f"{w * h * 4 / 2**30:.1f} GiB, above {DECODE_FACTOR} x --max-pixels ({max_pixels / 1e6:.0f} M); raise "
            "--max-pixels to accept it"
        )
    reasons = []
    if im.format != "JPEG":
        reasons.append(f"format {im.format}")
    elif im.mode != "RGB":
        reasons.append(f"mode {im.mode}")
    if max_pixels and w * h > max_pixels:
        reasons.append(f"{w} x {h} > {max_pixels / 1e6:.0f} M pixels")
    if max_short_side and min(w, h) > max_short_side:
        reasons.append(f"short side {min(w, h)} > {max_short_side}")
    if not reasons:  # a plain RGB JPEG within the limits: check it decodes, keep the original bytes
        _load(im, (max(1, w // 8), max(1, h // 8)))
        return Prepared(data, w, h, "copied")
    im = _load(im, target if too_big else None)
    rgb = _to_rgb(im)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return Prepared(out.getvalue(), rgb.size[0], rgb.size[1], "reencoded:" + ", ".join(reasons))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        # Composite transparency on white rather than letting convert() drop alpha to black.
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")  # PIL already un-inverts Adobe CMYK JPEGs on load
