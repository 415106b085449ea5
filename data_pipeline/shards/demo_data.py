"""A small, real-photo dataset in the ImageNet class-folder layout, built offline.

The photos ship inside scikit-image and scikit-learn (nobody here made them). Each source photo
becomes one class; its images are random crops of varying size and aspect, saved as JPEG. Used by
the quickstart, the tests and the data benchmark.

    python -m data_pipeline.demo_data OUT [--per-class 48] [--size 96] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("demo_data")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


# class name -> loader of an RGB uint8 photo
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "cat": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "galaxies": _skimage("hubble_deep_field"),
    "tissue": _skimage("immunohistochemistry"),
    "rocket": _skimage("rocket"),
    "retina": _skimage("retina"),
    "china": _sklearn(0),
    "flower": _sklearn(1),
}


def random_crops(photo: np.ndarray, count: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    """``count`` crops covering 15-80% of the photo's area at aspect 3/4-4/3, resized so the short side is ``size``."""
    h, w = photo.shape[:2]
    out = []
    for _ in range(count):
        area = rng.uniform(0.15, 0.8) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[y : y + ch, x : x + cw])
        scale = size / min(ch, cw)
        out.append(crop.resize((max(size, round(cw * scale)), max(size, round(ch * scale))), Image.Resampling.BICUBIC))
    return out


def build(out: str | Path, per_class: int = 48, size: int = 96, seed: int = 0, quality: int = 90) -> dict[str, int]:
    """Write OUT/<class>/<class>_NNNN.jpg; returns images per class. Deterministic under the seed."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    counts = {}
    for name, load in PHOTOS.items():
        try:
            photo = load()
        except Exception as err:  # an older scikit-image may fetch some photos from the network
            log.warning("photo %r is not available offline (%s); skipping this class", name, err)
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(random_crops(photo, per_class, size, rng)):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            (folder / f"{name}_{i:04d}.jpg").write_bytes(buf.getvalue())
        counts[name] = per_class
    if len(counts) < 2:
        raise RuntimeError("fewer than two bundled photos could be loaded; is scikit-image installed?")
    log.info("wrote %d images in %d classes to %s", sum(counts.values()), len(counts), out)
    return counts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.demo_data",
        description="Build the real-photo demo dataset in the class-folder layout: random crops of the photos "
        "bundled with scikit-image and scikit-learn, one class per photo.",
    )
    ap.add_argument("out", help="output folder (OUT/<class>/<class>_NNNN.jpg)")
    ap.add_argument("--per-class", type=int, default=48, help="crops per class (default 48; 9 classes)")
    ap.add_argument("--size", type=int, default=96, help="short side of each crop in pixels (default 96)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the crops: another seed gives other crops")
    args = ap.parse_args(argv)
    build(args.out, args.per_class, args.size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def build_digits(out: str | Path, size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """scikit-learn's labeled handwritten digits (1797 images, 8x8, 10 classes), upscaled
    (bicubic) to ``size`` px RGB JPEGs, split into ``out/train/<digit>/`` and ``out/val/<digit>/``
    with the same class balance. Deterministic under the seed."""
    from sklearn.datasets import load_digits

    out = Path(out)
    d = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(d.target == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = round(len(idx) * val_fraction)
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                (folder / f"digit_{i:04d}.jpg").write_bytes(buf.getvalue())
                counts[split] += 1
    return counts
