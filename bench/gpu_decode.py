"""GPU JPEG decoding throughput on shards (nvImageCodec and torchvision's nvJPEG).

    python -m bench.gpu_decode [--shards DIR] [--batch 128] [--rounds 5] --json OUT

The lent GPU machine cannot install DALI (its wheel is too large to carry), so this measures the
decoders DALI's ``mixed`` path is built on: nvImageCodec batched decoding (with and without ROI
decoding of a random-resized-crop box, then a bicubic resize to 224 on the GPU) and
``torchvision.io.decode_jpeg(device='cuda')``. Without CUDA it runs the same code on the CPU
(a dry run that checks the harness, not a measurement of interest).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from bench import answer_help_early


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_decode",
        description="JPEG decoding throughput of the decoders DALI's mixed path uses (nvImageCodec, with and without "
        "ROI decoding) and torchvision's nvJPEG; on the CPU without CUDA (a dry run of the harness).",
    )
    ap.add_argument("--shards", help="a shard folder (default: built from the bundled photos)")
    ap.add_argument("--batch", type=int, default=128, help="images per decode call (default 128)")
    ap.add_argument("--rounds", type=int, default=5, help="passes over the images; the best is reported (default 5)")
    ap.add_argument("--limit", type=int, default=1024, help="images read from the shards (default 1024)")
    ap.add_argument("--per-class", type=int, default=64, help="without --shards: images per class to build")
    ap.add_argument("--json", help="write the results here")
    return ap


if __name__ == "__main__":
    answer_help_early(build_parser)

import torch

from bench.common import header, sync, write_json
from data_pipeline.loaders.eval_reader import iter_raw

log = logging.getLogger("bench.gpu_decode")


def load_jpegs(shards: Path, limit: int) -> list[bytes]:
    return [data for _, _, data in iter_raw(str(shards))][:limit]


def rrc_boxes(sizes: list[tuple[int, int]], seed: int = 0) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) random-resized-crop boxes drawn as the training loaders draw them."""
    from data_pipeline.order.crops import crop_params, pixel_box

    boxes = []
    for i, (h, w) in enumerate(sizes):
        left, top, bw, bh = pixel_box(crop_params(seed, 0, i, w, h, (0.2, 1.0), (3 / 4, 4 / 3))[:4], w, h)
        boxes.append((top, left, bh, bw))
    return boxes


def bench_nvimgcodec(jpegs: list[bytes], batch: int, rounds: int, roi: bool, size: int, device: str) -> dict:
    from nvidia import nvimgcodec

    cuda = device == "cuda"
    dec = (
        nvimgcodec.Decoder(device_id=0)
        if cuda
        else nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
    )
    streams = [nvimgcodec.CodeStream(j) for j in jpegs]
    boxes = rrc_boxes([(s.height, s.width) for s in streams]) if roi else None
    if roi:  # decode only the crop box (what DALI's decoders.image_random_crop does)
        streams = [
            s.get_sub_code_stream(region=nvimgcodec.Region(t, left, t + h, left + w))
            for s, (t, left, h, w) in zip(streams, boxes)
        ]

    def one_round() -> int:
        n = 0
        for i in range(0, len(streams), batch):
            imgs = dec.decode(streams[i : i + batch])
            if roi or size:
                outs = []
                for im in imgs:
                    t = torch.as_tensor(im.cuda() if cuda else im.cpu(), device=device)  # [H, W, 3] uint8
                    outs.append(
                        torch.nn.functional.interpolate(
                            t.permute(2, 0, 1)[None].float(), size=(size, size), mode="bicubic", align_corners=False
                        )
                    )
                torch.cat(outs)
            n += len(imgs)
        return n

    one_round()  # warm-up: decoder state, allocations
    sync()
    t0 = time.perf_counter()
    n = sum(one_round() for _ in range(rounds))
    sync()
    return {"decoder": "nvimgcodec" + ("+roi+resize" if roi else ""), "img_per_s": n / (time.perf_counter() - t0)}


def bench_torchvision(jpegs: list[bytes], batch: int, rounds: int, device: str) -> dict:
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]

    def one_round() -> int:
        for i in range(0, len(data), batch):
            decode_jpeg(data[i : i + batch], device=device)
        return len(data)

    one_round()
    sync()
    t0 = time.perf_counter()
    n = sum(one_round() for _ in range(rounds))
    sync()
    return {"decoder": f"torchvision.decode_jpeg({device})", "img_per_s": n / (time.perf_counter() - t0)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            shards = Path(args.shards)
        else:
            from bench.data_pipeline import make_bench_shards

            shards = make_bench_shards(Path(tmp), args.per_class, 400)
        jpegs = load_jpegs(shards, args.limit)
    mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    out = header("gpu_decode", images=len(jpegs), mean_jpeg_kb=round(mean_kb, 1), batch=args.batch, results=[])
    runs = {
        "nvimgcodec": lambda: bench_nvimgcodec(jpegs, args.batch, args.rounds, False, 0, device),
        "nvimgcodec+roi+resize": lambda: bench_nvimgcodec(jpegs, args.batch, args.rounds, True, 224, device),
        f"torchvision.decode_jpeg({device})": lambda: bench_torchvision(jpegs, args.batch, args.rounds, device),
    }
    for name, fn in runs.items():
        try:
            rec = {**fn(), "status": "ok"}
        except Exception as err:  # a decoder missing on this machine must not sink the others
            rec = {"decoder": name, "img_per_s": None, "status": f"error: {type(err).__name__}: {str(err)[:200]}"}
        log.info("%s", rec)
        out["results"].append(rec)
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
