"""Checking and, only where needed, converting source images at shard-writing time.

Baseline RGB JPEGs pass through byte for byte: the shard holds the original file. Everything
else that PIL can read (CMYK or grayscale JPEGs, PNGs saved under a ``.JPEG`` name, ...) is
re-encoded to an RGB JPEG, so that every decoder on the read side (DALI's nvJPEG/mixed path and
its CPU path alike) sees one kind of input. Unreadable files raise ``BadImage`` with a reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

# Huge images are legitimate in web-scale data; PIL's bomb guard would reject them by default.
Image.MAX_IMAGE_PIXELS = 30_000 * 30_000


class BadImage(ValueError):
    """The bytes are not a readable image; the message is the reason reported to the user."""


@dataclass(frozen=True)
class Prepared:
    data: bytes  # what goes into the shard
    width: int
    height: int
    action: str  # "copied" or "reencoded:<why>"


def _check_decodes(data: bytes) -> Image.Image:
    """Open and decode the whole image (truncated or corrupt data raises). JPEGs decode at 1/8
    scale through libjpeg's DCT scaling: every byte of entropy data is still read and checked,
    at a fraction of the cost, which keeps the writer near disk speed on pass-through JPEGs."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            size, fmt, mode = im.size, im.format, im.mode
            if fmt == "JPEG" and mode == "RGB":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
                im.info["full_size"] = size
                return im
            im.load()
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage("not an image format PIL can read") from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from None
    return im


def prepare_image(data: bytes, quality: int = 95, max_short_side: int = 0) -> Prepared:
    """Return the bytes to store: the original JPEG when it is a plain RGB JPEG, else a re-encode."""
    im = _check_decodes(data)
    w, h = im.info.get("full_size", im.size)
    reasons = []
    if im.format != "JPEG":
        reasons.append(f"format {im.format}")
    elif im.mode != "RGB":
        reasons.append(f"mode {im.mode}")
    if max_short_side and min(w, h) > max_short_side:
        reasons.append(f"short side {min(w, h)} > {max_short_side}")
    if not reasons:
        return Prepared(data, w, h, "copied")
    if "full_size" in im.info:  # decoded at reduced scale for the check: re-encode from full size
        im = Image.open(io.BytesIO(data))
        im.load()
    rgb = _to_rgb(im)
    if max_short_side and min(w, h) > max_short_side:
        scale = max_short_side / min(w, h)
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
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
